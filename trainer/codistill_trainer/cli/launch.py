"""`codistill run`: the same manifest a cluster runs, as local processes (the embedded default).

It renders the very PyTorchJobs the operator would create, and starts each replica's `pytorch`
container command as a local process with the environment the Kubeflow Training Operator injects
(see kubeflow.py) plus the container's own env, secrets resolved from the caller's environment.
A local folder is the bucket unless `storage.url` names one.
A crashed worker or Ctrl-C stops every process, with a clear message and a non-zero exit.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.text import Text

from codistill import names
from codistill.net import free_port
from codistill.pytorchjob import render_jobs
from codistill.runfolder import RunFolder
from codistill.spec import Codistillation, SpecError
from codistill.storage import Bucket

from .. import tables
from . import kubeflow

DEFAULT_STORAGE = "runs"  # local folder used as the bucket when storage.url is not set
STOP_GRACE_S = 5.0
PROCESSES_PER_CPU = 4  # more local processes than this per core: refused unless --force


class RunFailed(RuntimeError):
    """A worker exited non-zero; the message names it and ends with its log's tail."""


@dataclass
class Replica:
    """One pod of a PyTorchJob, as a local process."""

    name: str
    command: list[str]
    env: dict[str, str]
    log: Path
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)


def check_capacity(run: Codistillation, force: bool = False) -> None:
    """Refuse a local run of more processes than this machine can hold (a cluster spec of
    64 groups x 1024 pods would start 65,536 local processes), unless `force`."""
    cpus = os.cpu_count() or 1
    total = run.spec.groups * run.spec.world_size
    if total > PROCESSES_PER_CPU * cpus and not force:
        raise SpecError(
            f"spec: {run.spec.groups} group(s) x {run.spec.workers_per_group} worker(s) x "
            f"{run.spec.nproc_per_worker} process(es) = {total} local processes, more than "
            f"{PROCESSES_PER_CPU} x {cpus} CPUs can hold; use --force to start them anyway")


def local_run_url(run: Codistillation, cwd: Path) -> str:
    base = run.spec.storage.url or (cwd / DEFAULT_STORAGE).resolve().as_uri()
    return names.run_url(base, run.metadata.namespace, run.metadata.name)


def local_secret(environ: dict[str, str]) -> kubeflow.SecretLookup:
    """Locally, a secret's key is read from the caller's environment variable of that name."""
    def lookup(name: str, key: str) -> str:
        if key not in environ:
            raise SpecError(f"spec.storage.credentialsSecret: key {key} of secret {name} must be "
                            f"set as an environment variable for a local run")
        return environ[key]

    return lookup


def replicas(job: dict[str, Any], environ: dict[str, str], logs: Path, threads: int) -> list[Replica]:
    """Every pod of one PyTorchJob, ready to start; `threads` per process, so that all
    processes of all groups together use the machine's cores without oversubscribing them."""
    found = []
    for pod in kubeflow.pods(job, local_secret(environ), "127.0.0.1", free_port()):
        env = {**environ, "OMP_NUM_THREADS": str(threads), **pod.env}
        found.append(Replica(pod.name, pod.command, env, logs / f"{pod.name}.log"))
    return found


def prepare(run: Codistillation, bucket: Bucket, fresh: bool) -> RunFolder:
    """Write run.json; refuse to mix two different specs in one folder (a rerun of the same spec
    resumes). A local folder is created by the first write; a bucket must exist already (no
    bucket-level call: credentials may reach only the run's prefix)."""
    folder = RunFolder(bucket)
    if fresh and bucket.exists(names.RUN_JSON):
        for name in bucket.ls(""):
            bucket.rm(name)
    try:
        existing = folder.read_run()
    except SpecError as e:
        raise SpecError(f"{e}; use --fresh to start over") from None
    if existing is not None and existing.spec != run.spec:
        raise SpecError(f"{bucket.url} holds a run with a different spec; use --fresh to start "
                        f"over or rename metadata.name")
    folder.write_run(run)
    return folder


def start(reps: list[Replica]) -> None:
    for r in reps:
        r.log.parent.mkdir(parents=True, exist_ok=True)
        with r.log.open("ab") as out:
            r.proc = subprocess.Popen(r.command, env=r.env, stdout=out, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, start_new_session=True)


