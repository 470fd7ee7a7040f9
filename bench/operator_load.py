"""Section 5: the operator under load, as its own process against kmock's API server.

`python -m codistill_operator` runs against the Kubernetes API emulator of tests/kube.py (served in
this process) and moto's S3 server (its own process). Measured:
- create to jobs: N Codistillations are created back to back as fast as the API takes them; a
  watch records when each PyTorchJob first appears; per run, the time from its create call
  returning to all its jobs existing (p50, p99);
- status lag: with all N runs live, a group's progress.json is rewritten (one run at a time,
  spread over a status interval so the writes fall at every phase of the operator's status loop),
  and a watch records when the run's status shows the new step;
- the operator's resident memory (VmRSS) idle, and with N live runs after the status sweeps.
Module named `operator_load`, not `operator`: that would shadow the standard library's module.

    python -m bench.operator_load [--quick]
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import kmock
from matplotlib.figure import Figure

from bench import common
from codistill.net import free_port
from codistill.runfolder import Progress, RunFolder
from codistill.storage import Bucket
from codistill_operator.settings import Config
from tests.support import kube  # the API emulator the operator's tests use
from tests.support.kube import JOBS, RUNS, SECRETS, Cluster, wait_for

SCHEMA: common.Schema = {"create_to_jobs_p50_s": {}, "create_to_jobs_p99_s": {}, "rss_mb": {},
                         "status_lag_p50_s": {}}
SECRET = "bench-s3"
GROUPS = 2
STATUS_INTERVAL = Config().status_interval  # the operator's default
LAG_SAMPLES = 20
EQUALITY = re.compile(r"(?P<key>[\w./-]+)==?(?P<value>[\w.-]*)")


@attrs.define(kw_only=True)
class SelectingEmulator(kube.Emulator):
    """The tests' emulator, plus equality label selectors on lists (kmock ignores them).

    The operator lists a run's jobs by label on every status refresh; without the selector each
    list returns every job in the namespace, which makes a sweep over N runs cost O(N^2) and
    would charge the operator for the emulator's shortcut.
    """

    async def _serve_list(self, request: kmock.Request) -> Any:
        found = await super()._serve_list(request)
        terms = [EQUALITY.fullmatch(t) for t in request.params.get("labelSelector", "").split(",")]
        if all(terms):  # only `key=value` terms; anything else is served unfiltered, as before
            wanted = {m["key"]: m["value"] for m in terms if m}
            found["items"] = [o for o in found["items"] if wanted.items()
                              <= ((o["metadata"].get("labels") or {}).items())]
        return found


class SelectingCluster(Cluster):
    async def _start(self) -> kube.Emulator:
        emulator = await self._stack.enter_async_context(SelectingEmulator())
        self._server = await self._stack.enter_async_context(kmock.Server(emulator))
        kube.declare(emulator)
        return emulator


def manifest(name: str, endpoint: str) -> dict[str, Any]:
    return {
        "apiVersion": "codistill.io/v1alpha1", "kind": "Codistillation",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"groups": GROUPS, "task": {"name": "lm"}, "training": {"steps": 1000},
                 "storage": {"url": f"s3://{common.BUCKET}/runs", "endpoint": endpoint,
                             "credentialsSecret": SECRET}},
    }


def watch(cluster: Cluster, path: str, on_event: Callable[[dict[str, Any], float], None]
          ) -> Callable[[], None]:
    """Call `on_event(object, monotonic time)` for every event of a watch, in a thread; returns
    the function that ends the watch (by shutting its socket: a blocked read cannot be closed)."""
    url = urllib.parse.urlsplit(cluster.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=3600)
    conn.request("GET", f"{path}?watch=true")
    sock = conn.sock
    resp = conn.getresponse()

    def read() -> None:
        try:
            for line in resp:
                if line.strip():
                    on_event(json.loads(line)["object"], time.monotonic())
        except (OSError, ValueError, http.client.HTTPException):
            pass  # shut down

    thread = threading.Thread(target=read, daemon=True)
    thread.start()

    def stop() -> None:
        sock.shutdown(socket.SHUT_RDWR)
        thread.join(10)
        conn.close()

    return stop


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def start_operator(cluster: Cluster, log: Path) -> subprocess.Popen[bytes]:
    liveness = free_port()
    env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "codistill_operator", "--all-namespaces", "--liveness-port",
         str(liveness), "--metrics-port", "0", "--status-interval", str(STATUS_INTERVAL)],
        env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)

    def healthy() -> bool:
        try:
            return urllib.request.urlopen(f"http://127.0.0.1:{liveness}/healthz").status == 200
        except OSError:
            return proc.poll() is not None  # died: stop waiting, the caller reports it
    wait_for(healthy, "the operator's /healthz", timeout=120)
    if proc.poll() is not None:
        raise RuntimeError(f"the operator exited: {log.read_text()[-3000:]}")
    return proc


def create_to_jobs(cluster: Cluster, endpoint: str, runs: int) -> tuple[dict[str, float], float]:
    """Per run, seconds from its create call returning to all its jobs being seen; and the
    seconds from the first create to the last job (the burst's makespan)."""
    seen: dict[str, float] = {}
    stop = watch(cluster, Cluster.path(JOBS, "default"),
                 lambda obj, t: seen.setdefault(obj["metadata"]["name"], t))
    created = {}
    try:
        for i in range(runs):
            name = f"load-{i:04d}"
            cluster.create(RUNS, manifest(name, endpoint))
            created[name] = time.monotonic()
        print(f"  created {runs} runs in {time.monotonic() - min(created.values()):.1f} s",
              flush=True)
        wait_for(lambda: len(seen) >= runs * GROUPS, f"{runs * GROUPS} jobs",
                 timeout=60 + 3 * runs)
    finally:
        stop()
    done = {n: max(seen[f"{n}-g{g}"] for g in range(GROUPS)) for n in created}
    return {n: done[n] - t for n, t in created.items()}, max(done.values()) - min(created.values())


def status_lag(cluster: Cluster, endpoint: str, runs: list[str]) -> list[float]:
    """Seconds from a progress.json write to the run's status showing its step."""
    step = 4242
    shown: dict[str, float] = {}

    def on_run(obj: dict[str, Any], t: float) -> None:
        groups = (obj.get("status") or {}).get("groups") or []
        if any(g.get("group") == 0 and g.get("step") == step for g in groups):
            shown.setdefault(obj["metadata"]["name"], t)

    stop = watch(cluster, Cluster.path(RUNS, "default"), on_run)
    written = {}
    try:
        for name in runs:
            folder = RunFolder(Bucket(f"s3://{common.BUCKET}/runs/default/{name}", endpoint,
                                      common.CREDENTIALS))
            folder.write_progress(Progress(group=0, step=step, steps=1000, state="training",
                                           loss=1.0, time=time.time()))
            written[name] = time.monotonic()
            time.sleep(STATUS_INTERVAL / len(runs))
        wait_for(lambda: len(shown) == len(runs), "status of every rewritten run", timeout=600)
    finally:
        stop()
    return [shown[n] - written[n] for n in runs]


def secret() -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": SECRET},
            "data": {k: base64.b64encode(v.encode()).decode()
                     for k, v in common.CREDENTIALS.items()}}


