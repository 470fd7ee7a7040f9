"""The publish / latest / verify / load protocol, on a local folder and on moto's S3 server."""

import json

import pytest
import torch

from codistill import names
from codistill.storage import Bucket
from codistill_trainer.exchange import (
    Channel,
    CorruptCheckpoint,
    state_channel,
    state_from_bytes,
    state_to_bytes,
    teacher_channel,
    weights_from_bytes,
    weights_to_bytes,
)
from codistill_trainer.resume import load_latest


@pytest.fixture(params=["local", "s3"])
def bucket(request, tmp_path):
    if request.param == "local":
        return Bucket(tmp_path.as_uri() + "/run")
    request.getfixturevalue("s3")
    return Bucket("s3://codistill-test/ns/run")


def weights(value: float) -> dict[str, torch.Tensor]:
    return {"w": torch.full((4, 3), value), "b": torch.arange(3.0)}


def test_publish_then_load_roundtrip(bucket):
    ch = teacher_channel(bucket, 1)
    assert ch.latest() is None
    ch.publish(50, weights_to_bytes(weights(1.0), 50))
    pointer = ch.latest()
    assert pointer.step == 50 and pointer.key == "50.safetensors"
    got = weights_from_bytes(ch.fetch(pointer))
    assert torch.equal(got["w"], weights(1.0)["w"])
    raw = json.loads(bucket.get(f"{names.teacher_dir(1)}/{names.POINTER}"))
    assert {"step", "key", "sha256", "bytes", "time"} <= raw.keys()


def test_keeps_last_blobs_and_prunes_older(bucket):
    ch = teacher_channel(bucket, 0)
    for step in (10, 20, 30, 40, 50):
        ch.publish(step, weights_to_bytes(weights(step), step))
    blobs = [n for n in bucket.ls(names.teacher_dir(0)) if n.endswith(".safetensors")]
    assert sorted(blobs) == ["30.safetensors", "40.safetensors", "50.safetensors"]
    assert [p.step for p in ch.history()] == [50, 40, 30]


def test_torn_blob_is_never_loaded(bucket):
    ch = teacher_channel(bucket, 0)
    ch.publish(10, weights_to_bytes(weights(1.0), 10))
    pointer = ch.latest()
    data = bucket.get(f"{ch.folder}/{pointer.key}")
    bucket.put(f"{ch.folder}/{pointer.key}", data[: len(data) // 2])  # half-written
    with pytest.raises(CorruptCheckpoint, match="bytes"):
        ch.fetch(pointer)


def test_corrupt_blob_of_right_size_is_rejected(bucket):
    ch = teacher_channel(bucket, 0)
    ch.publish(10, weights_to_bytes(weights(1.0), 10))
    pointer = ch.latest()
    data = bytearray(bucket.get(f"{ch.folder}/{pointer.key}"))
    data[-1] ^= 0xFF  # flip bits in tensor data: safetensors alone would load this
    bucket.put(f"{ch.folder}/{pointer.key}", bytes(data))
    with pytest.raises(CorruptCheckpoint, match="sha256"):
        ch.fetch(pointer)


def test_blob_without_pointer_is_invisible(bucket):
    """A publisher that died between blob and pointer leaves nothing a reader would load."""
    ch = teacher_channel(bucket, 0)
    bucket.put(f"{ch.folder}/70.safetensors", weights_to_bytes(weights(7.0), 70))
    assert ch.latest() is None


def test_garbage_pointer_is_reported_not_loaded(bucket):
    ch = teacher_channel(bucket, 0)
    bucket.put(ch.pointer_path, b'{"step": 5, "key": ')
    with pytest.raises(CorruptCheckpoint):
        ch.latest()
    ch.publish(6, weights_to_bytes(weights(6.0), 6))  # a new publish replaces it
    assert ch.latest().step == 6


def test_not_safetensors_is_rejected():
    with pytest.raises(CorruptCheckpoint, match="safetensors"):
        weights_from_bytes(b"\x80\x04pickle-ish bytes")


def test_republishing_a_step_never_overwrites_a_blob(bucket):
    ch = teacher_channel(bucket, 0)
    ch.publish(10, weights_to_bytes(weights(1.0), 10))
    first = ch.latest()
    ch.publish(10, weights_to_bytes(weights(2.0), 10))
    second = ch.latest()
    assert second.key != first.key
    assert torch.equal(weights_from_bytes(ch.fetch(first))["w"], weights(1.0)["w"])


def test_state_falls_back_to_older_good_state(bucket):
    ch = state_channel(bucket, 0)
    for step in (100, 200):
        ch.publish(step, state_to_bytes({"step": step, "t": torch.ones(2) * step}))
    newest = ch.latest()
    bucket.put(f"{ch.folder}/{newest.key}", b"garbage")
    loaded = load_latest(ch)
    assert loaded["step"] == 100


def test_own_state_refuses_pickled_objects():
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    import io
    buf = io.BytesIO()
    torch.save({"x": Evil()}, buf)
    with pytest.raises(CorruptCheckpoint):
        state_from_bytes(buf.getvalue())
    assert pickle  # the payload above really is a pickle


def test_channel_generic_suffix(tmp_path):
    ch = Channel(Bucket(tmp_path.as_uri()), "x", "bin", keep=1)
    ch.publish(1, b"a")
    ch.publish(2, b"b")
    assert Bucket(tmp_path.as_uri()).ls("x") == ["2.bin", "LATEST.json"]


def test_archive_moves_the_whole_folder_beside_it(bucket):
    teacher_channel(bucket, 0).publish(10, weights_to_bytes(weights(1.0), 10))
    bucket.put_json("run.json", {"x": 1})
    url = bucket.archive(".previous-1234")
    assert url == f"{bucket.url}.previous-1234"
    assert not bucket.exists("run.json") and bucket.ls("groups") == []
    old = Bucket(url)
    assert old.get_json("run.json") == {"x": 1}
    assert teacher_channel(old, 0).latest().step == 10
