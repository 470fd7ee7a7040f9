"""Names shared by every part: the bucket layout, the env contract and the labels.

Defined once here (torch-free) so that the operator, the launcher and the trainer cannot disagree.
"""

from __future__ import annotations

# Env contract into every trainer container, beside what the Training Operator injects.
ENV_RUN_URL = "CODISTILL_RUN_URL"
ENV_GROUP = "CODISTILL_GROUP"
ENV_GROUPS = "CODISTILL_GROUPS"
ENV_ENDPOINT = "AWS_ENDPOINT_URL"
ENV_ACCESS_KEY = "AWS_ACCESS_KEY_ID"
ENV_SECRET_KEY = "AWS_SECRET_ACCESS_KEY"
CREDENTIAL_KEYS = (ENV_ACCESS_KEY, ENV_SECRET_KEY)

# Labels on every PyTorchJob (and so on its pods).
LABEL_RUN = "codistill.io/run"
LABEL_GROUP = "codistill.io/group"
LABEL_QUEUE = "kueue.x-k8s.io/queue-name"

# Blobs kept per channel: a reader in mid-download of the previous blob must never lose it.
KEEP_BLOBS = 3


def run_url(storage_url: str, namespace: str, name: str) -> str:
    """The run folder: `<storage.url>/<namespace>/<name>`."""
    return f"{storage_url.rstrip('/')}/{namespace}/{name}"


# Paths inside one run folder, relative to it (see ARCHITECTURE.md, "The bucket").
RUN_JSON = "run.json"
REPORT = "report"
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