def plot(lags: dict[str, list[float]]) -> Figure:
    fig = common.figure(cols=2, size=(5.0, 3.6))
    for ax, (what, values) in zip(fig.axes, lags.items()):
        xs = sorted(values)
        ax.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))], drawstyle="steps-post")
        ax.set(title=what, xlabel="seconds", ylabel="fraction of runs")
        ax.grid(alpha=0.3)
    return fig


def measure(runs: int) -> dict[str, Any]:
    """Create-to-jobs seconds per run, the burst's makespan, status lags, and the operator's
    RSS idle and with `runs` live runs."""
    with common.moto_server() as endpoint, tempfile.TemporaryDirectory() as tmp:
        cluster = SelectingCluster(Path(tmp))
        try:
            cluster.create(SECRETS, secret())
            proc = start_operator(cluster, Path(tmp) / "operator.log")
            try:
                idle = rss_mb(proc.pid)
                created, makespan = create_to_jobs(cluster, endpoint, runs)
                sample = sorted(created)[:: max(1, runs // LAG_SAMPLES)]
                lags = status_lag(cluster, endpoint, sample)
                return {"created": created, "makespan": makespan, "lags": lags, "idle": idle,
                        "live": rss_mb(proc.pid)}
            finally:
                proc.terminate()
                proc.wait(60)
        finally:
            cluster.close()


def main() -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, help="Codistillations to create (200; 100 with --quick)")
    args = p.parse_args()
    runs = args.runs or (100 if args.quick else 200)
    bench = common.Bench("operator_load")
    m = measure(runs)
    times, lags = list(m["created"].values()), m["lags"]
    result = {
        "quick": args.quick, "runs": runs, "groups_per_run": GROUPS,
        "status_interval_s": STATUS_INTERVAL,
        "create_to_jobs_p50_s": common.quantile(times, 0.5),
        "create_to_jobs_p99_s": common.quantile(times, 0.99),
        "create_to_jobs_max_s": max(times),
        "runs_per_s": runs / m["makespan"],
        "status_lag_p50_s": common.quantile(lags, 0.5),
        "status_lag_max_s": max(lags),
        "status_lag_samples": len(lags),
        "rss_mb": m["live"], "rss_idle_mb": m["idle"],
    }
    common.show("operator", [(k, v) for k, v in result.items()
                             if k.endswith(("_s", "_mb", "_per_s"))],
                ["measure", "value"])
    bench.write(args.out, result, SCHEMA,
                plot({"create to all jobs": times, "progress write to status": lags}))


if __name__ == "__main__":
    main()
