"""All bucket access, over fsspec: local folders, `file://`, `s3://` (and any fsspec URL).

S3 has no rename and no append, so nothing here relies on either: small JSON files are written
with one PUT (atomic to readers), and transient errors are retried with backoff.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from typing import Any, Callable, TypeVar

import fsspec
from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem

from . import layout

log = logging.getLogger(__name__)
T = TypeVar("T")
RETRIES = 4


class StorageError(RuntimeError):
    """The bucket cannot be reached or used; the message names the URL."""


def filesystem(
    url: str, endpoint: str | None = None, credentials: dict[str, str] | None = None
) -> tuple[AbstractFileSystem, str]:
    """The filesystem and root path of `url`.

    S3 credentials come from `credentials` (the operator reads them from the run's Secret) or
    from the environment (a trainer pod gets them from the Secret as env); never from the spec.
    """
    options: dict[str, Any] = {}
    if url.startswith("s3://"):
        endpoint = endpoint or os.environ.get(layout.ENV_ENDPOINT)
        options = {"use_listings_cache": False, "skip_instance_cache": True}
        if endpoint:
            options["endpoint_url"] = endpoint
        if credentials:
            options["key"] = credentials[layout.ENV_ACCESS_KEY]
            options["secret"] = credentials[layout.ENV_SECRET_KEY]
    try:
        fs, path = fsspec.core.url_to_fs(url, **options)
    except (ImportError, ValueError) as e:
        raise StorageError(f"{url}: unsupported storage URL: {e}") from None
    return fs, path.rstrip("/")


def retry(what: str, fn: Callable[[], T], attempts: int = RETRIES) -> T:
    """Run `fn`, retrying transient errors (not missing files) with exponential backoff."""
    for i in range(attempts):
        try:
            return fn()
        except (FileNotFoundError, FileExistsError, PermissionError):
            raise
        except Exception as e:  # network and server errors from any fsspec backend
            if i == attempts - 1:
                raise StorageError(f"{what}: {type(e).__name__}: {e}") from e
            delay = 0.2 * 2**i
            log.warning("%s failed (%s), retrying in %.1fs", what, e, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


class Bucket:
    """One run folder (or any prefix) on a filesystem, addressed by paths relative to its root."""

    def __init__(
        self, url: str, endpoint: str | None = None, credentials: dict[str, str] | None = None
    ):
        self.url = url.rstrip("/")
        self.fs, self.root = filesystem(self.url, endpoint, credentials)

    def path(self, rel: str) -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def put(self, rel: str, data: bytes) -> None:
        """Write a whole object; readers see the old or the new bytes, never a mix."""
        def write() -> None:
            path = self.path(rel)
            self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
            if not isinstance(self.fs, LocalFileSystem):
                self.fs.pipe_file(path, data)  # one PUT: atomic on object stores
                return
            tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"  # a local file is atomic only by rename
            self.fs.pipe_file(tmp, data)
            os.replace(tmp, path)

        retry(f"write {self.url}/{rel}", write)

    def get(self, rel: str) -> bytes:
        return retry(f"read {self.url}/{rel}", lambda: self.fs.cat_file(self.path(rel)))

    def exists(self, rel: str) -> bool:
        return retry(f"stat {self.url}/{rel}", lambda: self.fs.exists(self.path(rel)))

    def ls(self, rel: str) -> list[str]:
        """Names (not paths) directly under `rel`; empty when it does not exist."""
        try:
            found = retry(f"list {self.url}/{rel}", lambda: self.fs.ls(self.path(rel), detail=False))
        except FileNotFoundError:
            return []
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in found)

    def rm(self, rel: str) -> None:
        try:
            retry(f"delete {self.url}/{rel}", lambda: self.fs.rm(self.path(rel), recursive=True))
        except FileNotFoundError:
            pass

    def put_json(self, rel: str, obj: Any) -> None:
        self.put(rel, json.dumps(obj, indent=1, sort_keys=True).encode())

    def get_json(self, rel: str) -> Any:
        """The parsed JSON at `rel`, or None when it does not exist."""
        try:
            return json.loads(self.get(rel))
        except FileNotFoundError:
            return None

    def ensure(self) -> None:
        """Create the bucket/folder if missing; fail with a clear error if it is unreachable."""
        local = isinstance(self.fs, LocalFileSystem)
        top = self.root if local else self.root.split("/")[0]  # an object store's bucket

        def make() -> None:
            self.fs.makedirs(self.root, exist_ok=True)  # s3fs creates a missing bucket here
            self.fs.ls(top)

        try:
            retry(f"open {self.url}", make, attempts=2)
        except (StorageError, PermissionError, FileNotFoundError) as e:
            raise StorageError(f"bucket {self.url} is unreachable: {e}") from None
