"""Status from observation: job conditions and each group's `progress.json` -> RunStatus.

Pure functions, level-based: the new status depends only on what is observed now and on the
previous status (for restart counts and transition times), and events are the differences
between the two, so a re-run posts nothing twice.
"""

from __future__ import annotations

import datetime
from typing import Any, NamedTuple

from codistill import names
from codistill.runfolder import Progress

from .schema import Condition, GroupStatus, Phase, RunStatus

TERMINAL = {"Succeeded", "Failed"}
READY_PHASES = {"Running", "Succeeded"}
JOB_PHASES = ("Created", "Running", "Restarting", "Suspended")


class Event(NamedTuple):
    type: str  # Normal | Warning
    reason: str
    message: str


class Observed(NamedTuple):
    """What the status loop saw of one run, and the settings in force it is judged by."""

    name: str
    generation: int
    groups: int
    jobs: dict[int, dict[str, Any]]  # group -> its job (TrainJob or PyTorchJob)
    progress: dict[int, Progress] | None  # group -> its progress.json; None: bucket unreadable
    max_staleness: int
    burn_in: int
    pods: dict[int, str] = {}  # group -> why one of its pods cannot start (pod_problem)
    store_error: str | None = None  # why the progress files could not be read (one line)


def timestamp(seconds: float | None = None) -> str:
    when = datetime.datetime.fromtimestamp(seconds, datetime.UTC) if seconds else None
    return (when or datetime.datetime.now(datetime.UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")


def job_phase(job: dict[str, Any] | None) -> tuple[str, str | None]:
    """A job's phase: Failed/Succeeded anywhere in its conditions win, else the newest."""
    if job is None:
        return "Missing", None
    conditions = (job.get("status") or {}).get("conditions") or []
    true = [c for c in conditions if c.get("status") == "True"]
    for kind, phase in (("Failed", "Failed"), ("Succeeded", "Succeeded"), ("Complete", "Succeeded")):
        hit = next((c for c in true if c.get("type") == kind), None)
        if hit:
            return phase, hit.get("message")
    if job.get("kind") == names.TRAINJOB_KIND:
        return _trainjob_phase(job, true)
    current = [c for c in true if c.get("type") in JOB_PHASES]
    if current:
        return current[-1]["type"], current[-1].get("message")
    if ((job.get("spec") or {}).get("runPolicy") or {}).get("suspend"):
        return "Suspended", None
    return "Pending", None


def _trainjob_phase(job: dict[str, Any], true: list[dict[str, Any]]) -> tuple[str, str | None]:
    """A TrainJob says only Suspended, Complete or Failed (no Running condition): running is
    read from its jobsStatus, the counts of its JobSet's Jobs. Active, not ready: JobSet counts a
    Job ready only once all its pods are (and was seen not to count it while they trained); a
    pod that cannot start is reported on its own (pod_problem)."""
    suspended = next((c for c in true if c.get("type") == "Suspended"), None)
    if suspended or (job.get("spec") or {}).get("suspend"):
        return "Suspended", suspended.get("message") if suspended else None
    counts = (job.get("status") or {}).get("jobsStatus") or []
    if any(c.get("active") for c in counts):
        return "Running", None
    return "Pending", None


# Container states a pod does not leave by itself: the cause is in the spec or the cluster.
STUCK = {"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "CreateContainerConfigError",
         "CreateContainerError", "RunContainerError", "CrashLoopBackOff"}


def pod_problem(pod: dict[str, Any]) -> str | None:
    """Why a pod cannot start or keeps failing, as the kubelet or the scheduler say; else None."""
    status, name = pod.get("status") or {}, pod["metadata"]["name"]
    for c in [*(status.get("initContainerStatuses") or []), *(status.get("containerStatuses") or [])]:
        waiting = (c.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in STUCK:
            return f"pod {name}: {waiting['reason']}: {waiting.get('message', '')}".strip(": ")
    for cond in status.get("conditions") or []:
        if cond.get("type") == "PodScheduled" and cond.get("reason") == "Unschedulable":
            return f"pod {name}: Unschedulable: {cond.get('message', '')}".strip(": ")
    return None


def group_status(seen: Observed, g: int, previous: GroupStatus | None) -> GroupStatus:
    """One group from its job and progress; with the bucket unreadable, progress as before."""
    p = None if seen.progress is None else seen.progress.get(g) or Progress(group=g)
    phase, message = job_phase(seen.jobs.get(g))
    if phase == "Missing":  # removed after the end (ttlSecondsAfterFinished), however soon
        if previous is not None and previous.phase in TERMINAL:
            phase, message = previous.phase, previous.message
        elif p is not None and p.state == "finished":
            phase, message = "Succeeded", "finished; its job was removed since"
    restarts = previous.restarts if previous else 0
    if phase == "Restarting" and (previous is None or previous.phase != "Restarting"):
        restarts += 1
    problem = seen.pods.get(g) if phase not in TERMINAL else None
    known = dict(phase=phase, restarts=restarts, message=problem or message)
    if p is None:
        if previous is not None:
            return previous.model_copy(update=known)
        p = Progress(group=g)
    known["restarts"] = max(restarts, p.restarts)  # the trainer counts every restart it made
    stale = sorted(peer for peer, lag in p.staleness.items() if lag > seen.max_staleness)
    return GroupStatus(
        group=g, job=names.job_name(seen.name, g), state=p.state, step=p.step, steps=p.steps,
        loss=p.loss, task_loss=p.task_loss, distill_loss=p.distill_loss, eval_loss=p.eval_loss,
        teachers=p.teachers, staleness=p.staleness, stale_peers=stale,
        last_published=p.last_published, examples_per_sec=p.examples_per_sec,
        progress_time=timestamp(p.time) if p.time else None,
        warnings=[w[:300] for w in p.warnings[:10]], **known,
    )


def run_phase(groups: list[GroupStatus]) -> Phase:
    phases = {g.phase for g in groups}
    if phases == {"Succeeded"}:
        return "Succeeded"
    if "Failed" in phases:
        return "Failed" if phases <= TERMINAL else "Degraded"
    if "Running" in phases or "Restarting" in phases:
        return "Running"
    if "Suspended" in phases and phases <= {"Suspended", "Succeeded"}:
        return "Suspended"
    return "Pending"


def set_condition(
    status: RunStatus, kind: str, true: bool, reason: str, message: str, generation: int
) -> None:
    """Set one condition; lastTransitionTime moves only when its status does."""
    value = "True" if true else "False"
    old = status.condition(kind)
    since = old.last_transition_time if old and old.status == value else timestamp()
    new = Condition(
        type=kind, status=value, reason=reason, message=message,
        last_transition_time=since, observed_generation=generation,
    )
    status.conditions = [c for c in status.conditions if c.type != kind] + [new]


Judgement = tuple[bool, str, str]  # condition is True?, reason, message


def _running(seen: Observed, groups: list[GroupStatus], phase: Phase) -> Judgement:
    running = sum(g.phase == "Running" for g in groups)
    reason = "GroupsRunning" if running else phase
    return running > 0, reason, f"{running} of {seen.groups} groups running"


def _distilling(seen: Observed, groups: list[GroupStatus], phase: Phase) -> Judgement:
    running = [g for g in groups if g.phase == "Running"]
    using = [str(g.group) for g in running if g.teachers and g.step >= seen.burn_in]
    if using:
        return True, "Distilling", f"groups {', '.join(using)} distill from their peers"
    if seen.groups == 1:
        return False, "SingleGroup", "one group: plain data parallelism, no peers"
    if not running:
        return False, "NotRunning", "no group is running"
    if all(g.step < seen.burn_in for g in running):
        return False, "BurnIn", f"plain training until step {seen.burn_in}"
    return False, "WaitingForPeers", "no peer has published weights yet"


def _degraded(seen: Observed, groups: list[GroupStatus], phase: Phase) -> Judgement:
    # First: every trainer writes through the store, so while it fails the progress shown is
    # old and the rest of the verdict (staleness, steps) rests on it.
    if seen.store_error:
        return True, "StoreUnreachable", seen.store_error
    failed = [g for g in groups if g.phase == "Failed"]
    if failed:
        names = ", ".join(f"{g.group} ({g.message or 'job failed'})" for g in failed)
        return True, "GroupFailed", f"failed groups: {names}; the others go on"
    stuck = "; ".join(f"group {g}: {why}" for g, why in sorted(seen.pods.items()))
    if stuck:
        return True, "PodsNotStarting", stuck
    text = "; ".join(
        f"group {g.group} <- peers {', '.join(g.stale_peers)}" for g in groups if g.stale_peers
    )
    if text:
        return True, "PeersStale", f"teachers beyond maxStalenessSteps {seen.max_staleness}: {text}"
    return False, "Healthy", "every group is healthy"


def _succeeded(seen: Observed, groups: list[GroupStatus], phase: Phase) -> Judgement:
    if phase == "Succeeded":
        return True, "AllGroupsSucceeded", "every group finished its steps"
    return False, "NotFinished", f"{sum(g.phase == 'Succeeded' for g in groups)} groups finished"


def _failed(seen: Observed, groups: list[GroupStatus], phase: Phase) -> Judgement:
    if phase == "Failed":
        return True, "GroupsFailed", "groups failed and none is left running"
    return False, "NotFailed", ""


CONDITIONS = {
    "Running": _running, "Distilling": _distilling, "Degraded": _degraded,
    "Succeeded": _succeeded, "Failed": _failed,
}


def observe(previous: RunStatus, seen: Observed) -> RunStatus:
    """The new status of a run from what was seen; keeps Ready (the reconciler's verdict)."""
    before = {g.group: g for g in previous.groups}
    groups = [group_status(seen, g, before.get(g)) for g in range(seen.groups)]
    phase = run_phase(groups)
    losses = [g.loss for g in groups if g.loss is not None]
    status = previous.model_copy(deep=True)
    status.groups, status.phase = groups, phase
    status.step = min(g.step for g in groups) if groups else 0
    status.loss = round(sum(losses) / len(losses), 6) if losses else None
    status.groups_ready = f"{sum(g.phase in READY_PHASES for g in groups)}/{seen.groups}"
    for kind, judge in CONDITIONS.items():
        set_condition(status, kind, *judge(seen, groups, phase), seen.generation)
    return status


GROUP_EVENTS = {
    "Running": ("Normal", "GroupStarted", "is running"),
    "Restarting": ("Warning", "GroupRestarting", "is restarting"),
    "Failed": ("Warning", "GroupFailed", "failed"),
    "Succeeded": ("Normal", "GroupSucceeded", "finished its steps"),
    "Suspended": ("Normal", "GroupSuspended", "is suspended"),
}
RUN_EVENTS = {
    "Distilling": ("Normal", "DistillationStarted"),
    "Degraded": ("Warning", "RunDegraded"),
    "Succeeded": ("Normal", "RunSucceeded"),
    "Failed": ("Warning", "RunFailed"),
}


def _group_events(old: GroupStatus | None, new: GroupStatus) -> list[Event]:
    events = []
    if new.phase in GROUP_EVENTS and (old is None or old.phase != new.phase):
        kind, reason, text = GROUP_EVENTS[new.phase]
        detail = f": {new.message}" if new.message and kind == "Warning" else ""
        events.append(Event(kind, reason, f"group {new.group} (job {new.job}) {text}{detail}"))
    if set(new.stale_peers) - set(old.stale_peers if old else ()):
        lags = ", ".join(f"{p} ({new.staleness.get(p)} steps)" for p in new.stale_peers)
        events.append(Event("Warning", "PeersStale", f"group {new.group}: teachers from peers "
                            f"{lags} are staler than maxStalenessSteps"))
    return events


def transitions(old: RunStatus, new: RunStatus) -> list[Event]:
    """The events that tell people what changed between two statuses of one run."""
    before = {g.group: g for g in old.groups}
    events = [e for g in new.groups for e in _group_events(before.get(g.group), g)]
    for cond in new.conditions:
        prev = old.condition(cond.type)
        if cond.type == "Ready":
            if prev is None or (prev.status, prev.reason, prev.message) != (
                cond.status, cond.reason, cond.message
            ):
                kind = "Normal" if cond.status == "True" else "Warning"
                events.append(Event(kind, cond.reason, cond.message))
        elif cond.status == "True" and (prev is None or (prev.status, prev.reason) != (
            "True", cond.reason
        )):  # turned True, or True for another reason (a store outage over a stale peer)
            if cond.type in RUN_EVENTS:
                events.append(Event(*RUN_EVENTS[cond.type], cond.message))
    return events
