"""What every benchmark shares: result files with provenance, summary statistics, the
steps-to-target maths, and plots.

A result is only worth keeping if it says where it came from: every file records the machine (and
its load average, since this machine's 2 cores are shared and timings are noisy under load), the
date, the git commit and the exact command. The maths here is pure and tested in
tests/test_bench.py; the benchmarks themselves are never part of the test suite.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

from matplotlib.figure import Figure

from codistill.net import free_port
from codistill.storage import Bucket

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
Curve = Sequence[tuple[float, float]]  # (step, eval loss), steps increasing
Schema = dict[str, Any]  # {key: sub-schema}; "*" matches every key of a mapping; {} = must exist
BUCKET = "codistill-bench"  # on the benchmarks' own moto server
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "bench-key", "AWS_SECRET_ACCESS_KEY": "bench-secret"}


def parser(description: str) -> argparse.ArgumentParser:
    """The common command line: `--quick` for the reduced version `make bench-quick` runs."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="reduced version (minutes, not hours)")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for <name>.json and .png")
    return p


def add_device(p: argparse.ArgumentParser) -> None:
    """`--device`, for the benchmarks that train through bench/sim.py (sections 1 and 2)."""
    p.add_argument("--device", default="cpu",
                   help="torch device the models train on: cpu (default), cuda, cuda:1, ...")


LR, LR_BATCH = 3e-3, 32


def lr_for(batch: int, lr: float = LR, at: int = LR_BATCH) -> float:
    """The learning rate of sections 1 and 2 at `batch`: `lr` at batch `at`, scaled by
    sqrt(batch / at) (the square-root rule). One rule for every arm, so that no arm, the
    synchronous baseline at 2B least of all, trains at a learning rate tuned for another batch;
    section 1 checks the rule against its neighbours."""
    return lr * math.sqrt(batch / at)


def git_commit() -> dict[str, Any]:
    """HEAD and whether the tree had uncommitted changes (read-only git calls)."""
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}  # `git status` must not touch the index

    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True,
                              env=env, check=False)
        return done.stdout.strip() if done.returncode == 0 else ""

    return {"commit": git("rev-parse", "HEAD") or None, "dirty": bool(git("status", "--porcelain"))}


class Bench:
    """One benchmark run: remembers how it was started, then writes its result with provenance."""

    def __init__(self, name: str, argv: Sequence[str] | None = None) -> None:
        import torch

        torch.set_num_threads(1)  # one thread per process: 2 shared cores, and comparable runs
        self.name = name
        args = list(sys.argv[1:] if argv is None else argv)
        self.command = shlex.join(["python", "-m", f"bench.{name}", *args])
        self.started = time.time()
        self.load_start = os.getloadavg()

    def provenance(self) -> dict[str, Any]:
        import torch

        return {
            "command": self.command,
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "git": git_commit(),
            "wall_s": round(time.time() - self.started, 1),
            "machine": {
                "platform": platform.platform(),
                "python": platform.python_version(),
                "torch": torch.__version__,
                "cpus": os.cpu_count(),
                "torch_threads": torch.get_num_threads(),
                "loadavg_start": [round(x, 2) for x in self.load_start],
                "loadavg_end": [round(x, 2) for x in os.getloadavg()],
                "gpu": None,
            },
        }

    def write(self, out: Path, doc: dict[str, Any], schema: Schema, fig: Figure) -> Path:
        """Check `doc` against `schema`, then write `<name>.json` and `<name>.png` under `out`."""
        check(doc, schema, self.name)
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"{self.name}.json"
        full = {"name": self.name, "provenance": self.provenance(), **doc}
        path.write_text(json.dumps(full, indent=1, sort_keys=False, allow_nan=False) + "\n")
        fig.savefig(out / f"{self.name}.png", dpi=90)
        print(f"wrote {path} and {self.name}.png ({full['provenance']['wall_s']} s)")
        return path


