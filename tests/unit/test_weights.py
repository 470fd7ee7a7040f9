"""Safetensors blobs written as a stream and read as views: the format safetensors itself reads
and writes, and nothing malformed from a shared bucket gets past the reader."""

from __future__ import annotations

import io
import json
import random
import struct

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from codistill.runfolder import CorruptCheckpoint
from codistill_trainer import weights

TENSORS = {
    "w": torch.randn(3, 5),
    "half": torch.randn(4).to(torch.bfloat16),
    "steps": torch.arange(6, dtype=torch.int64).reshape(2, 3),
    "mask": torch.tensor([True, False, True]),
    "scalar": torch.tensor(2.5),
    "empty": torch.zeros(0, 4),
}


def blob_bytes(tensors=TENSORS, metadata=None) -> bytes:
    return b"".join(weights.Blob(tensors, metadata or {"step": "7"}).parts())


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k])
        for k in a)


def test_our_blobs_load_with_safetensors_and_safetensors_blobs_load_here():
    ours = blob_bytes()
    assert len(ours) == weights.Blob(TENSORS, {"step": "7"}).size
    assert same(st_load(ours), TENSORS)
    assert same(weights.load(bytearray(st_save(TENSORS, {"step": "7"}))), TENSORS)
    assert same(weights.load(bytearray(ours)), TENSORS)


def test_loaded_tensors_are_views_into_the_buffer_and_the_blob_is_written_in_parts(monkeypatch):
    monkeypatch.setattr(weights, "PART", 16)
    big = {"w": torch.arange(100, dtype=torch.float32)}  # 400 bytes: 25 parts of 16
    sizes: list[int] = []

    class Spy(io.BytesIO):
        def write(self, b):
            sizes.append(len(b))
            return super().write(b)

    f = Spy()
    weights.Blob(big, {}).write(f)
    assert max(sizes[2:]) == 16 and sum(sizes[2:]) == 400  # after the length and the header
    buf = bytearray(f.getvalue())
    loaded = weights.load(buf)["w"]
    start = torch.frombuffer(buf, dtype=torch.uint8).data_ptr()
    assert start <= loaded.data_ptr() < start + len(buf)  # no copy
    assert torch.equal(loaded, big["w"])


def header_blob(header: dict, data: bytes) -> bytearray:
    head = json.dumps(header).encode()
    return bytearray(struct.pack("<Q", len(head)) + head + data)


F32 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


@pytest.mark.parametrize("blob, why", [
    (bytearray(b"\x01\x00"), "2 bytes"),
    (bytearray(struct.pack("<Q", 2**40) + b"{}"), "header length"),
    (bytearray(struct.pack("<Q", 0) + b"{}"), "header length"),
    (bytearray(struct.pack("<Q", 3) + b"{x}"), "not JSON"),
    (header_blob([1], b""), "not a JSON object"),  # type: ignore[arg-type]
    (header_blob({"__metadata__": {"a": 1}}, b""), "map of strings"),
    (header_blob({"w": {**F32, "dtype": "F128"}}, b"\0" * 8), "dtype"),
    (header_blob({"w": {**F32, "shape": [-2]}}, b"\0" * 8), "shape"),
    (header_blob({"w": {**F32, "shape": [True, 2]}}, b"\0" * 8), "shape"),
    (header_blob({"w": {**F32, "shape": "2"}}, b"\0" * 8), "shape"),
    (header_blob({"w": {**F32, "data_offsets": [0, 12]}}, b"\0" * 12), "12 bytes for shape"),
    (header_blob({"w": {**F32, "data_offsets": [0]}}, b"\0" * 8), "data_offsets"),
    (header_blob({"w": {**F32, "data_offsets": [-8, 0]}}, b"\0" * 8), "data_offsets"),
    (header_blob({"w": {**F32, "extra": 1}}, b"\0" * 8), "is not"),
    (header_blob({"w": F32}, b"\0" * 4), "end by"),  # past the end
    (header_blob({"w": F32}, b"\0" * 12), "bytes after"),  # trailing bytes
    (header_blob({"w": {**F32, "data_offsets": [4, 12]}}, b"\0" * 12), "start at 0"),  # a hole
    (header_blob({"a": F32, "b": F32}, b"\0" * 16), "start at 8"),  # overlap
])
def test_malformed_blobs_are_refused_with_the_reason(blob, why):
    with pytest.raises(CorruptCheckpoint, match=why):
        weights.load(blob, "peer 1 step 7")


def test_random_corruption_is_refused_or_loads_and_never_raises_anything_else():
    good = blob_bytes()
    rng = random.Random(20261202)
    refused = 0
    for _ in range(3000):
        blob = bytearray(good)
        for _ in range(rng.randint(1, 4)):
            if not blob:
                break
            kind = rng.random()
            if kind < 0.5:
                blob[rng.randrange(len(blob))] = rng.randrange(256)
            elif kind < 0.8:
                del blob[rng.randrange(len(blob)):]
            else:
                blob[rng.randrange(len(blob)):rng.randrange(len(blob) + 1)] = b""
        try:
            loaded = weights.load(blob)
        except CorruptCheckpoint:
            refused += 1
            continue
        assert all(isinstance(t, torch.Tensor) for t in loaded.values())
    assert refused > 1000  # most mutations break the header or the byte ranges


def test_max_size_bounds_a_blob_of_the_layout():
    layout = {k: (t.dtype, t.shape) for k, t in TENSORS.items()}
    assert len(blob_bytes()) <= weights.max_size(layout) < len(blob_bytes()) + weights.MAX_HEADER + 8
