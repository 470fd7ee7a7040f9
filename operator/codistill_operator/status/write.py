"""Writing a run's status: one writer per run at a time, only what changed, events on transitions.

The reconciler (Ready, applied generation), job events and the periodic loop all go
through `write`, which re-reads the resource under the run's lock, so none of them overwrites
another's news and each transition is announced once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from codistill import names
from codistill.storage import StorageError

from .. import bucket
from ..backends import KINDS, JobKind
from ..errors import MissingSecret
from ..runtime import State
from . import observe
from .schema import RunStatus

log = logging.getLogger(__name__)
Change = Callable[[dict[str, Any], RunStatus], RunStatus | None]


def current(body: dict[str, Any]) -> RunStatus:
    try:
        return RunStatus.model_validate(body.get("status") or {})
    except ValidationError:  # edited by hand: start over, the next refresh fills it in
        return RunStatus()


def job_kind(status: RunStatus) -> JobKind:
    """The kind of a run's jobs, as applied (before anything is: PyTorchJob, which lists none)."""
    return KINDS[status.applied.backend if status.applied else "pytorchjob"]


def _diff(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """A merge patch from `old` to `new` at the top level (None removes a key)."""
    return {k: new.get(k) for k in old.keys() | new.keys() if old.get(k) != new.get(k)}


def write(state: State, namespace: str, name: str, change: Change,
          uid: str | None = None, exact: bool = False) -> RunStatus | None:
    """Apply `change(resource, status)` to the live status; None if the run is gone.

    With `uid`, only to that resource: a reconcile of a run deleted meanwhile must not write
    its outcome on a new run created under the same name. `exact`: only to the version read
    (a change that reads the bucket takes long enough for the run to be replaced meanwhile);
    if it changed since, nothing is written and the next refresh starts over."""
    with state.lock(namespace, name):
        body = state.api.get_run(namespace, name)
        if body is None or uid not in (None, body["metadata"].get("uid")):
            return None
        old = current(body)
        new = change(body, old)
        if new is None:
            return old
        patch = _diff(body.get("status") or {}, new.dump())
        if patch:
            version = body["metadata"].get("resourceVersion") if exact else None
            try:
                state.api.patch_status(namespace, name, patch, version)
            except ApiException as e:
                if e.status != 409 or not exact:
                    raise
                return old
        for event in observe.transitions(old, new):
            post(state, body, *event)
        state.runs[(namespace, name)] = new.phase
        return new


def post(state: State, body: dict[str, Any], kind: str, reason: str, message: str) -> None:
    """Post an event; a failure to do so is logged, never fatal to the reconcile."""
    try:
        state.api.post_event(body, kind, reason, message)
    except ApiException as e:
        log.warning("event %s on %s not posted: %s", reason, body["metadata"]["name"], e.reason)


def _observe(state: State, body: dict[str, Any], old: RunStatus) -> RunStatus | None:
    """Look at the run's jobs and progress files; the rules in force come from status.applied
    (the operator wrote them there), so nothing it wrote itself is read back from the bucket."""
    applied = old.applied
    if applied is None:
        return None  # nothing applied yet: no jobs to look at
    namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
    groups = int(applied.fields.get("groups", 0))
    jobs = {}
    for job in state.api.list_jobs(job_kind(old), namespace, body):
        label = job["metadata"].get("labels", {}).get(names.LABEL_GROUP, "")
        if label.isdigit():
            jobs[int(label)] = job
    progress, store_error = None, None
    try:
        folder = bucket.applied_folder(state.api, namespace, old)
        if folder is not None:
            progress = bucket.read_progress(folder, groups)
    except StorageError as e:
        store_error = bucket.unreachable(old.bucket or "", e)
        log.warning("progress of %s/%s not read: %s", namespace, name, store_error)
    except MissingSecret as e:  # the reconciler's to report: Ready=False, InvalidSpec
        log.warning("progress of %s/%s not read: %s", namespace, name, e)
    seen = observe.Observed(
        name=name, generation=body["metadata"].get("generation", 1), groups=groups, jobs=jobs,
        progress=progress, max_staleness=applied.max_staleness_steps,
        burn_in=applied.burn_in_steps, pods=_pod_problems(state, namespace, name),
        store_error=store_error,
    )
    return observe.observe(old, seen)


def _pod_problems(state: State, namespace: str, name: str) -> dict[int, str]:
    """Per group, why one of its pods cannot start (a job's conditions do not say: a pod
    pulling an image that does not exist leaves its job "Created" for ever)."""
    try:
        pods = state.api.list_pods(namespace, name)
    except ApiException as e:  # e.g. an older chart's RBAC without pods: status goes on
        log.warning("pods of %s/%s not read: %s", namespace, name, e.reason)
        return {}
    problems: dict[int, str] = {}
    for pod in pods:
        label = pod["metadata"].get("labels", {}).get(names.LABEL_GROUP, "")
        why = observe.pod_problem(pod)
        if why and label.isdigit():
            problems.setdefault(int(label), why)
    return problems


def refresh(state: State, namespace: str, name: str) -> str:
    """Recompute a run's status from its jobs and the bucket; "gone" once the run is."""
    new = write(state, namespace, name, lambda body, old: _observe(state, body, old), exact=True)
    if new is None:
        state.forget(namespace, name)
        return "gone"
    return "ok"
