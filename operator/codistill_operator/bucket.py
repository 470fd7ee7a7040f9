"""The run folder in the bucket, as the operator uses it: run.json in, progress.json out.

Credentials come only from the run's Secret (never from the spec, never logged). Every bucket call
is tried once (`attempts=1`): the operator retries whole reconciles later, and one unreachable
bucket must cost seconds, not the minute nested retries add up to, or it would stall the status
of every other run. Nothing read from the bucket is unpickled: its files are parsed JSON
(`codistill.runfolder`).
"""

from __future__ import annotations

from kubernetes.client.exceptions import ApiException

from codistill.runfolder import Progress, RunFolder
from codistill.spec import Codistillation, SpecError
from codistill.storage import Bucket, StorageError

from . import validate
from .errors import MissingSecret
from .k8s import Api
from .status.schema import RunStatus

TIMEOUT_S = 10.0  # per S3 request: a hung bucket must not hold a status sweep
SECRET_NAMESPACES = "rbac.secretNamespaces"  # the chart value granting Secret `get` (watching all)
ARCHIVED = ".previous-"  # <run folder>.previous-<uid>: an earlier run of the same name
MESSAGE_CHARS = 500  # of a store error in a condition message


def credentials(api: Api, namespace: str, secret: str | None) -> dict[str, str]:
    """The keys in the run's Secret ({} without one); MissingSecret when missing or incomplete,
    or when RBAC forbids reading it (the chart grants Secret `get` only in some namespaces)."""
    try:
        data = api.read_secret(namespace, secret) if secret else None
    except ApiException as e:
        if e.status != 403:
            raise
        raise MissingSecret(
            f"spec.storage.credentialsSecret: the operator may not read Secret {namespace}/"
            f"{secret} (403 Forbidden): add {namespace} to the chart value {SECRET_NAMESPACES}"
        ) from None
    return validate.credentials(secret, data, namespace)


def open_folder(url: str, endpoint: str | None, keys: dict[str, str]) -> RunFolder:
    return RunFolder(Bucket(url, endpoint, keys or None, attempts=1, timeout=TIMEOUT_S))


def applied_folder(api: Api, namespace: str, status: RunStatus) -> RunFolder | None:
    """The folder the applied generation uses (None before one was applied)."""
    if status.applied is None or not status.bucket:
        return None
    fields = status.applied.fields
    keys = credentials(api, namespace, fields.get("storage.credentialsSecret"))
    return open_folder(status.bucket, fields.get("storage.endpoint"), keys)


def write_run(folder: RunFolder, run: Codistillation) -> str | None:
    """Write run.json once per generation.

    Reading run.json is the only probe of the bucket: it stays inside the run folder (credentials
    may reach only a prefix), and a missing bucket fails there with a StorageError saying to
    create it. The operator creates no bucket: the chart's dev store comes with its own.
    A run.json of another resource of this name (deleted and created again: another uid) does
    not belong to this run: the whole folder is first archived beside it, so the new run starts
    fresh and the old one's state is kept. Returns where it went, or None."""
    try:
        current = folder.read_run()
    except SpecError:  # unreadable: replaced by the spec in force
        current = None
    archived = None
    if current is not None and current.metadata.uid not in (None, run.metadata.uid):
        archived = folder.bucket.archive(f"{ARCHIVED}{current.metadata.uid}")
        current = None
    if current is None or current.metadata.generation != run.metadata.generation:
        folder.write_run(run)
    return archived


def read_progress(folder: RunFolder, groups: int) -> dict[int, Progress]:
    """Each group's progress that exists (StorageError when the bucket cannot be read)."""
    found = {g: folder.progress(g) for g in range(groups)}
    return {g: p for g, p in found.items() if p is not None}


def unreachable(url: str, error: StorageError) -> str:
    """The store's failure as one line for a condition: the run folder's URL and the error
    (which names the file and the endpoint; credentials are never in either)."""
    return " ".join(f"store {url} unreachable: {error}".split())[:MESSAGE_CHARS]
