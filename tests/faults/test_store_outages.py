"""Object-store outages under a running `codistill run`: refused, black-holed, hung, slow, and
one spanning the end of training.

moto's S3 server runs as its own process (so it can be hung with SIGSTOP), behind the fault
proxy; the trainers and the launcher reach it only through the proxy, the test reads it directly.
Each scenario checks that training rode the outage out (no crash, no restart, steps trained
during it), that distillation resumed from fresh teachers once the store was back, that the final
teachers and states landed and the report evaluated the final models (D3), and that
`codistill status` said, during the outage, which store could not be reached. (No comparison with
an uninterrupted run's loss: how much of the training an outage of fixed length covers depends
on the machine's speed, and training without teachers for that long is not a defect.)
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import s3fs

from tests.support.faultlog import FaultLog
from tests.support.faultproxy import FaultProxy, MotoProcess
from tests.support.faultrun import FaultRun
from tests.support.kube import wait_for
from tests.support.s3 import S3_KEY, S3_SECRET

pytestmark = [pytest.mark.faults, pytest.mark.slow]
BUCKET = "codistill-faults"
# A model big enough for about 50 steps/s on 2 cores (the fixture's default trains at 250+), so
# that the run outlasts the outage by many steps and distillation can be seen to resume.
MODEL = {"seq_len": 64, "embed": 64, "hidden": 256}
STEPS, CHECKPOINT = 1500, 100
END_STEPS = 600  # the outage over the end of training needs no long run
OUTAGE_S = 6.0
MAX_STALENESS = 2 * CHECKPOINT  # steps: FaultRun's maxStalenessSteps


@dataclass
class Store:
    moto: MotoProcess
    proxy: FaultProxy
    env: dict[str, str]

    def run(self, tmp: Path, name: str, steps: int = STEPS,
            model: dict[str, int] | None = MODEL) -> FaultRun:
        """A run that reaches the store through the proxy; the test reads it directly."""
        storage = {"url": f"s3://{BUCKET}", "endpoint": self.proxy.endpoint}
        return FaultRun(tmp, name, steps, CHECKPOINT, storage=storage,
                        read_endpoint=self.moto.endpoint, env=self.env, model=model)

    def status(self, run: FaultRun) -> tuple[float, str]:
        """`codistill status` of the run as a user runs it, through the proxy: (seconds, output)."""
        began = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "codistill_trainer", "status", run.url],
                              capture_output=True, text=True, timeout=60,
                              env={**run.env, "AWS_ENDPOINT_URL": self.proxy.endpoint,
                                   "PATH": "/usr/bin:/bin"})
        return time.monotonic() - began, done.stdout + done.stderr


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    moto = MotoProcess(tmp_path_factory.mktemp("moto") / "moto.log")
    s3fs.S3FileSystem(key=S3_KEY, secret=S3_SECRET, endpoint_url=moto.endpoint).mkdir(BUCKET)
    proxy = FaultProxy(("127.0.0.1", moto.port), delay=0.3)
    env = {"AWS_ACCESS_KEY_ID": S3_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET,
           "AWS_DEFAULT_REGION": "us-east-1"}
    yield Store(moto, proxy, env)
    proxy.close()
    moto.stop()


def outage(store: Store, mode: str) -> tuple[Callable[[], None], Callable[[], None]]:
    """(begin, end) of an outage of kind `mode`."""
    if mode == "hang":
        return store.moto.hang, store.moto.resume
    return (lambda: store.proxy.set(mode)), (lambda: store.proxy.set("pass"))


def held(run: FaultRun) -> None:
    """Rode it out: rc 0, no group restarted, the final teacher and state at the last step, and
    the report over the final models."""
    assert run.wait() == 0, run.output()[-3000:]
    for g in (0, 1):
        assert run.progress(g).resumed_from is None
        assert run.pointer_step(g, "teacher") == run.pointer_step(g, "state") == run.steps
    run.final_models_reported()


def trained_through(run: FaultRun, began: float, ended: float) -> int:
    """Steps group 0 trained during the outage; both groups must have trained on through it and
    distilled from fresh teachers again after it. (Not necessarily up to the last step: on a
    loaded machine the group ahead may finish too far ahead of its peer to have a fresh teacher.)
    """
    during = {}
    for g in (0, 1):
        history = run.progress(g).history
        during[g] = [h["step"] for h in history if began < h.get("time", 0) < ended]
        distilled = [h for h in history if h.get("time", 0) > ended
                     and h.get("distillLoss") is not None
                     and (h.get("staleness") or 0) <= MAX_STALENESS]
        assert during[g] and distilled, (g, began, ended, history[-5:])
    return max(during[0]) - min(during[0])


@pytest.mark.parametrize("mode", ["refuse", "blackhole", "hang", "slow"])
def test_training_rides_out_an_outage_and_status_names_the_store(
        mode: str, store: Store, tmp_path: Path, fault_log: FaultLog) -> None:
    run = store.run(tmp_path, f"outage-{mode}")
    run.start()
    run.wait_step(0, 200)
    begin, end = outage(store, mode)
    began = time.time()
    begin()
    try:
        took, shown = store.status(run)
        time.sleep(max(0.0, OUTAGE_S - took))
    finally:
        end()
        ended = time.time()
    if mode != "slow":  # a slow store still answers: nothing to warn about
        # The store's URL and what failed, in one line: run.json cannot be read either.
        named = shown.startswith(f"error: read {run.url}/run.json: ")
        assert named or f"store {run.url} unreachable" in shown, shown
    held(run)
    trained = trained_through(run, began, ended)
    fault_log(f"store {mode} for {OUTAGE_S:.0f} s mid-run", 1, 0,
              f"trained {trained} steps through it, distilled from fresh teachers after, no "
              f"restart, final models reported; status named the store in {took:.1f} s")


def test_an_outage_over_the_end_of_training_waits_for_the_final_publish(
        store: Store, tmp_path: Path, fault_log: FaultLog) -> None:
    """The store refuses from before the last step until both groups have trained their last
    step, and OUTAGE_S more: the final teacher and state are retried until they land, and only
    then is final.json written (D3). The outage ends on what the groups logged, not on a clock,
    so that it spans the end however fast or loaded the machine is."""
    run = store.run(tmp_path, "outage-end", END_STEPS)
    run.start()
    run.wait_step(0, CHECKPOINT)
    store.proxy.set("refuse")
    began = time.monotonic()
    try:
        finishing = f"trained {END_STEPS} steps; publishing the final teacher and state"
        wait_for(lambda: all(finishing in run.worker_log(g) for g in (0, 1))
                 or run.proc.poll() is not None, "both groups at their last step", 240)
        time.sleep(OUTAGE_S)
        assert run.proc.poll() is None, run.output()[-3000:]  # still waiting to publish
    finally:
        store.proxy.set("pass")
        lasted = time.monotonic() - began
    held(run)
    fault_log(f"store refused for {lasted:.0f} s over the end", 1, 0,
              "final publish retried until it landed; report over the final models")
