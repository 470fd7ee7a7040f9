"""Section 4b: the requests a run sends to its bucket, against what one S3 prefix serves.

Counted, not modelled, where it can be: a real rank-0 poller (`PeerPoller.poll_once`) watching
G-1 peers whose channels the real `Channel.publish` writes, on a bucket that counts every call by
kind, gives the reads of one poll and of one new version, and the writes of one publish. The rates
of a run at scale follow from those counts, the polls per second (`poll_interval`, which raises
the interval for large G) and one step time: pointer reads G(G-1)/interval, blob reads and
publishes once per exchange period. They are shown for one poller per group (rank 0 polls and
broadcasts the teachers to its group, as now) and one per rank (as before), against S3's
3,500 PUT and 5,500 GET a second per prefix.

    python -m bench.requests [--quick] [--ranks 8] [--step-seconds 1.0]
"""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure

from bench import common
from codistill_trainer import exchange
from codistill_trainer.loop import PROGRESS_EVERY
from codistill_trainer.teachers import PeerPoller, poll_interval

SCHEMA: common.Schema = {"counts": {"poll": {}, "fetch": {}, "publish": {}},
                         "rates": {"*": {"get_per_s": {}, "put_per_s": {},
                                         "get_per_s_every_rank": {}, "poll_interval_s": {}}}}
S3_GET_PER_S, S3_PUT_PER_S = 5500, 3500  # per prefix (S3's documented rates)
READS = ("get", "size", "exists", "ls")  # GET, HEAD and LIST requests
WRITES = ("put", "rm")  # PUT and DELETE
EXCHANGE = CHECKPOINT = 50  # the spec's defaults (exchangeEverySteps, a typical checkpoint)


def counted(peers: int, rounds: int) -> dict[str, dict[str, float]]:
    """Calls per poll with nothing new, per new version fetched, and per publish (a teacher,
    with its pointer and pruning): medians are not needed, the counts are exact."""
    weights = {"w": torch.zeros(256)}
    data = exchange.weights_to_bytes(weights, 0)
    with tempfile.TemporaryDirectory(prefix="codistill-bench-requests-") as folder:
        bucket = common.CountingBucket(Path(folder).as_uri())
        channels = [exchange.teacher_channel(bucket, p) for p in range(1, peers + 1)]
        poller = PeerPoller(bucket, list(range(1, peers + 1)),
                            expected={"w": (torch.float32, torch.Size([256]))})
        poll, fetch, publish = Counter(), Counter(), Counter()
        for r in range(rounds):
            bucket.taken()
            for ch in channels:
                ch.publish(r * EXCHANGE, data)
            publish.update(bucket.taken())
            poller.poll_once()  # every peer has a new version
            fetch.update(bucket.taken())
            poller.poll_once()  # nothing new
            poll.update(bucket.taken())
    per = {"poll": (poll, rounds * peers), "fetch": (fetch, rounds * peers),
           "publish": (publish, rounds * peers)}
    found = {name: {k: v / n for k, v in c.items()} for name, (c, n) in per.items()}
    for k, v in found["poll"].items():  # a fetch's poll includes the pointer read of a poll
        found["fetch"][k] = found["fetch"].get(k, 0.0) - v
    return found


def rates(counts: dict[str, dict[str, float]], groups: int, ranks: int, step_s: float
          ) -> dict[str, float]:
    """Requests a second of a run of `groups` groups (`ranks` each), one step every `step_s`."""
    def total(kinds: tuple[str, ...], what: str) -> float:
        return sum(counts[what].get(k, 0.0) for k in kinds)

    interval, peers = poll_interval(1.0, groups, groups - 1), groups - 1
    exchange_s = EXCHANGE * step_s
    pointer_reads = groups * peers * total(READS, "poll") / interval
    blob_reads = groups * peers * total(READS, "fetch") / exchange_s
    # a state save writes as a publish does; progress.json is one PUT every PROGRESS_EVERY steps
    puts = groups * (total(WRITES, "publish") * (1 / exchange_s + 1 / (CHECKPOINT * step_s))
                     + 1 / (PROGRESS_EVERY * step_s))
    publish_reads = groups * total(READS, "publish") * (1 / exchange_s + 1 / (CHECKPOINT * step_s))
    every_rank = ranks * (groups * peers * total(READS, "poll") / 1.0 + blob_reads)
    return {"groups": groups, "poll_interval_s": interval,
            "get_per_s": pointer_reads + blob_reads + publish_reads, "put_per_s": puts,
            "get_per_s_every_rank": every_rank + publish_reads}


def plot(result: dict[str, Any]) -> Figure:
    fig = common.figure(cols=2, size=(4.6, 3.8))
    rows = list(result["rates"].values())
    gs = [r["groups"] for r in rows]
    ax = fig.axes[0]
    ax.loglog(gs, [r["get_per_s_every_rank"] for r in rows], "o:",
              label=f"GET/s, every rank polls ({result['ranks']} ranks)")
    ax.loglog(gs, [r["get_per_s"] for r in rows], "o-", label="GET/s, rank 0 polls")
    ax.axhline(S3_GET_PER_S, color="k", lw=0.8, label="S3 GET/s per prefix")
    ax.set(title="bucket reads", xlabel="groups G", ylabel="requests per second")
    ax.legend(fontsize=7)
    ax = fig.axes[1]
    ax.loglog(gs, [r["put_per_s"] for r in rows], "s-", label="PUT+DELETE/s")
    ax.axhline(S3_PUT_PER_S, color="k", lw=0.8, label="S3 PUT/s per prefix")
    ax.set(title=f"bucket writes (step {result['step_seconds']} s)", xlabel="groups G")
    ax.legend(fontsize=7)
    for ax in fig.axes[:2]:
        ax.grid(alpha=0.3)
    return fig


def main() -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, default=8, help="ranks per group (default 8)")
    p.add_argument("--step-seconds", type=float, default=1.0, help="one training step (default 1)")
    args = p.parse_args()
    bench = common.Bench("requests")
    counts = counted(peers=7, rounds=3 if args.quick else 10)
    result = {"quick": args.quick, "ranks": args.ranks, "step_seconds": args.step_seconds,
              "exchange_every_steps": EXCHANGE, "checkpoint_every_steps": CHECKPOINT,
              "counts": counts,
              "rates": {str(g): rates(counts, g, args.ranks, args.step_seconds)
                        for g in (2, 8, 16, 32, 64, 128, 256)}}
    common.show("bucket calls (counted)", [(k, dict(v)) for k, v in counts.items()],
                ["per", "calls"])
    common.show(f"requests a second, {args.ranks} ranks a group, {args.step_seconds} s a step",
                [(r["groups"], r["poll_interval_s"], r["get_per_s"], r["get_per_s_every_rank"],
                  r["put_per_s"]) for r in result["rates"].values()],
                ["G", "poll s", "GET/s", "GET/s every rank", "PUT/s"])
    bench.write(args.out, result, SCHEMA, plot(result))


if __name__ == "__main__":
    main()
