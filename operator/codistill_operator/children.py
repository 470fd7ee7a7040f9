"""The jobs a run should have, and the steps that make the cluster hold exactly those.

Pure functions over plain dicts. Each job carries the hash of its rendering, so a job that no
longer matches the spec (changed while the operator was down, or half-way through an update) is
found and patched rather than silently left stale. A TrainJob's spec is immutable but for
`suspend` and its labels: one whose rest changed is replaced (deleted, then created again; the
group resumes from its last state in the bucket), which `RECREATE_HASH` tells apart.
"""

from __future__ import annotations

import copy
import hashlib
import json
from typing import Any, NamedTuple

from codistill.jobs import RENDER
from codistill.names import API_GROUP, API_VERSION, KIND, LABEL_QUEUE, TRAINJOB_KIND
from codistill.spec import Codistillation

from .names import RECREATE_HASH, SPEC_HASH


class Plan(NamedTuple):
    create: list[dict[str, Any]]
    update: list[tuple[str, list[dict[str, Any]]]]  # job name, JSON patch
    delete: list[str]
    replace: list[str] = []  # TrainJobs deleted now, to be created again once gone


def owner_reference(run: dict[str, Any]) -> dict[str, Any]:
    """Controller reference: deleting the run deletes its jobs (Kubernetes' garbage collector).

    No blockOwnerDeletion: that would need update on codistillations/finalizers, which the
    operator's RBAC does not grant.
    """
    meta = run["metadata"]
    return {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": KIND,
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
    }


def _hash(essence: Any) -> str:
    return hashlib.sha256(json.dumps(essence, sort_keys=True).encode()).hexdigest()[:16]


def spec_hash(job: dict[str, Any]) -> str:
    return _hash({"labels": job["metadata"].get("labels"), "spec": job["spec"]})


def recreate_hash(job: dict[str, Any]) -> str:
    """A TrainJob's immutable part: all of its spec but `suspend`."""
    return _hash({k: v for k, v in job["spec"].items() if k != "suspend"})


def desired(run: Codistillation, body: dict[str, Any], run_url: str,
            backend: str) -> list[dict[str, Any]]:
    """The backend's rendering (shared with `codistill render`; PyTorchJobs also with the
    local launcher) plus ownership and the rendering's hashes."""
    jobs = RENDER[backend](run, run_url)
    for job in jobs:
        meta = job["metadata"]
        meta["ownerReferences"] = [owner_reference(body)]
        meta["annotations"] = {SPEC_HASH: spec_hash(job)}
        if job["kind"] == TRAINJOB_KIND:
            meta["annotations"][RECREATE_HASH] = recreate_hash(job)
    return jobs


def _merged(ours: dict[str, Any] | None, theirs: dict[str, Any] | None) -> dict[str, Any]:
    return {**(theirs or {}), **(ours or {})}


def _keep_injected(template: dict[str, Any], live: dict[str, Any]) -> None:
    """Keep in `template` what Kueue (or another admission controller) added to the live pod
    template on admission: node selectors, tolerations, scheduling gates, labels, annotations.
    Ours win where both set a key; theirs are never wiped by our update."""
    spec, live_spec = template.setdefault("spec", {}), live.get("spec") or {}
    if live_spec.get("nodeSelector"):
        spec["nodeSelector"] = _merged(spec.get("nodeSelector"), live_spec["nodeSelector"])
    for key in ("tolerations", "schedulingGates"):
        added = [x for x in live_spec.get(key) or [] if x not in (spec.get(key) or [])]
        if added:
            spec[key] = [*(spec.get(key) or []), *added]
    meta, live_meta = template.setdefault("metadata", {}), live.get("metadata") or {}
    for key in ("labels", "annotations"):
        if live_meta.get(key):
            meta[key] = _merged(meta.get(key), live_meta[key])


def _metadata_ops(want: dict[str, Any], have: dict[str, Any]) -> list[dict[str, Any]]:
    """Labels and annotations merged, not replaced: others' (Kueue's) stay."""
    meta, live_meta = want["metadata"], have["metadata"]
    return [
        {"op": "add", "path": "/metadata/labels",
         "value": _merged(meta["labels"], live_meta.get("labels"))},
        {"op": "add", "path": "/metadata/annotations",
         "value": _merged(meta["annotations"], live_meta.get("annotations"))},
    ]


def _suspend(want: bool, queued: bool, live: bool) -> bool:
    """With a queue (Kueue), `suspend: false` is Kueue's to set, on admission: a resume
    leaves the live value alone."""
    return bool(live) if queued and not want else want


def patch_ops(want: dict[str, Any], have: dict[str, Any]) -> list[dict[str, Any]]:
    """A JSON patch bringing a job to our rendering, without undoing what others set on it:
    Kueue's suspend, labels, annotations and what admission injected into the pod templates."""
    spec = copy.deepcopy(want["spec"])
    live = have.get("spec") or {}
    queued = LABEL_QUEUE in want["metadata"]["labels"]
    if want["kind"] == TRAINJOB_KIND:  # the rest is the same, or the job is replaced instead
        return [{"op": "replace", "path": "/spec/suspend",
                 "value": _suspend(spec["suspend"], queued, live.get("suspend"))},
                *_metadata_ops(want, have)]
    policy = spec["runPolicy"]
    policy["suspend"] = _suspend(bool(policy.get("suspend")), queued,
                                 (live.get("runPolicy") or {}).get("suspend"))
    for role, replica in spec["pytorchReplicaSpecs"].items():
        live_replica = (live.get("pytorchReplicaSpecs") or {}).get(role) or {}
        _keep_injected(replica["template"], live_replica.get("template") or {})
    return [{"op": "replace", "path": "/spec", "value": spec}, *_metadata_ops(want, have)]


def _stale(want: dict[str, Any], old: dict[str, Any], key: str) -> bool:
    return (old["metadata"].get("annotations") or {}).get(key) != want["metadata"]["annotations"][key]


def plan(want: list[dict[str, Any]], have: list[dict[str, Any]]) -> Plan:
    """Create the missing, patch the stale (replace a TrainJob whose immutable part changed),
    delete the ones no group needs."""
    existing = {job["metadata"]["name"]: job for job in have}
    wanted = {job["metadata"]["name"] for job in want}
    create, update, replace = [], [], []
    for job in want:
        name = job["metadata"]["name"]
        old = existing.get(name)
        if old is None:
            create.append(job)
        elif RECREATE_HASH in job["metadata"]["annotations"] and _stale(job, old, RECREATE_HASH):
            replace.append(name)
        elif _stale(job, old, SPEC_HASH):
            update.append((name, patch_ops(job, old)))
    return Plan(create, update, sorted(set(existing) - wanted), replace)


def suspended(job: dict[str, Any]) -> bool:
    spec = job.get("spec") or {}
    return bool(spec.get("suspend") or (spec.get("runPolicy") or {}).get("suspend"))
