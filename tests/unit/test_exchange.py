"""The publish / latest / verify / load protocol, on a local folder and on moto's S3 server."""

import json

import pytest
import torch

from codistill import names, storage
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


# --- Nothing read from the bucket is trusted (reliability review D4-D7, D10) ---------------------

def pointer_doc(key: str, data: bytes, step: int = 10, **extra) -> bytes:
    import hashlib

    doc = {"step": step, "key": key, "sha256": hashlib.sha256(data).hexdigest(),
           "bytes": len(data), "time": 1.0, **extra}
    return json.dumps(doc).encode()


@pytest.mark.parametrize("key", [
    "../../elsewhere/10.safetensors", "/dev/zero", "sub/10.safetensors", "..", "",
    "10.pt",  # a state blob's name, in a teacher channel
    "10.safetensors/", "10.SAFETENSORS", "\u0663.safetensors", "10.safetensors\n", "10.xyz.safetensors",
])
def test_pointer_key_must_be_a_plain_name_of_its_channel(tmp_path, key):
    bucket = Bucket(tmp_path.as_uri() + "/run")
    ch = teacher_channel(bucket, 0)
    blob = weights_to_bytes(weights(3.0), 10)
    bucket.put("groups/elsewhere/10.safetensors", blob)  # what `..` would reach
    bucket.put(ch.pointer_path, pointer_doc(key, blob))
    with pytest.raises(CorruptCheckpoint, match="key"):
        ch.latest()
    with pytest.raises(CorruptCheckpoint):
        ch.history()
    assert load_latest(state_channel(bucket, 0)) is None


def test_pointer_key_escaping_the_folder_is_never_fetched(tmp_path):
    from codistill.runfolder import Pointer

    bucket = Bucket(tmp_path.as_uri() + "/run")
    ch = teacher_channel(bucket, 0)
    blob = weights_to_bytes(weights(3.0), 10)
    bucket.put("foreign/10.safetensors", blob)
    ch.publish(5, weights_to_bytes(weights(1.0), 5))  # the folder exists: `..` resolves
    import hashlib
    forged = Pointer(10, "../../../foreign/10.safetensors", hashlib.sha256(blob).hexdigest(),
                     len(blob), 1.0)  # e.g. from a final.json, which is parsed elsewhere
    with pytest.raises(CorruptCheckpoint, match="key"):
        ch.fetch(forged)


def test_publisher_keys_are_accepted(bucket):
    ch = state_channel(bucket, 0)
    ch.publish(7, state_to_bytes({"step": 7}))
    ch.publish(7, state_to_bytes({"step": 7}))  # republished: `7.<8 hex>.pt`
    keys = [p.key for p in ch.history()]
    assert keys[1] == "7.pt" and keys[0].startswith("7.") and len(keys[0]) == len("7.12345678.pt")
    assert load_latest(ch) == {"step": 7}


def test_fetch_checks_size_before_reading_and_reads_at_most_one_byte_more(tmp_path, monkeypatch):
    bucket = Bucket(tmp_path.as_uri() + "/run")
    ch = teacher_channel(bucket, 0)
    pointer = ch.publish(10, weights_to_bytes(weights(1.0), 10))
    reads = []
    real = bucket.read_into

    def spy(rel, buf):
        got = real(rel, buf)
        reads.append((len(buf), got))
        return got

    monkeypatch.setattr(bucket, "read_into", spy)
    assert torch.equal(weights_from_bytes(ch.fetch(pointer))["w"], weights(1.0)["w"])
    assert reads == [(pointer.bytes, pointer.bytes)]  # one buffer of the pointer's size
    reads.clear()
    with open(tmp_path / "run" / ch.folder / pointer.key, "ab") as f:
        f.write(b"\0" * (1 << 20))  # grown: refused from its size, never read
    with pytest.raises(CorruptCheckpoint, match="bytes"):
        ch.fetch(pointer)
    assert reads == []


def test_read_into_reads_in_parts_and_says_when_the_object_is_longer(tmp_path, monkeypatch):
    monkeypatch.setattr(storage, "READ_BYTES", 1000)
    bucket = Bucket(tmp_path.as_uri())
    data = bytes(range(256)) * 20  # 5,120 bytes: six parts
    bucket.put("blob", data)
    buf = bytearray(len(data))
    assert bucket.read_into("blob", buf) == len(data) and buf == data
    short = bytearray(100)
    assert bucket.read_into("blob", short) == 101 and short == data[:100]
    assert bucket.read_into("blob", bytearray(len(data) + 5)) == len(data)


@pytest.mark.parametrize("previous", ["5", "null", "true", '"abc"', '{"a": 1}', "[1, null, {}]"])
def test_non_list_previous_is_treated_as_empty(tmp_path, previous):
    bucket = Bucket(tmp_path.as_uri() + "/run")
    ch = state_channel(bucket, 0)
    blob = state_to_bytes({"step": 10})
    bucket.put(f"{ch.folder}/10.pt", blob)
    doc = json.loads(pointer_doc("10.pt", blob))
    bucket.put(ch.pointer_path, json.dumps(doc)[:-1].encode() + b', "previous": ' +
               previous.encode() + b"}")
    assert [p.key for p in ch.history()] == ["10.pt"]
    assert load_latest(ch) == {"step": 10}
    ch.publish(20, state_to_bytes({"step": 20}))  # the channel can still publish
    assert [p.step for p in ch.history()] == [20, 10]