def stop(reps: list[Replica]) -> None:
    """SIGTERM every process group still running, then SIGKILL what is left after a grace period."""
    live = [r for r in reps if r.proc and r.proc.poll() is None]
    for r in live:
        _signal(r, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    for r in live:
        try:
            r.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _signal(r, signal.SIGKILL)
            r.proc.wait()


def _signal(r: Replica, sig: signal.Signals) -> None:
    try:
        os.killpg(r.proc.pid, sig)
    except ProcessLookupError:
        pass


# Where a crash's own account starts in a log. Under torchrun a log ends with its summary,
# which names only the signal ("SIGABRT"); the lines that say why come earlier.
CAUSE = re.compile(r"^(Traceback \(most recent call last\)|Fatal Python error|terminate called)")


def excerpt(path: Path, lines: int = 15) -> str:
    """The log's last `lines`, after the first crash account in it when that is further up."""
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    end = max(0, len(text) - lines)
    first = next((i for i, line in enumerate(text[:end]) if CAUSE.match(line)), None)
    if first is None:
        return "\n".join(text[end:])
    return "\n".join([*text[first : min(first + lines, end)], "...", *text[end:]])


def failed(reps: list[Replica]) -> Replica | None:
    return next((r for r in reps if r.proc and r.proc.poll() not in (None, 0)), None)


def supervise(reps: list[Replica], folder: RunFolder, run: Codistillation, console: Console) -> None:
    """Show live progress until every process exits; raise RunFailed on the first crash.

    `folder` is read on a background thread (`tables.ProgressWatch`): a hung store only makes
    the table older, never holds the crash detection here."""
    def table(view: tables.View) -> Any:
        return tables.progress_table(run.metadata.name, view, run.spec)

    def check() -> bool:
        bad = failed(reps)
        if bad:
            raise RunFailed(f"{bad.name} exited with code {bad.proc.returncode}; stopped the run. "
                            f"Log {bad.log}:\n{excerpt(bad.log)}")
        return all(r.proc.poll() == 0 for r in reps)

    with tables.ProgressWatch(folder, run.spec.groups) as watch:
        if console.is_terminal:
            with Live(table(watch.view), console=console, refresh_per_second=2) as live:
                while not check():
                    time.sleep(0.5)
                    live.update(table(watch.view))
                live.update(table(watch.read()))  # the final frame: how every group ended
        else:
            last = 0.0
            while not check():
                time.sleep(0.5)
                if time.monotonic() - last > 15:
                    console.print(table(watch.view))
                    last = time.monotonic()
            console.print(table(watch.read()))  # a terminal keeps Live's last frame; so must a log


def run_local(run: Codistillation, cwd: Path, fresh: bool, console: Console) -> RunFolder:
    """Run every group to completion; returns the run folder."""
    bucket = Bucket(local_run_url(run, cwd), run.spec.storage.endpoint)
    folder = prepare(run, bucket, fresh)
    logs = cwd / ".codistill" / "logs" / f"{run.metadata.namespace}-{run.metadata.name}"
    threads = max(1, (os.cpu_count() or 1) // (run.spec.groups * run.spec.world_size))
    reps = [r for job in render_jobs(run, bucket.url)
            for r in replicas(job, dict(os.environ), logs, threads)]
    console.print(Text.assemble((run.metadata.name, "bold"), f": {run.spec.groups} group(s) x "
                  f"{run.spec.world_size} process(es), run folder {bucket.url}, logs {logs}"))
    viewer = tables.viewer_folder(bucket.url, run.spec.storage.endpoint)
    try:
        with stop_signals():
            start(reps)
            supervise(reps, viewer, run, console)
    except Interrupted as e:
        raise RunFailed(f"{e}: stopped every worker (progress up to the last checkpoint is "
                        f"kept; run again to resume)") from None
    finally:
        stop(reps)
    return folder


class Interrupted(Exception):
    """Ctrl-C, or SIGTERM / SIGHUP from whatever runs `codistill run`."""


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextmanager
def stop_signals() -> Iterator[None]:
    """Any of STOP_SIGNALS stops the run, even where the caller ignored them (a background job
    starts with SIGINT ignored); the previous handlers come back afterwards."""
    def interrupted(sig: int, _frame: object) -> None:
        raise Interrupted("interrupted" if sig == signal.SIGINT else signal.Signals(sig).name)

    previous = {sig: signal.signal(sig, interrupted) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