class CountingBucket(Bucket):
    """A Bucket that counts its calls by kind (`calls`; get_json, read_into and put_json count as
    get and put), and the bytes written and read under each group's teacher channel by blob suffix
    (`sent`, `received`)."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.calls: Counter[str] = Counter()
        self.sent: Counter[str] = Counter()
        self.received: Counter[str] = Counter()
        self._lock = threading.Lock()

    def _count(self, kind: str) -> None:
        with self._lock:
            self.calls[kind] += 1  # before the call: a request is made, found or not

    def _moved(self, moved: Counter[str], rel: str, size: int) -> None:
        if "/teacher/" in rel:
            with self._lock:
                moved[rel.rsplit("/", 1)[-1].split(".")[-1]] += size

    def get(self, rel: str, limit: int | None = None) -> bytes:
        self._count("get")
        data = super().get(rel, limit)
        self._moved(self.received, rel, len(data))
        return data

    def read_into(self, rel: str, buf: bytearray) -> int:
        self._count("get")
        got = super().read_into(rel, buf)
        self._moved(self.received, rel, min(got, len(buf)))
        return got

    def put_stream(self, rel: str, write: Callable[[BinaryIO], Any]) -> None:
        self._count("put")  # put() streams too
        sizes: list[int] = []

        def counted(f: BinaryIO) -> None:
            start = f.tell()
            write(f)
            sizes.append(f.tell() - start)

        super().put_stream(rel, counted)
        self._moved(self.sent, rel, sizes[-1])

    def size(self, rel: str) -> int:
        self._count("size")
        return super().size(rel)

    def exists(self, rel: str) -> bool:
        self._count("exists")
        return super().exists(rel)

    def ls(self, rel: str) -> list[str]:
        self._count("ls")
        return super().ls(rel)

    def rm(self, rel: str) -> None:
        self._count("rm")
        super().rm(rel)

    def taken(self) -> dict[str, int]:
        """The calls counted since the last call, reset."""
        with self._lock:
            found, self.calls = dict(self.calls), Counter()
        return found


@contextmanager
def moto_server() -> Iterator[str]:
    """moto's S3 server in its own process (so it shares no GIL with the client); yields its
    endpoint, with bucket BUCKET created."""
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")  # s3fs creates buckets there
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1",
                             "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(300):
            try:
                urllib.request.urlopen(endpoint, timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        Bucket(f"s3://{BUCKET}", endpoint, CREDENTIALS).ensure()
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(10)


def check(doc: Any, schema: Schema, where: str) -> None:
    """Raise ValueError naming the first missing key; `*` applies to every key of a mapping."""
    if not schema:
        return
    if not isinstance(doc, dict):
        raise ValueError(f"{where}: expected a mapping with keys {sorted(schema)}, got {doc!r}")
    for key, sub in schema.items():
        if key == "*":
            if not doc:
                raise ValueError(f"{where}: expected at least one entry")
            for k, v in doc.items():
                check(v, sub, f"{where}.{k}")
        elif key not in doc:
            raise ValueError(f"{where}: missing key {key!r}")
        else:
            check(doc[key], sub, f"{where}.{key}")


def summary(values: Iterable[float]) -> dict[str, Any]:
    """Mean and spread of repeated measurements (sample standard deviation; 0 for one value)."""
    xs = [float(v) for v in values]
    if not xs:
        raise ValueError("summary: no values")
    std = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return {"mean": statistics.fmean(xs), "std": std, "min": min(xs), "max": max(xs),
            "n": len(xs), "values": xs}


def quantile(values: Sequence[float], q: float) -> float:
    """The q-quantile with linear interpolation between order statistics (numpy's default)."""
    xs = sorted(values)
    if not xs or not 0 <= q <= 1:
        raise ValueError(f"quantile: need values and 0 <= q <= 1, got {len(xs)} values, q={q}")
    pos = q * (len(xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def best(curve: Curve) -> float:
    """The lowest eval loss on a curve."""
    return min(loss for _, loss in curve)


def steps_to_target(curve: Curve, target: float) -> float | None:
    """Steps until the eval loss first reaches `target`, or None if it never does.

    Evals are sparse, so the crossing is interpolated linearly between the last eval above the
    target and the first at or below it; a curve that starts at or below the target gives its
    first step.
    """
    prev: tuple[float, float] | None = None
    for step, loss in curve:
        if loss <= target:
            if prev is None:
                return float(step)
            s0, l0 = prev
            return s0 + (step - s0) * (l0 - target) / (l0 - loss)
        prev = (step, loss)
    return None


def smooth(curve: Curve, window: int) -> list[tuple[float, float]]:
    """A centred moving average over `window` eval points (fewer at the ends).

    Eval losses are noisy; the best point of a raw curve is partly luck, and an average of
    several groups' curves is less noisy than one run's, so the crossing of a raw minimum would
    favour whichever side is noisier. Both sides are smoothed alike before comparing.
    """
    half = window // 2
    losses = [loss for _, loss in curve]
    return [(step, statistics.fmean(losses[max(0, i - half) : i + half + 1]))
            for i, (step, _) in enumerate(curve)]


def mean_curve(curves: Sequence[Curve]) -> list[tuple[float, float]]:
    """The pointwise mean of curves evaluated at the same steps (e.g. the groups of one run)."""
    steps = [[s for s, _ in c] for c in curves]
    if not curves or any(s != steps[0] for s in steps):
        raise ValueError("mean_curve: curves must be non-empty and share their steps")
    return [(s, statistics.fmean(c[i][1] for c in curves)) for i, s in enumerate(steps[0])]


def plateau(points: Sequence[tuple[int, float]], threshold: float) -> int | None:
    """The smallest batch beyond which no doubling cuts the steps to target below `threshold`
    times the steps before it (perfect scaling halves them: 0.5); None when the last doubling
    still helps. Every later doubling must fail too, so one noisy point early on does not end
    the curve.

    `points` are (batch, steps to target) with each batch twice the previous one.
    """
    for (b0, _), (b1, _) in zip(points, points[1:]):
        if b1 != 2 * b0:
            raise ValueError(f"plateau: batches must double, got {b0} then {b1}")
    found = None
    for (b0, s0), (_, s1) in reversed(list(zip(points, points[1:]))):
        if s1 / s0 <= threshold:
            break
        found = b0
    return found


def compare(baseline: Curve, codistill: Curve) -> dict[str, Any]:
    """Steps to the baseline's best eval loss for the baseline and for codistillation (pass
    both curves smoothed alike).

    A codistillation run that never reaches the target within its budget is censored: its steps
    are taken as the budget (its last step), so the ratio is a lower bound, and `reached` says so.
    """
    target = best(baseline)
    base_steps = steps_to_target(baseline, target)
    codist_steps = steps_to_target(codistill, target)
    reached = codist_steps is not None
    if codist_steps is None:
        codist_steps = float(codistill[-1][0])
    assert base_steps is not None  # the baseline reaches its own best
    return {"target": target, "baseline_steps": base_steps, "codistill_steps": codist_steps,
            "ratio": codist_steps / base_steps if base_steps else None, "reached": reached,
            "codistill_best": best(codistill)}


def figure(cols: int = 1, rows: int = 1, size: tuple[float, float] = (5.5, 4.0)) -> Figure:
    """A bare matplotlib Figure (Agg, no pyplot state): `cols` x `rows` panels of `size` inches."""
    fig = Figure(figsize=(size[0] * cols, size[1] * rows), layout="constrained")
    fig.subplots(rows, cols, squeeze=False)
    return fig


def show(title: str, rows: Sequence[Sequence[Any]], header: Sequence[str]) -> None:
    """Print a small aligned table to stdout (what the benchmark measured, at a glance)."""
    cells = [[str(h) for h in header]] + [[fmt(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    print(f"\n{title}")
    for r in cells:
        print("  " + "  ".join(c.rjust(w) for c, w in zip(r, widths)))


def fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)