@pytest.mark.parametrize("raw", [
    b"[1, 2]", b'"LATEST"', b"7", b"null", b"[" * 100_000 + b"]" * 100_000,
    b'{"step": Infinity, "key": "10.pt", "sha256": "x", "bytes": 1, "time": 1}',
    b'{"step": 10, "key": "10.pt", "sha256": "x", "bytes": -1, "time": 1}',
    b'{"step": 10, "key": 10, "sha256": "x", "bytes": 1, "time": 1}',
    b'\xff\xfe garbage',
])
def test_garbage_pointer_is_only_ever_corrupt_checkpoint(tmp_path, raw):
    bucket = Bucket(tmp_path.as_uri() + "/run")
    ch = state_channel(bucket, 0)
    bucket.put(ch.pointer_path, raw)
    if raw == b"null":
        assert ch.latest() is None
    else:
        with pytest.raises(CorruptCheckpoint):
            ch.latest()
    assert load_latest(ch) is None
    ch.publish(5, state_to_bytes({"step": 5}))
    assert load_latest(ch) == {"step": 5}


def test_unreadable_state_pointer_falls_back_to_the_folders_blobs(bucket):
    ch = state_channel(bucket, 0)
    for step in (100, 200, 300):
        ch.publish(step, state_to_bytes({"step": step}))
    bucket.put(ch.pointer_path, b'{"step": 300, "key": ')  # torn
    assert load_latest(ch) == {"step": 300}
    bucket.put(f"{ch.folder}/300.pt", b"garbage")
    bucket.put(f"{ch.folder}/250.pt", state_to_bytes({"step": 7}))  # not what its name says
    assert load_latest(ch) == {"step": 200}


def test_readable_pointer_whose_blobs_all_fail_falls_back_to_the_folder(tmp_path):
    bucket = Bucket(tmp_path.as_uri() + "/run")
    ch = state_channel(bucket, 0)
    for step in (100, 200, 300, 400):  # keeps 200, 300, 400
        ch.publish(step, state_to_bytes({"step": step}))
    bucket.put(f"{ch.folder}/150.pt", state_to_bytes({"step": 150}))  # e.g. left by a restart
    for step in (200, 300, 400):
        bucket.put(f"{ch.folder}/{step}.pt", b"garbage")
    assert load_latest(ch) == {"step": 150}


def test_pruning_never_deletes_a_blob_newer_than_the_commit(bucket):
    ch = state_channel(bucket, 0)
    for step in (100, 200, 300):
        ch.publish(step, state_to_bytes({"step": step}))
    bucket.put(ch.pointer_path, b"garbage")
    ch.publish(10, state_to_bytes({"step": 10}))  # a restart from 0 commits step 10
    assert bucket.ls(ch.folder) == sorted(["10.pt", "100.pt", "200.pt", "300.pt", "LATEST.json"])
    ch.publish(250, state_to_bytes({"step": 250}))
    ch.publish(260, state_to_bytes({"step": 260}))
    ch.publish(270, state_to_bytes({"step": 270}))
    assert sorted(bucket.ls(ch.folder)) == ["250.pt", "260.pt", "270.pt", "300.pt", "LATEST.json"]


def test_failed_local_write_leaves_no_temporary(tmp_path, monkeypatch):
    from codistill.storage import StorageError

    bucket = Bucket(tmp_path.as_uri() + "/run", attempts=1)
    ch = teacher_channel(bucket, 0)

    data = weights_to_bytes(weights(1.0), 10)

    def full_disk(f):  # the disk fills halfway through the blob
        f.write(data[: len(data) // 2])
        raise OSError(28, "No space left on device")

    with pytest.raises(StorageError, match="No space left"):
        ch.publish(10, full_disk)
    assert list((tmp_path / "run").rglob("*.tmp-*")) == [] and ch.latest() is None

    import codistill.storage
    def no_rename(src, dst):
        raise PermissionError(13, "rename refused")
    monkeypatch.setattr(codistill.storage.os, "replace", no_rename)
    with pytest.raises(StorageError):
        bucket.put("x.json", b"{}")
    monkeypatch.undo()
    assert list((tmp_path / "run").rglob("*.tmp-*")) == []


def test_pruning_removes_stale_temporaries(tmp_path):
    bucket = Bucket(tmp_path.as_uri() + "/run")
    ch = teacher_channel(bucket, 0)
    folder = tmp_path / "run" / ch.folder
    folder.mkdir(parents=True)
    (folder / "5.safetensors.tmp-deadbeef").write_bytes(b"partial")
    (folder / "LATEST.json.tmp-0123abcd").write_bytes(b"{")
    ch.publish(10, weights_to_bytes(weights(1.0), 10))
    assert sorted(bucket.ls(ch.folder)) == ["10.safetensors", "LATEST.json"]
