"""Kills: a trainer SIGKILLed at the worst moments of a save, of its finish, and at random.

Each scenario runs `codistill run` to the kill, then runs it again, as a user (or a restarted
pod) would, and checks that the rerun resumed from the newest committed state, that no more
than a checkpoint's worth of steps was redone, that nothing half-written is left or loaded, and
that the final models are as good as an uninterrupted run's (within the noise between two
uninterrupted runs, which differ in when each teacher arrived).
"""

from __future__ import annotations

import os
import random
import signal
from pathlib import Path

import pytest

from codistill import failpoints
from codistill.storage import TMP_MARK
from tests.support.faultlog import FaultLog
from tests.support.faultrun import FaultRun
from tests.support.kube import wait_for
from tests.support.localrun import workers_of

pytestmark = [pytest.mark.faults, pytest.mark.slow]
STEPS, CHECKPOINT = 400, 50
SEED = 20261202


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory) -> dict[int, float]:
    """Each group's final eval loss in an uninterrupted run of the same manifest."""
    run = FaultRun(tmp_path_factory.mktemp("baseline"), "baseline", STEPS, CHECKPOINT)
    assert run.run() == 0, run.output()[-3000:]
    return {g: f.eval_loss for g, f in run.finished().items()}


def leftovers(run: FaultRun) -> list[str]:
    """Temporary files of interrupted writes still in the run folder."""
    root = Path(run.bucket.root)
    return [str(p.relative_to(root)) for p in root.rglob(f"*{TMP_MARK}*")]


def killed(run: FaultRun) -> None:
    assert run.wait() == 1, run.output()[-3000:]
    assert "exited with code -9" in run.output()


@pytest.mark.parametrize("point", [failpoints.BEFORE_RENAME, failpoints.BEFORE_POINTER])
def test_a_kill_in_the_middle_of_a_save_resumes_from_the_state_before(
        point: str, tmp_path: Path, baseline: dict[int, float], fault_log: FaultLog) -> None:
    """Killed with the step-200 state only in its temporary file, or written but not committed
    by its pointer: the rerun resumes from 150, the pointer's state, and the stray files go."""
    run = FaultRun(tmp_path, "save", STEPS, CHECKPOINT)
    run.start(CODISTILL_FAILPOINT=f"{point}:groups/0/state/200.pt")
    killed(run)
    assert run.pointer_step(0, "state") == 150
    seen = run.step(0)
    assert run.run() == 0, run.output()[-3000:]
    resumed = run.progress(0)
    assert (resumed.resumed_from, resumed.restarts) == (150, 1)
    assert leftovers(run) == []
    run.as_good_as(baseline)
    fault_log(f"SIGKILL {point} (state of step 200)", 1, seen - 150,
              "resumed from the committed state 150, no stray files, final as uninterrupted")


def test_a_kill_between_the_final_publish_and_final_json_finishes_on_the_rerun(
        tmp_path: Path, baseline: dict[int, float], fault_log: FaultLog) -> None:
    run = FaultRun(tmp_path, "finish", STEPS, CHECKPOINT)
    run.start(CODISTILL_FAILPOINT=f"{failpoints.BEFORE_FINAL}:0")
    killed(run)
    assert run.folder.final(0) is None
    assert run.pointer_step(0, "state") == run.pointer_step(0, "teacher") == STEPS
    assert run.run() == 0, run.output()[-3000:]
    assert run.progress(0).resumed_from == STEPS  # nothing redone
    run.as_good_as(baseline)
    fault_log("SIGKILL before final.json", 1, 0,
              "rerun resumed at the last step and wrote final.json over the final model")


def test_repeated_sigkills_at_random_lose_at_most_a_checkpoint_each(
        tmp_path: Path, baseline: dict[int, float], fault_log: FaultLog) -> None:
    """Three kills of a random worker at a random step (seeded), each followed by a rerun."""
    rng = random.Random(SEED)
    run = FaultRun(tmp_path, "kills", STEPS, CHECKPOINT)
    lost = []
    for low in (60, 160, 260):
        run.start()
        group = rng.randrange(2)
        run.wait_step(group, rng.randrange(low, low + 80))
        pid = next(pid for pid, env in wait_for(lambda: workers_of(run.url), "workers", 120).items()
                   if env.get("CODISTILL_GROUP") == str(group))
        os.kill(pid, signal.SIGKILL)
        killed(run)
        seen = run.step(group)  # the last progress the killed group wrote: a lower bound
        committed, before = run.pointer_step(group, "state"), run.progress(group).restarts
        run.start()
        # past its resumed step; or, killed after its last step (the tiny model trains 100
        # steps in about a second), rerun at that step to finish
        resumed = wait_for(lambda: (p := run.progress(group)) and p.restarts > before
                           and (p.step > committed or p.step == STEPS) and p,
                           "the rerun past its resumed step", 120)
        assert resumed.resumed_from == committed
        lost.append(max(0, seen - committed))  # its state may have landed after that record
        assert lost[-1] <= CHECKPOINT, (seen, committed)
        run.proc.send_signal(signal.SIGINT)  # the next kill starts from this resumed run
        assert run.wait() == 1
    assert run.run() == 0, run.output()[-3000:]
    assert run.progress(0).restarts + run.progress(1).restarts >= 3
    assert leftovers(run) == []
    run.as_good_as(baseline)
    fault_log("SIGKILL of a random worker x3", 3, sum(lost),
              f"each rerun resumed from the newest state; lost per kill {lost}, "
              f"at most {CHECKPOINT}")
