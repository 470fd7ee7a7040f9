"""The PyTorchJobs a run should have, and the steps that make the cluster hold exactly those.

Pure functions over plain dicts. Each job carries the hash of its rendering, so a job that no
longer matches the spec (changed while the operator was down, or half-way through an update) is
found and patched rather than silently left stale.
"""

from __future__ import annotations

import copy
import hashlib
import json
from typing import Any, NamedTuple

from codistill.names import API_GROUP, API_VERSION, KIND, LABEL_QUEUE
from codistill.pytorchjob import render_jobs
from codistill.spec import Codistillation

from .names import SPEC_HASH


class Plan(NamedTuple):
    create: list[dict[str, Any]]
    update: list[tuple[str, list[dict[str, Any]]]]  # job name, JSON patch
    delete: list[str]


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


def spec_hash(job: dict[str, Any]) -> str:
    essence = {"labels": job["metadata"].get("labels"), "spec": job["spec"]}
    return hashlib.sha256(json.dumps(essence, sort_keys=True).encode()).hexdigest()[:16]


def desired(run: Codistillation, body: dict[str, Any], run_url: str) -> list[dict[str, Any]]:
    """`render_jobs` (shared with the local launcher) plus ownership and the rendering's hash."""
    jobs = render_jobs(run, run_url)
    for job in jobs:
        meta = job["metadata"]
        meta["ownerReferences"] = [owner_reference(body)]
        meta["annotations"] = {SPEC_HASH: spec_hash(job)}
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


def patch_ops(want: dict[str, Any], have: dict[str, Any]) -> list[dict[str, Any]]:
    """A JSON patch bringing a job to our rendering, without undoing what others set on it.

    With a queue (Kueue), `runPolicy.suspend: false` is Kueue's to set, on admission: a resume
    leaves the live value alone. Labels, annotations and what admission injected into the pod
    templates are merged, not replaced."""
    spec = copy.deepcopy(want["spec"])
    live = have.get("spec") or {}
    if LABEL_QUEUE in want["metadata"]["labels"] and not spec["runPolicy"].get("suspend"):
        spec["runPolicy"]["suspend"] = bool((live.get("runPolicy") or {}).get("suspend"))
    for role, replica in spec["pytorchReplicaSpecs"].items():
        live_replica = (live.get("pytorchReplicaSpecs") or {}).get(role) or {}
        _keep_injected(replica["template"], live_replica.get("template") or {})
    meta, live_meta = want["metadata"], have["metadata"]
    return [
        {"op": "replace", "path": "/spec", "value": spec},
        {"op": "add", "path": "/metadata/labels",
         "value": _merged(meta["labels"], live_meta.get("labels"))},
        {"op": "add", "path": "/metadata/annotations",
         "value": _merged(meta["annotations"], live_meta.get("annotations"))},
    ]


def plan(want: list[dict[str, Any]], have: list[dict[str, Any]]) -> Plan:
    """Create the missing, patch the stale, delete the ones no group needs."""
    existing = {job["metadata"]["name"]: job for job in have}
    wanted = {job["metadata"]["name"] for job in want}
    create, update = [], []
    for job in want:
        old = existing.get(job["metadata"]["name"])
        if old is None:
            create.append(job)
        elif (old["metadata"].get("annotations") or {}).get(SPEC_HASH) != spec_hash(job):
            update.append((job["metadata"]["name"], patch_ops(job, old)))
    return Plan(create, update, sorted(set(existing) - wanted))


def suspended(job: dict[str, Any]) -> bool:
    return bool((job.get("spec") or {}).get("runPolicy", {}).get("suspend"))
