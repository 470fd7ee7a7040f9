"""Names every part shares, defined once: the API, labels, the env contract, bucket paths.

The operator, the local launcher and the trainer all read them from here, so they cannot
disagree (docs/architecture.md lists the contracts they make up).
"""

from __future__ import annotations

# The Codistillation API.
API_GROUP = "codistill.io"
API_VERSION = "v1alpha1"
KIND = "Codistillation"
PLURAL = "codistillations"
MANAGED_BY = "codistill-operator"  # jobs' managed-by label, events' source component

# The Kubeflow Training Operator's PyTorchJob (v1.9), which runs each group.
KUBEFLOW_GROUP = "kubeflow.org"
KUBEFLOW_VERSION = "v1"
PYTORCHJOB_PLURAL = "pytorchjobs"
PYTORCHJOB_KIND = "PyTorchJob"
CONTAINER = "pytorch"  # the trainer container: the controller's default port and name (it injects
# MASTER_ADDR, RANK, WORLD_SIZE, PET_* into every container of the pod, sidecars too)
MASTER_PORT = 23456  # the Training Operator's default port, named `pytorchjob-port`

# Kubeflow Trainer v2's TrainJob (>= 2.2: runtimePatches), the other backend. Its torch runtime
# runs each node's container `node` of the replicated job `node` and injects only PET_* (torchrun's
# own variables), reserved: a TrainJob that sets one is refused.
TRAINER_GROUP = "trainer.kubeflow.org"
TRAINER_VERSION = "v1alpha1"
TRAINJOB_PLURAL = "trainjobs"
TRAINJOB_KIND = "TrainJob"
TRAINJOB_CONTAINER = "node"
TRAINJOB_REPLICATED_JOB = "node"
RUNTIME_KIND = "ClusterTrainingRuntime"
TORCHRUN_ENV = ("PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR",
                "PET_MASTER_PORT")
BACKENDS = ("auto", "trainjob", "pytorchjob")

# Env contract into every trainer container, beside what the Training Operator injects.
ENV_RUN_URL = "CODISTILL_RUN_URL"
ENV_GROUP = "CODISTILL_GROUP"
ENV_GROUPS = "CODISTILL_GROUPS"
ENV_CPUS = "CODISTILL_CPUS"  # the container's CPU limit (cores, rounded up), for torch's threads
ENV_TASKS = "CODISTILL_TASKS"  # import paths of tasks a trainer may import (comma-separated)
ENV_ENDPOINT = "AWS_ENDPOINT_URL"
ENV_ACCESS_KEY = "AWS_ACCESS_KEY_ID"
ENV_SECRET_KEY = "AWS_SECRET_ACCESS_KEY"
CREDENTIAL_KEYS = (ENV_ACCESS_KEY, ENV_SECRET_KEY)

# Labels on every job (and so on its pods).
LABEL_NAME = "app.kubernetes.io/name"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_RUN = f"{API_GROUP}/run"
LABEL_GROUP = f"{API_GROUP}/group"
LABEL_QUEUE = "kueue.x-k8s.io/queue-name"

# Blobs kept per channel: a reader in mid-download of the previous blob must never lose it.
KEEP_BLOBS = 3


def job_name(run: str, group: int) -> str:
    """The job of group `group` of run `run`: `<run>-g<group>` (a DNS-1035 label)."""
    return f"{run}-g{group}"


def replica_name(job: str, replica_type: str, index: int) -> str:
    """The pods and Services the Training Operator names after a job's replicas."""
    return f"{job}-{replica_type.lower()}-{index}"


def longest_name(run: str, groups: int, workers_per_group: int) -> str:
    """The longest name derived from a run: its last group's last Service (a DNS-1035 label,
    so at most 63 characters)."""
    job = job_name(run, groups - 1)
    if workers_per_group > 1:
        return replica_name(job, "Worker", workers_per_group - 2)
    return replica_name(job, "Master", 0)


def run_url(storage_url: str, namespace: str, name: str) -> str:
    """The run folder: `<storage.url>/<namespace>/<name>`."""
    return f"{storage_url.rstrip('/')}/{namespace}/{name}"


# Paths inside one run folder, relative to it (docs/architecture.md, "The bucket").
RUN_JSON = "run.json"
REPORT = "report"
REPORT_JSON = f"{REPORT}/report.json"
CURVES_PNG = f"{REPORT}/curves.png"
SUMMARY_MD = f"{REPORT}/summary.md"
POINTER = "LATEST.json"  # the commit point of a channel of immutable blobs


def group_dir(g: int) -> str:
    return f"groups/{g}"


def teacher_dir(g: int) -> str:
    """Channel of weights published for peers (safetensors only)."""
    return f"{group_dir(g)}/teacher"


def state_dir(g: int) -> str:
    """Channel of full training state for resume (read by the group itself only)."""
    return f"{group_dir(g)}/state"


def progress_file(g: int) -> str:
    return f"{group_dir(g)}/progress.json"


def final_file(g: int) -> str:
    """Written once a group has finished all its steps."""
    return f"{group_dir(g)}/final.json"
