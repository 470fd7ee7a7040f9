"""`storage.onDelete: Delete`: remove the run folder before the resource goes.

Jobs go first (their pods must not write into a folder being removed), then the folder. A bucket
that stays unreachable must not hold the resource forever: after `delete_attempts` tries the
operator posts a Warning naming the folder and lets the resource go.
"""

from __future__ import annotations

from kubernetes.client.exceptions import ApiException

from codistill.storage import StorageError

from . import bucket
from .errors import MissingSecret, Retry
from .runtime import State
from .status.write import current, job_kind, post


def remove_folder(state: State, namespace: str, name: str, attempt: int) -> str:
    """One try (kopf counts them in `attempt`, from 0); returns the outcome or raises Retry."""
    api, body = state.api, state.api.get_run(namespace, name)
    if body is None:
        return "gone"
    meta, status = body["metadata"], current(body)
    last = attempt + 1 >= state.config.delete_attempts
    kind = job_kind(status)
    for job in api.list_jobs(kind, meta["namespace"], body):
        if not job["metadata"].get("deletionTimestamp"):
            api.delete_job(kind, meta["namespace"], job["metadata"]["name"])
    # Until every trainer has stopped: one still running would write into the removed folder.
    remaining = [*api.list_jobs(kind, meta["namespace"], body),
                 *api.list_pods(meta["namespace"], meta["name"])]
    if remaining and not last:
        raise Retry(f"waiting for {len(remaining)} {kind.kind}s and pods to go before removing "
                    "the folder")
    try:
        folder = bucket.applied_folder(api, meta["namespace"], status)
        if folder is None:
            return "nothing"
        folder.bucket.rm("")
    except (StorageError, MissingSecret, ApiException) as e:
        if not last:
            raise Retry(f"run folder {status.bucket} not removed yet: {e}") from None
        post(state, body, "Warning", "RunFolderKept",
             f"could not remove {status.bucket} after {attempt + 1} attempts ({e}); "
             "releasing the resource: remove the folder by hand")
        return "released"
    post(state, body, "Normal", "RunFolderDeleted", f"removed {status.bucket}")
    return "deleted"
