"""Make the cluster and the bucket match a Codistillation: run.json, then exactly `groups` jobs.

Level-based and idempotent: every call starts from the live resource and the live jobs, so a
re-delivered event, a resumed operator or a crash half-way all end in the same place. A spec
that cannot run, or that changes what cannot change under running jobs, is refused as a whole
(Ready=False with the field named) and nothing is created or changed.
"""

from __future__ import annotations

from typing import Any

from kubernetes.client.exceptions import ApiException

from codistill import jobs, names
from codistill.runfolder import RunFolder
from codistill.spec import Codistillation, SpecError
from codistill.storage import StorageError

from . import bucket, children, validate
from .backends import KINDS, JobKind, Unavailable, choose
from .errors import JobConflict, MissingSecret, Retry
from .k8s import api_message, owner_uid
from .runtime import State
from .status.observe import TERMINAL, set_condition
from .status.schema import Applied, RunStatus
from .status.write import current, post, write

UPDATED = {"Suspended": "suspended", "Resumed": "resumed", "JobsUpdated": "updated"}


def record(state: State, body: dict[str, Any], ready: bool | None, reason: str = "",
           message: str = "", applied: Applied | None = None, url: str | None = None) -> bool:
    """Record the reconcile's outcome: Ready (None: leave it) and what is now applied.
    False if the run is gone, or is another resource now (deleted, created again)."""
    generation = body["metadata"].get("generation", 1)

    def change(_: dict[str, Any], status: RunStatus) -> RunStatus:
        status = status.model_copy(deep=True)
        status.observed_generation = generation
        if applied is not None:
            status.applied, status.bucket = applied, url
        if status.applied is None:
            status.phase = "Invalid" if reason == "InvalidSpec" else "Pending"
        elif status.phase == "Invalid":
            status.phase = "Pending"
        if ready is not None:
            set_condition(status, "Ready", ready, reason, message, generation)
        return status

    meta = body["metadata"]
    return write(state, meta["namespace"], meta["name"], change, uid=meta.get("uid")) is not None


def _message(error: SpecError, body: dict[str, Any]) -> str:
    return str(error).removeprefix(f"{validate.source(body)}: ")


def reconcile(state: State, namespace: str, name: str) -> str:
    """One pass; returns the outcome (for metrics) or raises Retry."""
    body = state.api.get_run(namespace, name)
    if body is None or body["metadata"].get("deletionTimestamp"):
        return "skipped"
    try:
        run = validate.check(body)
        refused = validate.changed(_applied_fields(body), run)
        secret = run.spec.storage.credentials_secret
        keys = {} if refused else bucket.credentials(state.api, namespace, secret)
    except MissingSecret as e:
        record(state, body, False, "InvalidSpec", _message(e, body))
        raise Retry(str(e)) from None
    except SpecError as e:
        record(state, body, False, "InvalidSpec", _message(e, body))
        return "invalid"
    applied = current(body).applied
    if applied and run.spec.backend not in ("auto", applied.backend):
        refused.append(f"spec.backend: {applied.backend!r} -> {run.spec.backend!r}")
    if refused:
        record(state, body, False, "ImmutableFieldChanged",
                f"cannot change under running jobs, nothing applied: {'; '.join(refused)}; "
                "revert these fields (or create a new Codistillation)")
        return "refused"
    try:
        backend = choose(run, applied.backend if applied else None,
                         lambda: state.detector.trainjob_problem(state.api.trainer_schema))
        return _apply(state, body, run, keys, backend)
    except Unavailable as e:
        record(state, body, False, e.reason, str(e))
        raise


def _applied_fields(body: dict[str, Any]) -> dict[str, Any]:
    applied = current(body).applied
    return applied.fields if applied else {}


def _apply(state: State, body: dict[str, Any], run: Codistillation, keys: dict[str, str],
           backend: str) -> str:
    namespace, generation = run.metadata.namespace, run.metadata.generation
    storage, kind = run.spec.storage, KINDS[backend]
    url = names.run_url(storage.url, namespace, run.metadata.name)
    cannot = jobs.unsupported(run, backend)
    if cannot:
        record(state, body, False, "InvalidSpec", f"backend {backend}: {'; '.join(cannot)} "
               "(or set spec.backend: pytorchjob)")
        return "invalid"
    want = children.desired(run, body, url, backend)
    problem = _refused_by_api(state, kind, namespace, want, run.spec.backend)
    if problem:
        record(state, body, False, "InvalidSpec", problem)
        return "invalid"
    try:
        folder = bucket.open_folder(url, storage.endpoint, keys)
        archived = bucket.write_run(folder, run)
    except StorageError as e:
        record(state, body, False, "StorageUnavailable", str(e))
        raise Retry(str(e)) from None
    if archived:
        post(state, body, "Normal", "RunFolderArchived", f"{url} held an earlier run of this "
             f"name; moved to {archived}, this run starts fresh")
    d = run.spec.distillation
    applied = Applied(generation=generation, fields=validate.frozen(run), backend=backend,
                      burn_in_steps=d.burn_in_steps, max_staleness_steps=d.max_staleness_steps)
    # Recorded before the jobs change, on purpose: an operator that dies half-way then still
    # knows what the jobs hold, and refuses an immutable change made in the meantime.
    if not record(state, body, None, applied=applied, url=url):
        return "skipped"  # deleted meanwhile: its jobs would only wait for the collector
    try:
        _converge(state, body, run, folder, want, kind)
    except JobConflict as e:
        record(state, body, False, "JobConflict", str(e))
        raise Retry(str(e)) from None
    record(state, body, True, "Applied",
            f"{run.spec.groups} {kind.kind}s at generation {generation}")
    return "applied"


