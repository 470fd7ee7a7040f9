"""The run folder in the bucket, as the operator uses it: run.json in, progress.json out.

Credentials come only from the run's Secret (never from the spec, never logged). Nothing read
from the bucket is unpickled: run.json and progress.json are JSON, parsed and validated.
"""

from __future__ import annotations

from typing import Any

import s3fs
from codistill_trainer import layout
from codistill_trainer.spec import Codistillation, SpecError, parse
from codistill_trainer.storage import Bucket, StorageError

from . import validate
from .api import Api
from .runstatus import RunStatus


def credentials(api: Api, namespace: str, secret: str | None) -> dict[str, str]:
    """The keys in the run's Secret ({} without one); MissingSecret when missing or incomplete."""
    data = api.read_secret(namespace, secret) if secret else None
    return validate.credentials(secret, data, namespace)


def open_folder(url: str, endpoint: str | None, keys: dict[str, str]) -> Bucket:
    return fail_fast(Bucket(url, endpoint, keys or None))


def fail_fast(bucket: Bucket) -> Bucket:
    """One attempt per S3 request (the operator retries whole reconciles later): an unreachable
    bucket then costs seconds per reconcile, not the minute that botocore's and s3fs's nested
    retries add up to, which would stall the status of every other run."""
    if isinstance(bucket.fs, s3fs.S3FileSystem):
        options = dict(bucket.fs.storage_options)
        options["config_kwargs"] = {
            "retries": {"max_attempts": 1, "mode": "standard"},
            "connect_timeout": 5,
            "read_timeout": 30,
        }
        bucket.fs = s3fs.S3FileSystem(**options)
        bucket.fs.retries = 1
    return bucket


def applied_folder(api: Api, namespace: str, status: RunStatus) -> Bucket | None:
    """The folder the applied generation uses (None before one was applied)."""
    if status.applied is None or not status.bucket:
        return None
    fields = status.applied.fields
    keys = credentials(api, namespace, fields.get("storage.credentialsSecret"))
    return open_folder(status.bucket, fields.get("storage.endpoint"), keys)


def write_run(bucket: Bucket, run: Codistillation) -> bool:
    """Create the bucket if missing and write run.json once per generation; True if written."""
    bucket.ensure()
    current = bucket.get_json(layout.RUN_JSON)
    generation = run.metadata.generation
    if isinstance(current, dict) and current.get("metadata", {}).get("generation") == generation:
        return False
    bucket.put_json(layout.RUN_JSON, run.resolved())
    return True


def read_run(bucket: Bucket) -> Codistillation | None:
    """The spec in force (run.json), or None when missing or unreadable."""
    try:
        doc = bucket.get_json(layout.RUN_JSON)
        return parse(doc, f"{bucket.url}/{layout.RUN_JSON}") if doc is not None else None
    except (StorageError, SpecError, ValueError):
        return None


def read_progress(bucket: Bucket, groups: int) -> dict[int, Any]:
    """Each group's progress.json that exists, as parsed JSON (StorageError when the bucket
    cannot be read). Not JSON at all is passed on as text: the aggregator reports it."""
    found = {}
    for g in range(groups):
        try:
            doc = bucket.get_json(layout.progress_file(g))
        except ValueError:
            doc = "not JSON"
        if doc is not None:
            found[g] = doc
    return found
