"""All bucket access, over fsspec: local folders, `file://`, `s3://` (and any fsspec URL).

S3 has no rename and no append, so nothing here relies on either: small JSON files are written
with one PUT (atomic to readers). This module holds the only retry policy for the bucket: each
call is tried `attempts` times with exponential backoff (botocore's and s3fs's own retries are
turned off, so one attempt really is one request), and every S3 request has a timeout.
Credentials may reach only a prefix of the bucket, so every call stays under the folder's path
(`archive` writes beside it): nothing probes, creates or lists the bucket itself, except
`Bucket.ensure`, which runs never call.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import uuid
from typing import Any, Callable, TypeVar

import fsspec
from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem

from . import failpoints, names

log = logging.getLogger(__name__)
T = TypeVar("T")
RETRIES = 4  # attempts per call for trainers, which must ride out a short outage
TIMEOUT_S = 30.0  # connect and read timeout of one S3 request
TMP_MARK = ".tmp-"  # `<name>.tmp-<8 hex>`: a local write before its rename (see `Bucket.put`)


class StorageError(RuntimeError):
    """The bucket cannot be reached or used; the message names the URL."""


def filesystem(
    url: str,
    endpoint: str | None = None,
    credentials: dict[str, str] | None = None,
    timeout: float = TIMEOUT_S,
) -> tuple[AbstractFileSystem, str]:
    """The filesystem and root path of `url`.

    S3 credentials come from `credentials` (the operator reads them from the run's Secret) or
    from the environment (a trainer pod gets them from the Secret as env); never from the spec.
    """
    options: dict[str, Any] = {}
    if url.startswith("s3://"):
        endpoint = endpoint or os.environ.get(names.ENV_ENDPOINT)
        options = {
            "use_listings_cache": False,
            "skip_instance_cache": True,
            # `retry` below is the policy: one botocore attempt per call, bounded in time.
            "config_kwargs": {
                "retries": {"total_max_attempts": 1, "mode": "standard"},  # 1 = no retry
                "connect_timeout": timeout,
                "read_timeout": timeout,
            },
        }
        if endpoint:
            options["endpoint_url"] = endpoint
        if credentials:
            options["key"] = credentials[names.ENV_ACCESS_KEY]
            options["secret"] = credentials[names.ENV_SECRET_KEY]
    try:
        fs, path = fsspec.core.url_to_fs(url, **options)
    except (ImportError, ValueError) as e:
        raise StorageError(f"{url}: unsupported storage URL: {e}") from None
    if hasattr(fs, "retries"):
        fs.retries = 1  # s3fs retries some errors itself; `retry` alone decides
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
        self,
        url: str,
        endpoint: str | None = None,
        credentials: dict[str, str] | None = None,
        *,
        attempts: int = RETRIES,
        timeout: float = TIMEOUT_S,
    ):
        """`attempts` per call: trainers ride out outages; the operator asks for 1, since it
        retries whole reconciles later and one dead bucket must not stall other runs' status."""
        self.url = url.rstrip("/")
        self.attempts = attempts
        self.fs, self.root = filesystem(self.url, endpoint, credentials, timeout)

    def _retry(self, what: str, fn: Callable[[], T], attempts: int | None = None) -> T:
        """`retry`, with the two refusals a user must act on as one line saying what to do."""
        try:
            return retry(what, fn, attempts or self.attempts)
        except FileNotFoundError as e:
            if not _no_such_bucket(e):
                raise
            raise StorageError(f"{what}: bucket {self.root.split('/')[0]} does not exist (create "
                               "it, or enable the chart's devObjectStore)") from None
        except PermissionError as e:
            raise StorageError(f"{what}: access denied ({e}); codistill needs to read, write, "
                               f"delete and list under {self.url}/, and nothing else") from None

    def path(self, rel: str) -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def put(self, rel: str, data: bytes) -> None:
        """Write a whole object; readers see the old or the new bytes, never a mix."""
        def write() -> None:
            path = self.path(rel)
            if not isinstance(self.fs, LocalFileSystem):
                # One PUT: atomic, and nothing else. An object store has no folders to make, and
                # s3fs's makedirs would probe (or create) the bucket itself, which credentials
                # scoped to a prefix may not touch.
                self.fs.pipe_file(path, data)
                return
            self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)  # a local run's folders
            tmp = f"{path}{TMP_MARK}{uuid.uuid4().hex[:8]}"  # local files are atomic only by rename
            try:
                self.fs.pipe_file(tmp, data)
                failpoints.reach(failpoints.BEFORE_RENAME, rel)
                os.replace(tmp, path)
            except BaseException:  # e.g. ENOSPC: leave no partial file behind
                with contextlib.suppress(OSError):
                    os.remove(tmp)
                raise

        self._retry(f"write {self.url}/{rel}", write)

    def get(self, rel: str, limit: int | None = None) -> bytes:
        """The object's bytes; with `limit`, at most that many (a blob bigger than its pointer
        says must not be read whole into memory)."""
        end = {} if limit is None else {"start": 0, "end": limit}
        return self._retry(f"read {self.url}/{rel}",
                           lambda: self.fs.cat_file(self.path(rel), **end))

    def size(self, rel: str) -> int:
        return self._retry(f"stat {self.url}/{rel}", lambda: self.fs.size(self.path(rel)))

    def exists(self, rel: str) -> bool:
        return self._retry(f"stat {self.url}/{rel}", lambda: self.fs.exists(self.path(rel)))

    def ls(self, rel: str) -> list[str]:
        """Names (not paths) directly under `rel`; empty when it does not exist."""
        try:
            found = self._retry(
                f"list {self.url}/{rel}", lambda: self.fs.ls(self.path(rel), detail=False)
            )
        except FileNotFoundError:
            return []
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in found)

    def rm(self, rel: str) -> None:
        try:
            self._retry(
                f"delete {self.url}/{rel}", lambda: self.fs.rm(self.path(rel), recursive=True)
            )
        except FileNotFoundError:
            pass

    def archive(self, suffix: str) -> str:
        """Move everything under this folder to the sibling `<url><suffix>`; returns its URL.
        Locally a rename; on object stores a server-side copy of each object, then a delete."""
        dest = f"{self.root}{suffix}"

        def move() -> None:
            if isinstance(self.fs, LocalFileSystem):
                self.fs.mv(self.root, dest, recursive=True)
                return
            for path in self.fs.find(self.root):  # objects only: "directories" are not keys
                self.fs.copy(path, dest + path[len(self.root):])
            self.fs.rm(self.root, recursive=True)

        self._retry(f"move {self.url} to {self.url}{suffix}", move)
        return f"{self.url}{suffix}"

    def put_json(self, rel: str, obj: Any) -> None:
        self.put(rel, json.dumps(obj, indent=1, sort_keys=True).encode())

    def get_json(self, rel: str) -> Any:
        """The parsed JSON at `rel`, or None when it does not exist."""
        try:
            return json.loads(self.get(rel))
        except FileNotFoundError:
            return None

    def ensure(self) -> None:
        """Create the bucket (or local folder) if missing: only for a store the caller owns
        (the benchmarks' and tests' servers). Runs never call it: it works on the bucket itself,
        which credentials scoped to a prefix may not touch, and a run's first write creates
        what it needs under its folder."""
        self._retry(f"create {self.url}", lambda: self.fs.makedirs(self.root, exist_ok=True))


def _no_such_bucket(e: FileNotFoundError) -> bool:
    """s3fs raises a missing bucket as it does a missing key; only S3's error code tells."""
    response = getattr(e.__cause__, "response", None) or {}
    return response.get("Error", {}).get("Code") == "NoSuchBucket"
