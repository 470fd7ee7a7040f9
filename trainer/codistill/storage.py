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
from typing import Any, BinaryIO, Callable, TypeVar

import fsspec
from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem

from . import failpoints, names

log = logging.getLogger(__name__)
T = TypeVar("T")
RETRIES = 4  # attempts per call for trainers, which must ride out a short outage
TIMEOUT_S = 30.0  # connect and read timeout of one S3 request
TMP_MARK = ".tmp-"  # `<name>.tmp-<8 hex>`: a local write before its rename (see `Bucket.put`)
# Streamed writes go up in parts of PART_BYTES (S3: 5 MiB at least, 10,000 parts at most: objects
# up to 160 GiB), reads come in parts of READ_BYTES (one ranged GET each). Each part is held about
# twice while in flight, so these bound the extra memory of a transfer, whatever the model's size.
PART_BYTES = 16 * 2**20
READ_BYTES = 64 * 2**20


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
        self.put_stream(rel, lambda f: f.write(data))

    def put_stream(self, rel: str, write: Callable[[BinaryIO], Any]) -> None:
        """Write an object from what `write` writes into a file, never holding it whole here;
        readers see the old or the new object, never a mix. `write` is called again on a retry.
        On an object store that is one PUT, or for more than PART_BYTES an upload in parts,
        which S3 makes visible only once complete (a failed one is aborted); a local file is
        written beside its path and renamed into place."""
        def once() -> None:
            path = self.path(rel)
            if not isinstance(self.fs, LocalFileSystem):
                # An object store has no folders to make, and s3fs's makedirs would probe (or
                # create) the bucket itself, which credentials scoped to a prefix may not touch.
                f = self.fs.open(path, "wb", block_size=PART_BYTES)
                try:
                    write(f)
                    f.close()  # the PUT, or the last part and the upload's completion
                except BaseException:
                    f.discard()  # nothing half-written becomes visible: the upload is aborted
                    f.closed = True  # and closing it later (its __del__) must not commit it
                    raise
                return
            self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)  # a local run's folders
            tmp = f"{path}{TMP_MARK}{uuid.uuid4().hex[:8]}"  # local files are atomic only by rename
            try:
                with open(tmp, "wb") as f:
                    write(f)
                failpoints.reach(failpoints.BEFORE_RENAME, rel)
                os.replace(tmp, path)
            except BaseException:  # e.g. ENOSPC: leave no partial file behind
                with contextlib.suppress(OSError):
                    os.remove(tmp)
                raise

        self._retry(f"write {self.url}/{rel}", once)

    def get(self, rel: str, limit: int | None = None) -> bytes:
        """The object's bytes; with `limit`, at most that many (a blob bigger than its pointer
        says must not be read whole into memory)."""
        end = {} if limit is None else {"start": 0, "end": limit}
        return self._retry(f"read {self.url}/{rel}",
                           lambda: self.fs.cat_file(self.path(rel), **end))

    def read_into(self, rel: str, buf: bytearray) -> int:
        """Fill `buf` with an object of len(buf) bytes (the caller checked its size), read in
        parts of READ_BYTES, so a large object is never held twice; the bytes read, len(buf) + 1
        where a local file turns out longer."""
        def once() -> int:
            view, got = memoryview(buf), 0
            # size given: s3fs need not ask for it again (one HEAD fewer); no read-ahead cache:
            # each part goes straight into buf
            with self.fs.open(self.path(rel), "rb", block_size=READ_BYTES, size=len(buf),
                              cache_type="none") as f:
                while got < len(buf):
                    n = f.readinto(view[got:got + READ_BYTES])
                    if not n:
                        return got
                    got += n
                return got + len(f.read(1))

        return self._retry(f"read {self.url}/{rel}", once)

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
