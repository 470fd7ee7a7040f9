"""A model's weights as a safetensors blob, written as a stream and read without a copy.

safetensors' own `save` builds the whole blob in memory (beside the CPU copy of the weights being
published) and its `load` copies every tensor out of the blob: at 10 GB models that is twice the
model's bytes on the host, for nothing. The format is small and fixed (an 8-byte little-endian
header length, a JSON header naming each tensor's dtype, shape and byte range, then the bytes,
contiguous), so it is written here straight from the tensors' memory in parts, and read back as
views into the one verified buffer. The reader trusts nothing: a blob comes from a shared bucket,
and every field of its header is checked before a byte of it is used. Blobs written here load
with safetensors' own `load`, and blobs safetensors writes load here (tests/unit/test_weights.py).
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterator, Mapping
from typing import Any, BinaryIO

import torch

from codistill.runfolder import CorruptCheckpoint

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
          "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
          "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 * 2**20  # safetensors' own limit on the JSON header
PART = 16 * 2**20  # bytes handed to the writer at a time: what a writer may buffer per call


class Blob:
    """The safetensors bytes of `tensors` (CPU, contiguous, not sharing memory: the trainer's
    `resume.cpu_copy` gives it such), produced in parts by `write`, never whole."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]):
        self.tensors = {k: _flat_bytes(tensors[k]) for k in sorted(tensors)}
        header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
        offset = 0
        for key in sorted(tensors):
            t = tensors[key]
            end = offset + t.numel() * t.element_size()
            header[key] = {"dtype": NAMES[t.dtype], "shape": list(t.shape),
                           "data_offsets": [offset, end]}
            offset = end
        head = json.dumps(header, separators=(",", ":")).encode()
        self.head = head + b" " * (-len(head) % 8)  # padded to 8 bytes, as safetensors does
        self.size = 8 + len(self.head) + offset

    def parts(self) -> Iterator[memoryview | bytes]:
        yield struct.pack("<Q", len(self.head))
        yield self.head
        for data in self.tensors.values():
            for start in range(0, len(data), PART):
                yield data[start:start + PART]

    def write(self, f: BinaryIO) -> None:
        for part in self.parts():
            f.write(part)


def _flat_bytes(t: torch.Tensor) -> memoryview:
    """The tensor's bytes as a view of its own memory (no copy)."""
    if t.device.type != "cpu" or not t.is_contiguous():
        raise ValueError("weights to publish must be contiguous CPU tensors (resume.cpu_copy)")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


def max_size(layout: Mapping[str, tuple[torch.dtype, torch.Size]]) -> int:
    """The most bytes a blob of a model with this layout can take (its header at its largest)."""
    return 8 + MAX_HEADER + sum(math.prod(shape) * dtype.itemsize for dtype, shape in layout.values())


def load(buf: bytearray | bytes, where: str = "blob") -> dict[str, torch.Tensor]:
    """The tensors of a safetensors blob, as views into `buf` (which they keep alive);
    CorruptCheckpoint for anything that is not a well-formed blob."""
    def bad(why: str) -> CorruptCheckpoint:
        return CorruptCheckpoint(f"{where}: not a valid safetensors file ({why})")

    if len(buf) < 8:
        raise bad(f"{len(buf)} bytes")
    (n,) = struct.unpack_from("<Q", buf)
    if not 0 < n <= min(MAX_HEADER, len(buf) - 8):
        raise bad(f"header length {n} for {len(buf)} bytes")
    try:
        header = json.loads(bytes(memoryview(buf)[8:8 + n]))
    except (ValueError, RecursionError):
        raise bad("header is not JSON") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise bad("__metadata__ is not a map of strings")
    entries = sorted(((_entry(k, v, bad), k) for k, v in header.items()), key=lambda e: e[0][2])
    data, found, offset = 8 + n, {}, 0
    for (dtype, shape, begin, end), key in entries:
        if begin != offset or data + end > len(buf):
            raise bad(f"{key[:80]!r} at bytes [{begin}, {end}), expected to start at {offset} "
                      f"and end by {len(buf) - data}")
        count = math.prod(shape)
        if count == 0:
            found[key] = torch.empty(shape, dtype=dtype)
        else:
            found[key] = torch.frombuffer(buf, dtype=dtype, count=count,
                                          offset=data + begin).reshape(shape)
        offset = end
    if data + offset != len(buf):
        raise bad(f"{len(buf) - data - offset} bytes after the last tensor")
    return found


def _entry(key: str, v: Any, bad: Any) -> tuple[torch.dtype, list[int], int, int]:
    """(dtype, shape, begin, end) of one header entry, every field checked."""
    if not isinstance(v, dict) or set(v) != {"dtype", "shape", "data_offsets"}:
        raise bad(f"entry {key[:80]!r} is not {{dtype, shape, data_offsets}}")
    dtype, shape, offsets = DTYPES.get(v["dtype"]), v["shape"], v["data_offsets"]
    if dtype is None:
        raise bad(f"{key[:80]!r}: dtype {str(v['dtype'])[:20]!r} is not one of {sorted(DTYPES)}")
    if not (isinstance(shape, list) and len(shape) <= 16
            and all(type(d) is int and 0 <= d < 2**48 for d in shape)):
        raise bad(f"{key[:80]!r}: shape is not a list of sizes")
    if not (isinstance(offsets, list) and len(offsets) == 2
            and all(type(o) is int and 0 <= o for o in offsets)):
        raise bad(f"{key[:80]!r}: data_offsets is not [begin, end]")
    begin, end = offsets
    if end - begin != math.prod(shape) * dtype.itemsize:
        raise bad(f"{key[:80]!r}: {end - begin} bytes for shape {shape} of {v['dtype']}")
    return dtype, shape, begin, end
