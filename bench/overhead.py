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
    python -m bench.overhead --device cuda --precision bf16 --size gpu --out bench/results/gpu

`--size gpu` is a model that means something on one H100/H200: the `lm` LSTM with 2 layers of
4096 units (about 210 M parameters), sequences of 128, batch 32; on a GPU the stopwatch
synchronises the device around every part, and the result adds each G's peak device memory.
`tests/unit/test_bench.py` runs a CPU smoke version of that path.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from matplotlib.figure import Figure

from bench import common, sim
from codistill.storage import Bucket
from codistill_trainer import loop as train

SCHEMA: common.Schema = {"exchange_overhead_fraction": {"*": {}}, "teacher_cost_ratio": {"*": {}},
                         "groups": {"*": {"iteration_s": {}, "parts_s": {}}}}
# --size: the quickstart model (the figures below), or one sized for a GPU (about 210 M parameters)
SIZES = {"toy": ({"name": "lm", "args": {"seq_len": 64, "embed": 64, "hidden": 128}}, 32),
         "gpu": ({"name": "lm", "args": {"seq_len": 128, "embed": 512, "hidden": 4096,
                                         "layers": 2}}, 32)}
TASK = SIZES["toy"][0]
EXCHANGE = 25  # exchangeEverySteps = reloadEverySteps
PARTS = ("student_forward", "backward_optimizer", "teacher_forward", "distill_term",
         "exchange_on_thread", "other")


class Stopwatch:
    """Total seconds and calls per named part, by wrapping the callables that do each part."""

    def __init__(self, sync: Callable[[], None] = lambda: None) -> None:
        """`sync` waits for the device (torch.cuda.synchronize on a GPU): a part's time is then
        its work, not the time to queue it."""
        self.sync = sync
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self._restore: list[Callable[[], None]] = []

    def timed(self, key: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            self.sync()
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.sync()
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


@dataclass(frozen=True)
class Setup:
    """What is measured and where: the task (`--size`), the device and training.precision."""

    task: dict[str, Any] = field(default_factory=lambda: TASK)
    device: str = "cpu"
    precision: str = "fp32"

    def sync(self) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize(self.device)


def spec_doc(groups: int, batch: int, steps: int, setup: Setup = Setup()) -> dict[str, Any]:
    return {
        "groups": groups, "task": setup.task,
        "training": {"steps": steps, "batchSize": batch, "evalEverySteps": steps,
                     "evalBatches": 1, "checkpointEverySteps": steps,
                     "precision": setup.precision},
        "distillation": {"burnInSteps": 0, "exchangeEverySteps": EXCHANGE,
                         "reloadEverySteps": EXCHANGE, "maxStalenessSteps": 100 * EXCHANGE,
                         "pollIntervalSeconds": 0.2},
    }


@contextmanager
def instrumented(group_loops: list[train.Loop],
                 sync: Callable[[], None] = lambda: None) -> Iterator[Stopwatch]:
    """Time every part of every group's step; the groups share one Task object (sim.loops)."""
    sw = Stopwatch(sync)
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
        if all(not lp.teachers or len(lp.teachers.steps) == len(lp.teachers.draw.at(step))
               for lp in group_loops):
            break
        for loop in group_loops:
            loop.step(step)
        for loop in group_loops:
            loop.after_step(step + 1)
        step += 1
    return step


def measure(groups: tuple[int, ...], batch: int, steps: int, rounds: int,
            setup: Setup = Setup()) -> dict[str, Any]:
    """Per G, the median over `rounds` of each part's seconds per group-step; in every round
    each G is timed for `steps` steps in turn, so load from elsewhere hits them alike. With a
    CUDA device, also each G's peak device memory during its steps."""
    limit = 20 * EXCHANGE
    on = sim.device(setup.device)
    with ExitStack() as stack:
        runs, resident = {}, {}
        for g in groups:
            doc = spec_doc(g, batch, limit + rounds * steps + 1, setup)
            run = sim.manifest(f"overhead-g{g}", doc)
            folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="codistill-bench-"))
            before = allocated(on)
            group_loops = stack.enter_context(sim.loops(run, Bucket(Path(folder).as_uri()), on))
            start = warm_up(group_loops, limit)
            resident[g] = allocated(on) - before  # models, optimizers, teachers of this G
            if g > 1 and start == limit:
                raise RuntimeError(f"G={g}: teachers were not loaded after {limit} steps")
            runs[g] = (group_loops, start)
        samples: dict[int, list[dict[str, Any]]] = {g: [] for g in groups}
        transient: dict[int, int] = {}
        for r in range(rounds):
            for g, (group_loops, start) in runs.items():
                first = start + r * steps
                if on.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(on)
                at_start = allocated(on)
                with instrumented(group_loops, setup.sync) as sw:
                    for step in range(first, first + steps):
                        for loop in group_loops:
                            loop.step(step)
                        for loop in group_loops:
                            loop.after_step(step + 1)
                samples[g].append(breakdown(sw, g * steps))
                if on.type == "cuda":  # activations, gradients, the term's tensors
                    peak = torch.cuda.max_memory_allocated(on) - at_start
                    transient[g] = max(transient.get(g, 0), peak)
        teacher = teacher_bytes(runs[max(runs)][0])
    cuda = on.type == "cuda"
    return {str(g): {**median(found), "resident_device_bytes": resident[g] if cuda else None,
                     "step_device_bytes": transient.get(g),
                     "teacher_bytes_per_peer": teacher if g > 1 else None}
            for g, found in samples.items()}


def allocated(on: torch.device) -> int:
    """Bytes the device's caching allocator holds for tensors (0 on a CPU: not measured)."""
    return torch.cuda.memory_allocated(on) if on.type == "cuda" else 0


def teacher_bytes(group_loops: list[train.Loop]) -> int | None:
    """Bytes of one teacher's parameters as held (halved by training.precision bf16)."""
    teachers = group_loops[0].teachers
    if not teachers or not teachers.models:
        return None
    model = next(iter(teachers.models.values()))
    return sum(p.numel() * p.element_size() for p in model.parameters())


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
    p.add_argument("--batch", type=int, help="examples per step (default: the size's, 32)")
    common.add_device(p)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="training.precision of every run")
    p.add_argument("--size", choices=sorted(SIZES), default="toy",
                   help="toy: the quickstart model; gpu: about 210 M parameters")
    args = p.parse_args()
    bench = common.Bench("overhead")
    task, batch = SIZES[args.size]
    setup = Setup(task, args.device, args.precision)
    steps, rounds = (EXCHANGE, 3) if args.quick else (2 * EXCHANGE, 7)
    groups = measure((1, 2, 4), args.batch or batch, steps, rounds, setup)
    result = {"quick": args.quick, "task": task, "device": args.device,
              "precision": args.precision, "batch": args.batch or batch, "timed_steps": steps,
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
