"""Checkpoint exchange through the bucket: publish, find latest, verify, load.

A channel is a folder of immutable blobs plus one small pointer, `LATEST.json`. S3 has no rename,
so publishing writes the blob first and then overwrites the pointer with a single PUT (atomic to
readers): the pointer is the commit point. Readers read the pointer, fetch the blob it names, check
size and sha256, and load nothing else, so a torn or half-written blob is never loaded. The last
few blobs are kept (and listed in the pointer) so a reader mid-download never loses its blob and a
corrupt newest blob still leaves an older good one.

Peers' weights cross groups only as safetensors (no pickle from a shared bucket); a group's own
training state is a torch file loaded with `weights_only=True`.
"""

from __future__ import annotations

import hashlib
import io
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict
from typing import Any, BinaryIO

import torch

from codistill import failpoints, names
from codistill.runfolder import CorruptCheckpoint, Pointer, key_step
from codistill.storage import TMP_MARK, Bucket

from . import weights


class Hashing:
    """A file that hashes and counts what is written through it, on the way to `f`."""

    def __init__(self, f: BinaryIO):
        self.f, self.sha256, self.bytes = f, hashlib.sha256(), 0

    def write(self, data: bytes | memoryview) -> int:
        self.sha256.update(data)
        self.bytes += len(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


class Channel:
    """One folder of immutable `<step>.<suffix>` blobs and its `LATEST.json` commit point."""

    def __init__(self, bucket: Bucket, folder: str, suffix: str, keep: int = names.KEEP_BLOBS):
        self.bucket, self.folder, self.suffix, self.keep = bucket, folder, suffix, keep

    @property
    def pointer_path(self) -> str:
        return f"{self.folder}/{names.POINTER}"

    def publish(self, step: int, payload: bytes | Callable[[BinaryIO], Any]) -> Pointer:
        """Write the blob (`payload`: its bytes, or what writes them into a file, streamed and
        hashed on the way), then commit it by overwriting the pointer; prune old blobs."""
        write = payload if callable(payload) else (lambda f: f.write(payload))
        key = f"{step}.{self.suffix}"
        if self.bucket.exists(f"{self.folder}/{key}"):  # e.g. republished after a resume
            key = f"{step}.{uuid.uuid4().hex[:8]}.{self.suffix}"
        written: list[Hashing] = []

        def hashed(f: BinaryIO) -> None:  # called again on a retry: the last attempt counts
            written.append(Hashing(f))
            write(written[-1])

        self.bucket.put_stream(f"{self.folder}/{key}", hashed)
        failpoints.reach(failpoints.BEFORE_POINTER, f"{self.folder}/{key}")
        done = written[-1]
        latest = Pointer(step, key, done.sha256.hexdigest(), done.bytes, time.time())
        try:
            history = [asdict(p) for p in self.history()][: self.keep - 1]
        except CorruptCheckpoint:  # a garbage pointer is replaced, not trusted
            history = []
        self.bucket.put_json(self.pointer_path, {**asdict(latest), "previous": history})
        self._prune({latest.key, *(p["key"] for p in history)}, step)
        return latest

    def _read_pointer(self) -> dict[str, Any] | None:
        where = f"{self.bucket.url}/{self.pointer_path}"
        try:
            data = self.bucket.get_json(self.pointer_path)
        except (ValueError, RecursionError) as e:  # torn, garbage or absurdly nested JSON
            raise CorruptCheckpoint(f"{where}: {type(e).__name__}: {e}"[:300]) from None
        if data is not None and not isinstance(data, dict):
            raise CorruptCheckpoint(f"{where}: expected a JSON object, got {type(data).__name__}")
        return data

    def _parse(self, data: Any) -> Pointer:
        return Pointer.parse(data, f"{self.bucket.url}/{self.pointer_path}", (self.suffix,))

    def latest(self) -> Pointer | None:
        """The committed newest blob, or None when nothing was published yet."""
        data = self._read_pointer()
        return None if data is None else self._parse(data)

    def history(self) -> list[Pointer]:
        """The newest pointer, then the older retained ones (newest first). A malformed newest
        pointer is CorruptCheckpoint; malformed older entries are skipped."""
        data = self._read_pointer()
        if data is None:
            return []
        found = [self._parse(data)]
        previous = data.get("previous")
        for p in previous if isinstance(previous, list) else []:
            try:
                found.append(self._parse(p))
            except CorruptCheckpoint:
                continue
        return found

    def blobs(self) -> list[tuple[int, str]]:
        """`(step, key)` of every blob in the folder, committed or not, newest step first: what
        is left to try when the pointer itself cannot be read."""
        found = [(key_step(name, (self.suffix,)), name) for name in self.bucket.ls(self.folder)]
        return sorted(((s, n) for s, n in found if s is not None), reverse=True)

    def read_blob(self, key: str) -> bytes:
        """A blob's bytes without a pointer to verify them against (the caller must verify its
        content); CorruptCheckpoint when `key` is not a blob name of this channel or is missing."""
        if key_step(key, (self.suffix,)) is None:
            raise CorruptCheckpoint(f"{self.bucket.url}/{self.folder}: bad blob name {key!r:.80}")
        try:
            return self.bucket.get(f"{self.folder}/{key}")
        except FileNotFoundError:
            raise CorruptCheckpoint(f"{self.bucket.url}/{self.folder}/{key}: missing") from None

    def fetch(self, pointer: Pointer) -> bytearray:
        """The blob's bytes, verified against the pointer's size and sha256, read in parts into
        one buffer, allocated only once the blob's size is checked to be the pointer's."""
        if key_step(pointer.key, (self.suffix,)) is None or pointer.bytes < 0:
            raise CorruptCheckpoint(
                f"{self.bucket.url}/{self.pointer_path}: bad pointer key {pointer.key!r:.80}"
            )
        rel = f"{self.folder}/{pointer.key}"
        where = f"{self.bucket.url}/{rel}"
        try:
            size = self.bucket.size(rel)
            if size != pointer.bytes:
                raise CorruptCheckpoint(f"{where}: {size} bytes, pointer says {pointer.bytes}")
            data = bytearray(size)
            got = self.bucket.read_into(rel, data)
        except FileNotFoundError:
            raise CorruptCheckpoint(f"{where}: missing (pruned or never written)") from None
        if got != size:  # it changed between the stat and the read
            raise CorruptCheckpoint(f"{where}: {got} bytes read, pointer says {size}")
        if hashlib.sha256(data).hexdigest() != pointer.sha256:
            raise CorruptCheckpoint(f"{where}: sha256 mismatch")
        return data

    def _prune(self, keep: set[str], committed: int) -> None:
        """Delete blobs not in `keep`, except any with a step >= `committed` (the step just
        committed: a newer blob is never lost to a restart from an older state), and stale
        temporaries of failed local writes (one writer per channel: none is in flight now)."""
        for name in self.bucket.ls(self.folder):
            if TMP_MARK in name:
                self.bucket.rm(f"{self.folder}/{name}")
            elif name.endswith(f".{self.suffix}") and name not in keep:
                step = key_step(name, (self.suffix,))
                if step is None or step < committed:
                    self.bucket.rm(f"{self.folder}/{name}")


def teacher_channel(bucket: Bucket, group: int) -> Channel:
    return Channel(bucket, names.teacher_dir(group), "safetensors")


def state_channel(bucket: Bucket, group: int) -> Channel:
    return Channel(bucket, names.state_dir(group), "pt")


def weights_blob(state_dict: dict[str, torch.Tensor], step: int) -> weights.Blob:
    """A model's weights as a safetensors blob to stream (`Channel.publish(step, blob.write)`).
    Tensors must not share memory (tied weights): the trainer passes `resume.cpu_copy(...)`,
    which already gave each its own CPU copy, so nothing is copied here."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    return weights.Blob(tensors, {"step": str(step)})


def weights_to_bytes(state_dict: dict[str, torch.Tensor], step: int) -> bytes:
    """The same blob's bytes, whole (for small models and tests)."""
    return b"".join(weights_blob(state_dict, step).parts())


def weights_from_bytes(data: bytes | bytearray, where: str = "blob") -> dict[str, torch.Tensor]:
    """The tensors of a verified blob, as views into it (a `bytes` is copied once, to be
    writable as torch requires)."""
    return weights.load(data if isinstance(data, bytearray) else bytearray(data), where)


def state_writer(state: dict[str, Any]) -> Callable[[BinaryIO], None]:
    """What streams a group's training state into a file (`Channel.publish(step, writer)`)."""
    return lambda f: torch.save(state, f)


def state_to_bytes(state: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    state_writer(state)(buf)
    return buf.getvalue()


def state_from_bytes(data: bytes, where: str = "state") -> dict[str, Any]:
    """A group's own state: tensors and plain containers only, never arbitrary objects."""
    try:
        return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except Exception as e:
        raise CorruptCheckpoint(f"{where}: cannot load training state ({e})") from None
