"""Section 3: what codistillation costs per step, split into its parts, against its floors.

One group's training step with and without distillation (G = 1, 2, 4), measured on the real loop
with the real background publisher and pollers (`pollIntervalSeconds` 1, the default): the groups
of a run are stepped in turn in one process, one torch thread, and every part is timed where it
runs (medians over rounds that take turns between G = 1, 2 and 4, so that load from other
processes on this shared machine falls on all alike):
- student forward (training mode) and backward + optimizer step;
- teacher forward: the G-1 stale peers on the same batch (inference mode);
- the distillation term;
- exchange work on the training thread: handing weights to the publisher and swapping in teachers
  at a reload boundary (fetching, verifying and decoding run in background threads).
Floors: teachers cost about G-1 student forwards (`teacher_cost_ratio` = teacher time / student
forward / (G-1)), and the exchange costs the training thread almost nothing
(`exchange_overhead_fraction` = exchange time / iteration time).

    python -m bench.overhead [--quick]
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any
from unittest import mock

from matplotlib.figure import Figure

from bench import common, sim
from codistill.storage import Bucket
from codistill_trainer import loop as train

SCHEMA: common.Schema = {"exchange_overhead_fraction": {"*": {}}, "teacher_cost_ratio": {"*": {}},
                         "groups": {"*": {"iteration_s": {}, "parts_s": {}}}}
TASK = {"name": "lm", "args": {"seq_len": 64, "embed": 64, "hidden": 128}}  # the quickstart model
EXCHANGE = 25  # exchangeEverySteps = reloadEverySteps
PARTS = ("student_forward", "backward_optimizer", "teacher_forward", "distill_term",
         "exchange_on_thread", "other")


class Stopwatch:
    """Total seconds and calls per named part, by wrapping the callables that do each part."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self._restore: list[Callable[[], None]] = []

    def timed(self, key: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - start
                self.calls[key] = self.calls.get(key, 0) + 1

        return wrapper

    def wrap(self, obj: Any, attr: str, key: str) -> None:
        """Time `obj.attr` (an instance attribute shadowing the method) until `restore()`."""
        setattr(obj, attr, self.timed(key, getattr(obj, attr)))
        self._restore.append(lambda: delattr(obj, attr))

    def restore(self) -> None:
        for undo in reversed(self._restore):
            undo()

    def get(self, key: str) -> float:
        return self.seconds.get(key, 0.0)


def spec_doc(groups: int, batch: int, steps: int) -> dict[str, Any]:
    return {
        "groups": groups, "task": TASK,
        "training": {"steps": steps, "batchSize": batch, "evalEverySteps": steps,
                     "evalBatches": 1, "checkpointEverySteps": steps},
        "distillation": {"burnInSteps": 0, "exchangeEverySteps": EXCHANGE,
                         "reloadEverySteps": EXCHANGE, "maxStalenessSteps": 100 * EXCHANGE,
                         "pollIntervalSeconds": 0.2},
    }


@contextmanager
def instrumented(group_loops: list[train.Loop]) -> Iterator[Stopwatch]:
    """Time every part of every group's step; the groups share one Task object (sim.loops)."""
    sw = Stopwatch()
    for loop in group_loops:
        for attr in ("step", "after_step", "publish"):
            sw.wrap(loop, attr, attr)
        if loop.teachers:
            sw.wrap(loop.teachers, "refresh", "refresh")
            sw.wrap(loop.teachers, "logits", "teacher_forward")
    sw.wrap(group_loops[0].task, "forward", "forward")
    try:
        with mock.patch.object(train, "codistill_loss", sw.timed("distill", train.codistill_loss)):
            yield sw
    finally:
        sw.restore()


def warm_up(group_loops: list[train.Loop], limit: int) -> int:
    """Untimed steps until every group distills from all its peers; returns the next step."""
    step = 0
    while step < limit:
        if all(not lp.teachers or len(lp.teachers.steps) == len(lp.teachers.peers)
               for lp in group_loops):
            break
        for loop in group_loops:
            loop.step(step)
        for loop in group_loops:
            loop.after_step(step + 1)
        step += 1
    return step


def measure(groups: tuple[int, ...], batch: int, steps: int, rounds: int) -> dict[str, Any]:
    """Per G, the median over `rounds` of each part's seconds per group-step; in every round
    each G is timed for `steps` steps in turn, so load from elsewhere hits them alike."""
    limit = 20 * EXCHANGE
    with ExitStack() as stack:
        runs = {}
        for g in groups:
            run = sim.manifest(f"overhead-g{g}", spec_doc(g, batch, limit + rounds * steps + 1))
            folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="codistill-bench-"))
            group_loops = stack.enter_context(sim.loops(run, Bucket(Path(folder).as_uri())))
            start = warm_up(group_loops, limit)
            if g > 1 and start == limit:
                raise RuntimeError(f"G={g}: teachers were not loaded after {limit} steps")
            runs[g] = (group_loops, start)
        samples: dict[int, list[dict[str, Any]]] = {g: [] for g in groups}
        for r in range(rounds):
            for g, (group_loops, start) in runs.items():
                first = start + r * steps
                with instrumented(group_loops) as sw:
                    for step in range(first, first + steps):
                        for loop in group_loops:
                            loop.step(step)
                        for loop in group_loops:
                            loop.after_step(step + 1)
                samples[g].append(breakdown(sw, g * steps))
    return {str(g): median(found) for g, found in samples.items()}


