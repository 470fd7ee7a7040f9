"""The real trainer, several groups in one process, stepped in lockstep: cheap and deterministic.

Sections 1-2 need dozens of runs, so instead of `codistill run` (a process per worker) each run
builds one `Loop(Member(run, g, 0, 1, bucket, cpu))` per group over one local-folder bucket and
interleaves their steps: `loop.step(s)` for every group, then `loop.after_step(s + 1)`. That is
the trainer's own step, distillation, publishing, polling and teacher swapping, with world size 1
(a group of one process computes exactly what DDP computes for the same total batch, so
"synchronous SGD at 2x batch" is `groups: 1` with `batchSize` doubled).

Teacher staleness is made deterministic: the pollers' background loops are parked (a long
`pollIntervalSeconds`), and right before every reload boundary the bench waits for the groups'
uploads and polls once itself. At a reload at step t a group therefore swaps in what its peers
published at the previous exchange boundary; with exchangeEverySteps = reloadEverySteps = K the
teacher is between K and 2K-1 steps stale, as in a real run whose poll finds a publish late.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import cache
from multiprocessing import get_context
from pathlib import Path
from typing import Any
from unittest import mock

import torch

from codistill import spec
from codistill.storage import Bucket
from codistill_trainer import loop as train
from codistill_trainer import report
from codistill_trainer.tasks import resolve
from codistill_trainer.tasks.base import Batch, Task

CPU = torch.device("cpu")
PARKED = 3600.0  # pollIntervalSeconds: the pollers' own loops never poll again after starting


def manifest(name: str, spec_doc: dict[str, Any]) -> spec.Codistillation:
    """A validated run from a spec mapping, through the same parser `codistill run` uses."""
    doc = {"apiVersion": f"{spec.API_GROUP}/{spec.API_VERSION}", "kind": spec.KIND,
           "metadata": {"name": name}, "spec": spec_doc}
    return spec.parse(doc, f"bench run {name}")


@cache
def task_of(name: str, args_key: tuple[tuple[str, Any], ...]) -> Task:
    """One Task per (name, args) in this process: every Loop would otherwise re-read and
    re-encode the same data (about 2 s for `ctr`). Tasks are read-only once loaded."""
    return resolve(name, dict(args_key))


def shared_task(name: str, args: dict[str, Any]) -> Task:
    return task_of(name, tuple(sorted(args.items())))


def device(name: str) -> torch.device:
    """The torch device `--device` names (cpu, cuda, cuda:1, ...), refused in one line when this
    machine has none such: a benchmark must not fall back to the CPU and report CPU figures."""
    try:
        found = torch.device(name)
    except RuntimeError as e:
        raise SystemExit(f"--device {name}: {e}") from None
    if found.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: torch sees no CUDA device on this machine")
    return found


@contextmanager
def loops(run: spec.Codistillation, bucket: Bucket,
          on: torch.device = CPU) -> Iterator[list[train.Loop]]:
    """One Loop per group over `bucket`, training on `on`, stopped (threads joined) on exit."""
    with mock.patch.object(train, "resolve", shared_task):
        built = [train.Loop(train.Member(run, g, 0, 1, bucket, on))
                 for g in range(run.spec.groups)]
    try:
        yield built
    finally:
        for loop in built:
            if loop.teachers:
                loop.teachers.stop()
            loop.uploader.close()


def boundary(group_loops: Sequence[train.Loop], done: int) -> None:
    """Periodic work after `done` steps; first, at a reload boundary, make every publish so far
    visible to every poller so that what each group swaps in does not depend on thread timing."""
    reload = group_loops[0].spec.distillation.reload_every_steps
    if len(group_loops) > 1 and done % reload == 0:
        for loop in group_loops:
            loop.uploader.flush()
        for loop in group_loops:  # each a group's rank 0: it has the poller
            loop.teachers.poller.poll_once()
    for loop in group_loops:
        loop.after_step(done)


@dataclass(frozen=True)
class Job:
    """One run to train: its spec and how to evaluate it (on a fixed eval set)."""

    name: str
    spec: dict[str, Any]
    eval_every: int
    eval_size: tuple[int, int]  # (batch size, batches): the same set for every run of a task
    # steps at which to keep each group's class probabilities on the eval set (each an eval step)
    predictions: tuple[int, ...] = ()
    device: str = "cpu"  # where the groups train (`--device`); eval batches go there too


@dataclass
class Outcome:
    job: Job
    curves: dict[int, list[tuple[int, float]]]  # group -> (step, eval loss)
    accuracy: dict[int, float]  # group -> final eval accuracy
    probs: dict[int, dict[int, torch.Tensor]] = field(default_factory=dict)  # step -> group -> p
    seconds: float = 0.0
    # (step, eval loss) of the groups' ensemble, the mean of their softmaxes (empty for 1 group)
    ensemble: list[tuple[int, float]] = field(default_factory=list)


def eval_set(job: Job) -> list[Batch]:
    t = job.spec["task"]
    return shared_task(t["name"], t.get("args", {})).eval_data(*job.eval_size)


def run(job: Job, make_bucket: Callable[[str], Bucket] = Bucket) -> Outcome:
    """Train `job` in this process on a fresh local folder as the bucket (`make_bucket(url)`,
    e.g. a Bucket that counts bytes); eval every `eval_every` steps."""
    torch.set_num_threads(1)
    started = time.perf_counter()
    on = device(job.device)
    the_run = manifest(job.name, job.spec)
    batches = [train.to_device(b, on) for b in eval_set(job)]
    curves: dict[int, list[tuple[int, float]]] = {g: [] for g in range(the_run.spec.groups)}
    accuracy: dict[int, float] = {}
    ensemble: list[tuple[int, float]] = []
    probs: dict[int, dict[int, torch.Tensor]] = {}
    with tempfile.TemporaryDirectory(prefix="codistill-bench-") as folder:
        with loops(the_run, make_bucket(Path(folder).as_uri()), on) as group_loops:
            task = group_loops[0].task
            targets = torch.cat([task.targets(b).cpu() for b in batches])

            def record(done: int) -> None:
                # the run report's own maths: each group's loss and accuracy, their ensemble's loss
                with torch.inference_mode():
                    found = {g: report.predict(task, loop.model, batches)
                             for g, loop in enumerate(group_loops)}
                for g, (loss, p) in found.items():
                    curves[g].append((done, loss))
                    accuracy[g] = report.accuracy(p, targets)
                if len(found) > 1:
                    mean = report.ensemble([p for _, p in found.values()])
                    ensemble.append((done, report.nll(mean, targets)))
                if done in job.predictions:
                    probs[done] = {g: p for g, (_, p) in found.items()}

            record(0)
            for step in range(the_run.spec.training.steps):
                for loop in group_loops:
                    loop.step(step)
                boundary(group_loops, step + 1)
                if (step + 1) % job.eval_every == 0 or step + 1 == the_run.spec.training.steps:
                    record(step + 1)
    return Outcome(job, curves, dict(accuracy), probs, time.perf_counter() - started, ensemble)


def run_all(jobs: Sequence[Job], workers: int, on: str = "cpu") -> list[Outcome]:
    """Run independent jobs, `workers` processes at a time (1 thread each), training on device
    `on`; results in order."""
    device(on)  # refused here, before any job starts
    jobs = [replace(job, device=on) for job in jobs]
    if workers <= 1:
        return [_announce(run(job)) for job in jobs]
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        return [_announce(o) for o in pool.map(run, jobs)]


def _announce(outcome: Outcome) -> Outcome:
    final = {g: round(c[-1][1], 4) for g, c in outcome.curves.items()}
    print(f"  {outcome.job.name}: final eval loss {final} ({outcome.seconds:.0f} s)", flush=True)
    return outcome
