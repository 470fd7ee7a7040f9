"""Operator kills on the real control plane: the fault suite's scenario for the operator itself.

The chart's operator is SIGKILLed in its pod three times during one run: as the run is created
(before any job of it exists), while its groups train, and after it succeeded, with one of its
PyTorchJobs deleted while the operator was down. The process kubelet restarts the container (as
a kubelet does, with its back-off); the new process waits out the dead one's leader Lease, which
was never released, then resumes every run. Each time it must converge on the same two jobs, the
run must end Succeeded with every group at its last step, and no event may be posted twice.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections import Counter
from typing import Any

import pytest

from tests.cluster.stack import NAMESPACE, SYSTEM, Stack, processes
from tests.support.faultlog import FaultLog
from tests.support.kube import wait_for

# About 2 minutes alone; each restart waits out the kubelet's back-off and the Lease, which
# with the tier's other operator kill before and busy cores took 5 in one session.
pytestmark = [pytest.mark.slow, pytest.mark.faults, pytest.mark.timeout(600)]
RUN, STEPS = "opkill", 150
JOBS = [f"{RUN}-g0", f"{RUN}-g1"]
LEASE, DEPLOYMENT = "codistill-operator", "deployment/codistill-operator"


def holder(stack: Stack) -> str | None:
    lease = stack.get("lease", LEASE, SYSTEM)
    return lease["spec"].get("holderIdentity") if lease else None


def kill_operator(stack: Stack) -> str | None:
    """SIGKILL the operator in its pod; returns the identity it led as."""
    leader = holder(stack)
    pids = processes("codistill_operator")
    assert pids, "no operator running"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    return leader


def wait_restarted(stack: Stack, dead: str | None) -> None:
    """Until the restarted operator leads: after the kubelet's back-off (none, then 10 s, 20 s,
    ...) and the dead leader's Lease duration (15 s)."""
    wait_for(lambda: holder(stack) not in (None, dead), "the restarted operator leading",
             timeout=150)


def resumed(stack: Stack) -> bool:
    """The running operator's log says kopf's resume handler reconciled the run."""
    log = stack.cp.kubectl("logs", "-n", SYSTEM, DEPLOYMENT, check=False).stdout
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    return any((line.get("object") or {}).get("name") == RUN
               and line.get("message") == "Handler 'reconcile_run' succeeded." for line in lines)


def job_uids(stack: Stack) -> dict[str, str]:
    return {j["metadata"]["name"]: j["metadata"]["uid"] for j in stack.jobs(RUN)}


def conditions(status: dict[str, Any]) -> dict[str, str]:
    return {c["type"]: c["status"] for c in status["conditions"]}


def test_an_operator_killed_three_times_keeps_two_jobs_and_announces_nothing_twice(
        stack: Stack, fault_log: FaultLog) -> None:
    # 1. Killed as the run is created: no operator acts on it until the restarted one leads.
    dead = kill_operator(stack)
    stack.apply(RUN, steps=STEPS)
    assert not stack.jobs(RUN)
    wait_restarted(stack, dead)
    wait_for(lambda: sorted(job_uids(stack)) == JOBS, "the two jobs", timeout=60)
    uids = job_uids(stack)

    # 2. Killed while both groups train: the restarted one adopts the same jobs.
    wait_for(lambda: [(g["phase"], g["step"] > 0) for g in stack.status(RUN).get("groups") or []]
             == [("Running", True)] * 2, "both groups training", timeout=180)
    dead = kill_operator(stack)
    wait_restarted(stack, dead)
    stack.wait_phase(RUN, "Succeeded")
    assert job_uids(stack) == uids

    # 3. Killed after success, and a job deleted while it is down: a finished group's job is
    # not created again (it would train the group again, for nothing).
    dead = kill_operator(stack)
    stack.kubectl("delete", "pytorchjob", JOBS[0], "-n", NAMESPACE)
    wait_restarted(stack, dead)
    wait_for(lambda: resumed(stack), "the restarted operator resumed the run", timeout=60)
    time.sleep(3)  # three status intervals more: a re-created job, or its events, would show
    assert job_uids(stack) == {JOBS[1]: uids[JOBS[1]]}

    status = stack.status(RUN)
    assert status["phase"] == "Succeeded"
    assert [(g["phase"], g["step"]) for g in status["groups"]] == [("Succeeded", STEPS)] * 2
    verdict = {kind: conditions(status)[kind] for kind in ("Ready", "Succeeded", "Failed")}
    assert verdict == {"Ready": "True", "Succeeded": "True", "Failed": "False"}, status
    seen = Counter(stack.reasons(RUN))
    assert seen["JobsCreated"] == 1 and seen["GroupSucceeded"] == 2, seen
    assert seen["RunSucceeded"] == 1 and seen["GroupStarted"] <= 2, seen
    assert max(seen.values()) <= 2, seen  # nothing announced again by a restart
    # The trainers never restarted: killing the operator costs no training.
    progress = [stack.folder(RUN).get_json(f"groups/{g}/progress.json") for g in (0, 1)]
    assert [(p["restarts"], p.get("resumedFrom")) for p in progress] == [(0, None)] * 2
    fault_log("operator SIGKILLed x3 on the real control plane", faults=3, steps_lost=0,
              outcome="the same 2 jobs after every restart, a finished one not re-created, "
                      "Succeeded, no duplicate events")
