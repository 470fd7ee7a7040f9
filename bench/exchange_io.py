"""Section 4: exchange I/O against the raw store, and cross-group bytes against all-reduce.

Publishing a model as the trainer does (its CPU copy, streamed as safetensors through
`Channel.publish`: the immutable blob, hashed on the way, the LATEST.json pointer, pruning) and
fetching it (`latest`, `fetch` into one buffer with its size and sha256 checked, decoded as views)
against a raw fsspec put/get of the very same bytes on the same store: a local folder and moto's
S3 server (its own process), in one run, with the peak memory of ours over the model's bytes. Then the bytes that
cross between groups per step, counted on a codistillation run's bucket, against what ring
all-reduce across the same groups would move: 2(G-1)/G x the model's size per step per group.

    python -m bench.exchange_io [--quick]
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure

from bench import common, sim
from codistill.storage import Bucket
from codistill_trainer import exchange, resume

SCHEMA: common.Schema = {"publish_vs_raw": {"*": {"*": {}}}, "fetch_vs_raw": {"*": {"*": {}}},
                         "cross_group": {"*": {"sent_bytes_per_step": {},
                                               "allreduce_bytes_per_step": {}}}}
MB = 1_000_000
LM = {"name": "lm", "args": {"seq_len": 64, "embed": 64, "hidden": 128}}  # the quickstart model
EXCHANGE = 50


def weights_of(size: int) -> dict[str, torch.Tensor]:
    """Random float32 tensors (8 layers) adding up to `size` bytes: a model of that size."""
    g = torch.Generator().manual_seed(0)
    return {f"layer{i}.weight": torch.randn(size // 32, generator=g) for i in range(8)}


def seconds(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def rss() -> int:
    """This process's resident bytes now."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def measured(fn: Callable[[], Any]) -> tuple[float, int]:
    """(seconds, peak resident bytes above the start) of one call. The peak is reset first
    (writing 5 to clear_refs, Linux); what the call returns and keeps is counted."""
    Path("/proc/self/clear_refs").write_text("5")
    before = rss()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start, peak_rss() - before


def one_round(bucket: Bucket, weights: dict[str, torch.Tensor], step: int, folder: str
              ) -> dict[str, float]:
    """One publish and fetch as the trainer makes them, and a raw put and get of the same bytes;
    seconds of each, and the peak memory of ours above what was resident before. The publish
    includes the trainer's CPU copy of the weights (`resume.cpu_copy`), the fetch the decoded
    weights it hands to the teacher, both of them the model's size."""
    channel = exchange.Channel(bucket, f"{folder}/teacher", "safetensors")
    box: dict[str, Any] = {}
    t: dict[str, float] = {}

    def publish() -> None:
        copy = resume.cpu_copy(weights)
        channel.publish(step, exchange.weights_blob(copy, step).write)

    t["publish"], t["publish_peak_bytes"] = measured(publish)
    box["data"] = exchange.weights_to_bytes(weights, step)
    raw = bucket.path(f"{folder}/raw/model.bin")  # overwritten each round: one copy in the store
    bucket.fs.makedirs(raw.rsplit("/", 1)[0], exist_ok=True)
    t["raw_put"] = seconds(lambda: bucket.fs.pipe_file(raw, box.pop("data")))
    t["fetch"], t["fetch_peak_bytes"] = measured(lambda: box.update(
        w=exchange.weights_from_bytes(channel.fetch(channel.latest()))))
    t["bytes"] = channel.latest().bytes
    box.clear()
    t["raw_get"] = seconds(lambda: bucket.fs.cat_file(raw))
    return t


def measure_store(bucket: Bucket, sizes: list[int], repeats: int) -> dict[str, Any]:
    """Median throughputs (MB/s) of ours and raw, and our peak memory / model bytes, per size."""
    found = {}
    for size in sizes:
        weights = weights_of(size * MB)
        folder = f"io/{size}"
        n = repeats if size < 4000 else 1  # 4 GB: one round (memory is its point; 16 GB peak)
        rounds = [one_round(bucket, weights, r, folder) for r in range(n)]
        bucket.rm(folder)
        med = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
        mb = med["bytes"] / MB
        found[str(size)] = {
            "bytes": int(med["bytes"]),
            "publish_mb_s": mb / med["publish"],
            "raw_put_mb_s": mb / med["raw_put"],
            "fetch_mb_s": mb / med["fetch"],
            "raw_get_mb_s": mb / med["raw_get"],
            "publish_peak_x_model": max(r["publish_peak_bytes"] for r in rounds) / med["bytes"],
            "fetch_peak_x_model": max(r["fetch_peak_bytes"] for r in rounds) / med["bytes"],
            "seconds": med,
        }
        r = found[str(size)]
        print(f"  {bucket.url} {size} MB: publish {r['publish_mb_s']:.0f} MB/s (raw put "
              f"{r['raw_put_mb_s']:.0f}), fetch {r['fetch_mb_s']:.0f} MB/s (raw get "
              f"{r['raw_get_mb_s']:.0f}); peak memory x model: publish "
              f"{r['publish_peak_x_model']:.2f}, fetch {r['fetch_peak_x_model']:.2f}", flush=True)
        del weights
    return found