def _refused_by_api(state: State, kind: JobKind, namespace: str, want: list[dict[str, Any]],
                    requested: str) -> str | None:
    """Why the API server (the job CRD's schema, the Kubeflow controller's webhook, admission)
    would refuse a job as rendered, asked by a dry run before anything is written; None if not.
    Such a spec can never run, so it is refused once instead of retried forever. A job API
    that is not served at all is a missing backend, which may yet be installed (Unavailable)."""
    for job in want:
        try:
            state.api.create_job(kind, namespace, job, dry_run=True)
        except ApiException as e:
            if e.status == 404:
                raise Unavailable("BackendUnavailable", _missing(kind, requested)) from None
            if e.status not in (400, 422):
                raise
            reason = api_message(e)
            return f"spec: the {kind.kind} {job['metadata']['name']} it renders is refused: {reason}"
    return None


def _missing(kind: JobKind, requested: str) -> str:
    served = f"no {kind.group}/{kind.version} {kind.kind} API"
    if requested == "auto":
        return (f"spec.backend: auto: neither Kubeflow Trainer v2 (>= 2.2) nor the Training "
                f"Operator (v1.9) is installed ({served}); install one of them")
    owner = "Kubeflow Trainer v2" if kind.kind == names.TRAINJOB_KIND else "the Training Operator"
    return f"spec.backend: {requested}: {owner} is not installed ({served})"


def _finished(folder: RunFolder, body: dict[str, Any], missing: list[str]) -> set[str]:
    """The jobs among `missing` whose group has finished (status, or its final.json): a job
    removed after the end (ttlSecondsAfterFinished) must not be created again."""
    groups = {names.job_name(body["metadata"]["name"], g.group): g for g in current(body).groups}
    done = set()
    for name in missing:
        seen = groups.get(name)
        group = int(name.rsplit("-g", 1)[1])
        if (seen and seen.phase in TERMINAL) or folder.final(group) is not None:
            done.add(name)
    return done


def _converge(state: State, body: dict[str, Any], run: Codistillation, folder: RunFolder,
              want: list[dict[str, Any]], kind: JobKind) -> None:
    """Exactly one job per unfinished group, each matching the current rendering."""
    api, namespace = state.api, run.metadata.namespace
    have = [j for j in api.list_jobs(kind, namespace, body)
            if not j["metadata"].get("deletionTimestamp")]  # a replaced job on its way out
    present = {j["metadata"]["name"] for j in have}
    done = _finished(folder, body, [j["metadata"]["name"] for j in want
                                    if j["metadata"]["name"] not in present])
    plan = children.plan([j for j in want if j["metadata"]["name"] not in done], have)
    waiting = _pods_left(state, run, plan.create)
    created = []
    for job in [j for j in plan.create if j["metadata"]["name"] not in waiting]:
        name = job["metadata"]["name"]
        if api.create_job(kind, namespace, job):
            created.append(name)
            continue
        existing = api.get_job(kind, namespace, name)  # an earlier delivery's, or not ours
        if existing is None or owner_uid(existing) != body["metadata"]["uid"]:
            raise JobConflict(f"{kind.kind} {namespace}/{name} exists and is owned by something "
                              "else; delete it or rename this Codistillation")
        if existing["metadata"].get("deletionTimestamp"):  # replaced, not gone yet
            raise Retry(f"{kind.kind} {namespace}/{name} is being replaced; created once gone")
        plan.update.extend(children.plan([job], [existing]).update)
    for name, ops in plan.update:
        api.patch_job(kind, namespace, name, ops)
    for name in [*plan.delete, *plan.replace]:
        api.delete_job(kind, namespace, name)
    _announce(state, body, run, created, plan, have, kind.kind)
    if plan.replace or waiting:  # created once the old pods are gone, by this retry
        raise Retry(f"{kind.kind}s {', '.join(plan.replace or sorted(waiting))} replaced: "
                    "created again once their pods are gone")


def _pods_left(state: State, run: Codistillation, create: list[dict[str, Any]]) -> set[str]:
    """The jobs among `create` whose group still has pods (of a job just deleted): creating it
    now would run two generations of one group at once, both writing its folder."""
    if not create:
        return set()
    groups = {p["metadata"].get("labels", {}).get(names.LABEL_GROUP)
              for p in state.api.list_pods(run.metadata.namespace, run.metadata.name)}
    return {j["metadata"]["name"] for j in create
            if j["metadata"]["labels"][names.LABEL_GROUP] in groups}


def _announce(state: State, body: dict[str, Any], run: Codistillation, created: list[str],
              plan: children.Plan, have: list[dict[str, Any]], kind: str) -> None:
    if created:
        post(state, body, "Normal", "JobsCreated", f"created {kind}s {', '.join(created)}")
    if plan.update:
        suspend = run.spec.run_policy.suspend
        before = {j["metadata"]["name"]: children.suspended(j) for j in have}
        flipped = any(before.get(name, suspend) != suspend for name, _ in plan.update)
        reason = ("Suspended" if suspend else "Resumed") if flipped else "JobsUpdated"
        updated = ", ".join(name for name, _ in plan.update)
        post(state, body, "Normal", reason, f"{UPDATED[reason]} {kind}s {updated} to generation "
             f"{run.metadata.generation} (running pods pick up other changes when restarted)")
    if plan.replace:
        post(state, body, "Normal", "JobsReplaced", f"deleted {kind}s {', '.join(plan.replace)} "
             f"to create them again at generation {run.metadata.generation} (a {kind}'s spec "
             "cannot change): their groups resume from their last state in the bucket")
    if plan.delete:
        post(state, body, "Normal", "JobsDeleted", f"deleted {kind}s {', '.join(plan.delete)}")
