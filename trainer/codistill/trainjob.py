"""Render a run spec into one Kubeflow Trainer v2 TrainJob per group (Trainer >= 2.2).

The other backend beside pytorchjob.py, with the same contract: the same env, labels, security
and user template, expressed the way a TrainJob takes them. A TrainJob holds no pod template: it
names a ClusterTrainingRuntime (the chart installs `codistill`), sets the trainer's image,
command, env, nodes and resources, and changes the runtime's pods only through a runtime patch,
which may set a fixed list of pod fields. What of a run cannot be said so is refused by
`unsupported`, field by field, before anything is created.
"""

from __future__ import annotations

from typing import Any

from . import names
from .names import CONTAINER, TRAINJOB_CONTAINER, TRAINJOB_REPLICATED_JOB
from .pytorchjob import (
    CONTAINER_SECURITY,
    POD_SECURITY,
    SHM_MOUNT,
    SHM_VOLUME,
    contract_env,
    job_labels,
    labels,
    merge,
)
from .spec import Codistillation

API_VERSION = f"{names.TRAINER_GROUP}/{names.TRAINER_VERSION}"
MANAGER = f"{names.API_GROUP}/operator"  # our runtime patch's key (Kueue writes its own)
# torchrun reads the PET_* variables the torch plugin injects: nodes, node rank, master, port.
COMMAND = ["torchrun", "-m", "codistill_trainer.worker"]
# The pod fields a runtime patch may set (Trainer v2.3's RuntimePatch API; the last is new in
# 2.3). Anything else of a pod is the ClusterTrainingRuntime's.
PATCHABLE_POD = ("serviceAccountName", "volumes", "initContainers", "imagePullSecrets",
                 "securityContext", "nodeSelector", "affinity", "tolerations", "schedulingGates",
                 "terminationGracePeriodSeconds")
# Of the trainer container: env and resources go to the TrainJob's trainer, the rest to the patch.
TRAINER_FIELDS = ("name", "env", "resources", "volumeMounts", "securityContext")
# runPolicy fields a TrainJob has no place for: restarts and clean-up are its runtime's.
RUNTIME_OWNED = {
    "backoffLimit": "restarts are the ClusterTrainingRuntime's (its Job backoffLimit and "
                    "JobSet failurePolicy; chart: trainJobRuntime.backoffLimit)",
    "ttlSecondsAfterFinished": "a TrainJob has no TTL",
    "schedulingPolicy": "gang scheduling is the runtime's podGroupPolicy",
}


def unsupported(run: Codistillation) -> list[str]:
    """`field: why` for each setting of the run that a TrainJob cannot carry (empty: none)."""
    where, problems = "spec.template.spec", []
    policy = run.spec.run_policy.model_dump(by_alias=True)
    problems += [f"spec.runPolicy.{key}: {why}" for key, why in RUNTIME_OWNED.items()
                 if policy.get(key) is not None]
    pod = (run.spec.template or {}).get("spec") or {}
    problems += [f"{where}.{key}: a TrainJob's runtime patch cannot set it; put it in your own "
                 f"ClusterTrainingRuntime (spec.runtime)"
                 for key in pod if key not in (*PATCHABLE_POD, "containers")]
    for i, container in enumerate(pod.get("containers") or []):
        if container.get("name") != CONTAINER:
            problems.append(f"{where}.containers[{i}]: sidecar {container.get('name')!r}: put "
                            "it in your own ClusterTrainingRuntime (spec.runtime)")
            continue
        problems += [f"{where}.containers[{i}].{key}: only {', '.join(TRAINER_FIELDS[1:])} of "
                     f"the trainer container can be set on a TrainJob"
                     for key in container if key not in TRAINER_FIELDS]
        problems += [f"{where}.containers[{i}].env: {var['name']} is reserved: Kubeflow "
                     f"Trainer sets it" for var in container.get("env") or []
                     if var.get("name") in names.TORCHRUN_ENV]
    return problems


def _trainer(run: Codistillation, group: int, run_url: str, user: dict[str, Any]) -> dict:
    """The TrainJob's `trainer`: image, command, nodes and the env (the contract's wins)."""
    ours = contract_env(run, group, run_url, TRAINJOB_CONTAINER)
    taken = {e["name"] for e in ours}
    trainer: dict[str, Any] = {
        "image": run.spec.image,
        "command": COMMAND,
        "env": [e for e in user.get("env", []) if e.get("name") not in taken] + ours,
        "numNodes": run.spec.workers_per_group,
        "numProcPerNode": run.spec.nproc_per_worker,
    }
    if user.get("resources"):
        trainer["resourcesPerNode"] = user["resources"]
    return trainer


def _pod_patch(run: Codistillation, group: int, user: dict[str, Any]) -> dict[str, Any]:
    """The runtime patch of the trainer pods: our labels and Pod Security `restricted`
    defaults, with the user's patchable fields merged in."""
    user_spec = user.get("spec") or {}
    trainer = next((c for c in user_spec.get("containers") or [] if c.get("name") == CONTAINER),
                   {})
    container: dict[str, Any] = {
        "name": TRAINJOB_CONTAINER,
        "securityContext": merge(CONTAINER_SECURITY, trainer.get("securityContext") or {}),
    }
    mounts = list(trainer.get("volumeMounts") or [])
    spec = merge({"securityContext": POD_SECURITY},
                 {k: v for k, v in user_spec.items() if k in PATCHABLE_POD})
    if run.spec.nproc_per_worker > 1:  # NCCL between a pod's processes wants a real /dev/shm
        mounts.append(SHM_MOUNT)
        spec["volumes"] = [*spec.get("volumes", []), SHM_VOLUME]
    if mounts:
        container["volumeMounts"] = mounts
    spec["containers"] = [container]
    meta = merge({"labels": labels(run, group)}, user.get("metadata") or {})
    return {"metadata": meta, "spec": spec}


def render_job(run: Codistillation, group: int, run_url: str) -> dict[str, Any]:
    """One group's TrainJob: workersPerGroup nodes of nprocPerWorker processes each."""
    user = run.spec.template or {}
    containers = (user.get("spec") or {}).get("containers") or []
    trainer = next((c for c in containers if c.get("name") == CONTAINER), {})
    patch = {"manager": MANAGER, "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": [
        {"name": TRAINJOB_REPLICATED_JOB,
         "template": {"spec": {"template": _pod_patch(run, group, user)}}},
    ]}}}}
    policy = run.spec.run_policy
    spec: dict[str, Any] = {
        "runtimeRef": {"name": run.spec.runtime, "apiGroup": names.TRAINER_GROUP,
                       "kind": names.RUNTIME_KIND},
        "trainer": _trainer(run, group, run_url, trainer),
        "runtimePatches": [patch],
        "suspend": policy.suspend,
    }
    if policy.active_deadline_seconds is not None:
        spec["activeDeadlineSeconds"] = policy.active_deadline_seconds
    return {
        "apiVersion": API_VERSION,
        "kind": names.TRAINJOB_KIND,
        "metadata": {"name": run.job_name(group), "namespace": run.metadata.namespace,
                     "labels": job_labels(run, group)},
        "spec": spec,
    }


def render_jobs(run: Codistillation, run_url: str) -> list[dict[str, Any]]:
    return [render_job(run, g, run_url) for g in range(run.spec.groups)]