def cross_group(groups: int, steps: int) -> dict[str, Any]:
    """Teacher bytes each group writes and reads per step in a real run, against ring all-reduce
    of the same model across the G groups."""
    spec_doc = {"groups": groups, "task": LM,
                "training": {"steps": steps, "batchSize": 16, "evalEverySteps": steps,
                             "evalBatches": 1, "checkpointEverySteps": steps},
                "distillation": {"exchangeEverySteps": EXCHANGE, "reloadEverySteps": EXCHANGE,
                                 "maxStalenessSteps": 4 * EXCHANGE,
                                 "pollIntervalSeconds": sim.PARKED}}
    counted: list[common.CountingBucket] = []

    def make(url: str) -> Bucket:
        counted.append(common.CountingBucket(url))
        return counted[-1]

    sim.run(sim.Job(f"bytes-g{groups}", spec_doc, steps, (16, 1)), make)
    model = sim.shared_task(LM["name"], LM["args"]).model()
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    b = counted[0]
    per = groups * steps
    return {
        "model_bytes": model_bytes, "steps": steps, "exchange_every_steps": EXCHANGE,
        "sent_bytes_per_step": sum(b.sent.values()) / per,
        "received_bytes_per_step": sum(b.received.values()) / per,
        "sent_by_kind": dict(b.sent), "received_by_kind": dict(b.received),
        "allreduce_bytes_per_step": 2 * (groups - 1) / groups * model_bytes,
    }


def plot(result: dict[str, Any]) -> Figure:
    fig = common.figure(cols=3, size=(4.6, 3.8))
    for ax, store in zip(fig.axes[:2], result["stores"]):
        rows = result["stores"][store]
        sizes = [int(s) for s in rows]
        for key, style in (("publish_mb_s", "o-"), ("raw_put_mb_s", "o:"),
                           ("fetch_mb_s", "s-"), ("raw_get_mb_s", "s:")):
            ax.semilogx(sizes, [rows[str(s)][key] for s in sizes], style,
                        label=key.removesuffix("_mb_s").replace("_", " "))
        ax.set(title=f"{store}: throughput", xlabel="model size (MB)", ylabel="MB/s")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    ax = fig.axes[2]
    cg = result["cross_group"]
    labels = [f"G={g}" for g in cg]
    xs = range(len(cg))
    ax.bar([x - 0.2 for x in xs], [c["allreduce_bytes_per_step"] / 1e3 for c in cg.values()],
           width=0.4, label="ring all-reduce 2(G-1)/G x model")
    ax.bar([x + 0.2 for x in xs], [c["sent_bytes_per_step"] / 1e3 for c in cg.values()],
           width=0.4, label="codistill, sent (measured)")
    ax.set_xticks(range(len(cg)), labels)
    ax.set(title="cross-group traffic per group-step", ylabel="kB per step", yscale="log")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")
    return fig


def main() -> None:
    p = common.parser(__doc__.splitlines()[0])
    args = p.parse_args()
    bench = common.Bench("exchange_io")
    sizes, repeats = ([10, 100], 2) if args.quick else ([10, 100, 1000, 4000], 3)
    stores: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="codistill-bench-io-") as folder:
        stores["local"] = measure_store(Bucket(Path(folder).as_uri()), sizes, repeats)
    with common.moto_server() as endpoint:
        s3 = Bucket(f"s3://{common.BUCKET}", endpoint, common.CREDENTIALS)
        stores["moto_s3"] = measure_store(s3, sizes, repeats)
    steps = 4 * EXCHANGE if args.quick else 10 * EXCHANGE
    result = {
        "quick": args.quick, "sizes_mb": sizes, "repeats": repeats, "stores": stores,
        "publish_vs_raw": {s: {m: r["publish_mb_s"] / r["raw_put_mb_s"] for m, r in rows.items()}
                           for s, rows in stores.items()},
        "fetch_vs_raw": {s: {m: r["fetch_mb_s"] / r["raw_get_mb_s"] for m, r in rows.items()}
                         for s, rows in stores.items()},
        "cross_group": {str(g): cross_group(g, steps) for g in (2, 4)},
    }
    common.show("throughput ratio ours / raw (1 = no overhead)",
                [(s, m, result["publish_vs_raw"][s][m], result["fetch_vs_raw"][s][m])
                 for s in stores for m in stores[s]], ["store", "MB", "publish", "fetch"])
    common.show("cross-group bytes per group-step",
                [(g, c["model_bytes"], c["sent_bytes_per_step"], c["received_bytes_per_step"],
                  c["allreduce_bytes_per_step"]) for g, c in result["cross_group"].items()],
                ["G", "model", "sent", "received", "ring all-reduce"])
    bench.write(args.out, result, SCHEMA, plot(result))


if __name__ == "__main__":
    main()
