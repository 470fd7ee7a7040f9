"""Render a run spec into one Kubeflow PyTorchJob per group (Training Operator v1.9).

Pure functions returning plain dicts, shared by the operator (which creates them) and the local
launcher (which runs their containers as local processes), so both run exactly the same thing.
Every job must validate against Kubeflow's PyTorchJob CRD and meet its webhook rules.
"""

from __future__ import annotations

import copy
from typing import Any

from . import names
from .names import CONTAINER, MASTER_PORT
from .spec import Codistillation

API_VERSION = f"{names.KUBEFLOW_GROUP}/{names.KUBEFLOW_VERSION}"
WORKER_COMMAND = ["python", "-m", "codistill_trainer.worker"]
TRAINER_UID = 10001  # the trainer image's user (Dockerfile)
# Pod Security `restricted`, by default. The user and group are set at pod level, not only
# runAsNonRoot: the Training Operator injects an init container (`init-pytorch`, an image that
# runs as root) into Workers, which inherits them; with runAsNonRoot alone it is refused.
POD_SECURITY = {
    "runAsNonRoot": True,
    "runAsUser": TRAINER_UID,
    "runAsGroup": TRAINER_UID,
    "seccompProfile": {"type": "RuntimeDefault"},
}
CONTAINER_SECURITY = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
SHM_VOLUME = {"name": "codistill-shm", "emptyDir": {"medium": "Memory"}}
SHM_MOUNT = {"name": "codistill-shm", "mountPath": "/dev/shm"}


def contract_env(run: Codistillation, group: int, run_url: str,
                 container: str = CONTAINER) -> list[dict[str, Any]]:
    """The env contract (docs/architecture.md); credentials only as references to the Secret.
    `container`: the trainer container's name, whose CPU limit sizes torch's threads."""
    env: list[dict[str, Any]] = [
        {"name": names.ENV_RUN_URL, "value": run_url},
        {"name": names.ENV_GROUP, "value": str(group)},
        {"name": names.ENV_GROUPS, "value": str(run.spec.groups)},
        # torch sizes its thread pool by the node's cores, not the pod's limit, unless told
        {"name": names.ENV_CPUS, "valueFrom": {"resourceFieldRef": {
            "containerName": container, "resource": "limits.cpu", "divisor": "1"}}},
    ]
    if ":" in run.spec.task.name:  # from the Codistillation, not from the bucket's run.json
        env.append({"name": names.ENV_TASKS, "value": run.spec.task.name})
    storage = run.spec.storage
    if storage.endpoint:
        env.append({"name": names.ENV_ENDPOINT, "value": storage.endpoint})
    if storage.credentials_secret:
        env += [
            {
                "name": key,
                "valueFrom": {"secretKeyRef": {"name": storage.credentials_secret, "key": key}},
            }
            for key in names.CREDENTIAL_KEYS
        ]
    return env


def labels(run: Codistillation, group: int | None = None) -> dict[str, str]:
    found = {
        names.LABEL_NAME: "codistill",
        names.LABEL_MANAGED_BY: names.MANAGED_BY,
        names.LABEL_RUN: run.metadata.name,
    }
    if group is not None:
        found[names.LABEL_GROUP] = str(group)
    return found


def job_labels(run: Codistillation, group: int) -> dict[str, str]:
    """A job's labels: its pods' and, with a queue, Kueue's (which then admits it)."""
    found = labels(run, group)
    if run.spec.run_policy.queue_name:
        found[names.LABEL_QUEUE] = run.spec.run_policy.queue_name
    return found


def merge(base: Any, extra: Any) -> Any:
    """Deep-merge `extra` (the user's template) into `base`; lists are replaced, not merged."""
    if isinstance(base, dict) and isinstance(extra, dict):
        out = dict(base)
        for key, value in extra.items():
            out[key] = merge(base[key], value) if key in base else copy.deepcopy(value)
        return out
    return copy.deepcopy(extra)


def _container(run: Codistillation, group: int, run_url: str, user: dict[str, Any]) -> dict:
    """The `pytorch` container: the user's settings, then ours; the contract env always wins."""
    ours = contract_env(run, group, run_url)
    taken = {e["name"] for e in ours}
    user_env = [e for e in user.get("env", []) if e.get("name") not in taken]
    container = merge(user, {
        "name": CONTAINER,
        "image": run.spec.image,
        "command": WORKER_COMMAND,
        "ports": [{"name": "pytorchjob-port", "containerPort": MASTER_PORT}],
    })
    container["env"] = user_env + ours
    container["securityContext"] = merge(CONTAINER_SECURITY, user.get("securityContext") or {})
    if run.spec.nproc_per_worker > 1:  # NCCL between a pod's processes wants a real /dev/shm
        container["volumeMounts"] = [*user.get("volumeMounts", []), SHM_MOUNT]
    return container


def pod_template(run: Codistillation, group: int, run_url: str) -> dict[str, Any]:
    """The pod template of every replica of a group, with the user's `template` merged in."""
    user = copy.deepcopy(run.spec.template or {})
    user_spec = user.pop("spec", {}) or {}
    containers = user_spec.pop("containers", []) or []
    trainer = next((c for c in containers if c.get("name") == CONTAINER), {})
    sidecars = [c for c in containers if c.get("name") != CONTAINER]
    # Trainers never call the Kubernetes API: no token in their pods; and no docker-link
    # variables, which a Service named like a setting (codistill-group) would turn into env.
    defaults = {"securityContext": POD_SECURITY, "automountServiceAccountToken": False,
                "enableServiceLinks": False}
    spec = merge(defaults, user_spec)
    spec["containers"] = [_container(run, group, run_url, trainer), *sidecars]
    if run.spec.nproc_per_worker > 1:
        spec["volumes"] = [*spec.get("volumes", []), SHM_VOLUME]
    meta = merge({"labels": labels(run, group)}, user.pop("metadata", {}) or {})
    return {"metadata": meta, "spec": spec}


def _run_policy(run: Codistillation) -> dict[str, Any]:
    policy = run.spec.run_policy.model_dump(by_alias=True, exclude={"queue_name"})
    return {k: v for k, v in policy.items() if v is not None}


def render_job(run: Codistillation, group: int, run_url: str) -> dict[str, Any]:
    """One group's PyTorchJob: 1 Master + (workersPerGroup - 1) Workers, nprocPerNode each."""
    template = pod_template(run, group, run_url)
    replica = {"restartPolicy": "OnFailure", "template": template}
    replicas = {"Master": {"replicas": 1, **copy.deepcopy(replica)}}
    if run.spec.workers_per_group > 1:
        replicas["Worker"] = {"replicas": run.spec.workers_per_group - 1, **replica}
    return {
        "apiVersion": API_VERSION,
        "kind": names.PYTORCHJOB_KIND,
        "metadata": {
            "name": run.job_name(group),
            "namespace": run.metadata.namespace,
            "labels": job_labels(run, group),
        },
        "spec": {
            "nprocPerNode": str(run.spec.nproc_per_worker),
            "runPolicy": _run_policy(run),
            "pytorchReplicaSpecs": replicas,
        },
    }


def render_jobs(run: Codistillation, run_url: str) -> list[dict[str, Any]]:
    return [render_job(run, g, run_url) for g in range(run.spec.groups)]