def median(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Each part's median over rounds; the iteration is their sum, so the parts add up."""
    parts = {k: statistics.median(r["parts_s"][k] for r in rounds) for k in PARTS}
    return {"iteration_s": sum(parts.values()), "parts_s": parts,
            "iteration_s_per_round": [r["iteration_s"] for r in rounds],
            "exchanges": sum(r["exchanges"] for r in rounds),
            "reloads": sum(r["reloads"] for r in rounds)}


def breakdown(sw: Stopwatch, group_steps: int) -> dict[str, Any]:
    """Per group-step seconds of each part, derived from the wrapped totals."""
    per = {k: v / group_steps for k, v in sw.seconds.items()}
    teacher = per.get("teacher_forward", 0.0)
    forward = per.get("forward", 0.0) - teacher  # teachers run through the same task.forward
    exchange = per.get("publish", 0.0) + per.get("refresh", 0.0)
    parts = {
        "student_forward": forward,
        "backward_optimizer": per["step"] - per.get("forward", 0.0) - per.get("distill", 0.0),
        "teacher_forward": teacher,
        "distill_term": per.get("distill", 0.0),
        "exchange_on_thread": exchange,
        "other": per["after_step"] - exchange,
    }
    return {"iteration_s": per["step"] + per["after_step"], "parts_s": parts,
            "exchanges": sw.calls.get("publish", 0), "reloads": sw.calls.get("refresh", 0)}


def plot(result: dict[str, Any]) -> Figure:
    fig = common.figure(cols=1, size=(6.5, 4.2))
    ax = fig.axes[0]
    labels = [f"G={g}" for g in result["groups"]]
    bottom = [0.0] * len(labels)
    for i, part in enumerate(PARTS):
        ms = [1000 * r["parts_s"][part] for r in result["groups"].values()]
        ax.bar(labels, ms, bottom=bottom, label=part.replace("_", " "), color=f"C{i}")
        bottom = [b + m for b, m in zip(bottom, ms)]
    base = result["groups"]["1"]["parts_s"]
    floors = [1000 * (sum(base.values()) + (int(g) - 1) * base["student_forward"])
              for g in result["groups"]]
    ax.plot(labels, floors, "k_", markersize=40, label="floor: G=1 + (G-1) forwards")
    ax.set(title="one group's step, by part", ylabel="ms per step")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")
    return fig


def main() -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32)
    args = p.parse_args()
    bench = common.Bench("overhead")
    steps, rounds = (EXCHANGE, 3) if args.quick else (2 * EXCHANGE, 7)
    groups = measure((1, 2, 4), args.batch, steps, rounds)
    result = {"quick": args.quick, "task": TASK, "batch": args.batch, "timed_steps": steps,
              "rounds": rounds,
              "exchange_every_steps": EXCHANGE, "groups": groups,
              "exchange_overhead_fraction": {
                  g: r["parts_s"]["exchange_on_thread"] / r["iteration_s"]
                  for g, r in groups.items() if g != "1"},
              "teacher_cost_ratio": {g: r["parts_s"]["teacher_forward"]
                                     / r["parts_s"]["student_forward"] / (int(g) - 1)
                                     for g, r in groups.items() if g != "1"},
              "slowdown_vs_g1": {g: r["iteration_s"] / groups["1"]["iteration_s"]
                                 for g, r in groups.items()}}
    common.show("ms per group-step", [(f"G={g}", 1000 * r["iteration_s"],
                                        *(1000 * r["parts_s"][p] for p in PARTS))
                                       for g, r in groups.items()], ["", "iteration", *PARTS])
    common.show("against the floors", [(g, result["teacher_cost_ratio"][g],
                                        result["exchange_overhead_fraction"][g])
                                       for g in result["teacher_cost_ratio"]],
                ["G", "teacher_cost_ratio", "exchange_overhead_fraction"])
    bench.write(args.out, result, SCHEMA, plot(result))


if __name__ == "__main__":
    main()
