"""Credentials that reach only a prefix of a shared bucket are enough to run codistill.

The store is moto behind tests/support/scoped_s3.py, which refuses (403) whatever an IAM policy
scoped to `s3://shared-bucket/team-a/` refuses: any call on the bucket itself (HeadBucket,
GetBucketLocation, CreateBucket, a listing of its root) and any key or listing outside the
prefix. Every test also checks that nothing was refused, since the trainer's poller and status
keep going past a failed call: a single call on the root fails the test.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import boto3
import pytest
import torch
from botocore.exceptions import ClientError

from codistill import names, storage
from codistill.runfolder import Final, GroupScore, Progress, Report, RunFolder
from codistill.spec import Codistillation, parse
from codistill.storage import Bucket, StorageError
from codistill_operator.bucket import open_folder, read_progress, write_run
from codistill_trainer.exchange import (
    state_channel,
    state_from_bytes,
    state_to_bytes,
    teacher_channel,
    weights_blob,
    weights_from_bytes,
    weights_to_bytes,
)
from codistill_trainer.resume import load_latest
from codistill_trainer.teachers import PeerPoller
from tests.support.kube import manifest
from tests.support.localrun import codistill
from tests.support.localrun import manifest as local_manifest
from tests.support.s3 import S3_KEY, S3_SECRET
from tests.support.scoped_s3 import ScopedS3, scoped_s3

BUCKET, PREFIX = "shared-bucket", "team-a/"
KEYS = {"AWS_ACCESS_KEY_ID": S3_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET}


def client(endpoint: str) -> Any:
    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=S3_KEY,
                        aws_secret_access_key=S3_SECRET)


@pytest.fixture
def scoped(s3: str) -> Iterator[ScopedS3]:
    """The prefix-scoped endpoint; the bucket is created here, by its owner, on moto itself."""
    client(s3).create_bucket(Bucket=BUCKET)
    with scoped_s3(s3, BUCKET, PREFIX) as scope:
        yield scope
        assert scope.refused == [], "a call outside team-a/ (see the list) was refused"


def run(uid: str, url: str, endpoint: str) -> Codistillation:
    doc = manifest("demo", endpoint, storage={"url": url, "endpoint": endpoint})
    doc["metadata"].update(uid=uid, generation=1)
    return parse(doc)


def test_the_scoped_store_refuses_the_root_and_other_prefixes(s3: str) -> None:
    """The policy holds: had the code touched the bucket itself, these refusals would hit it."""
    client(s3).create_bucket(Bucket=BUCKET)
    with scoped_s3(s3, BUCKET, PREFIX) as scope:
        c = client(scope.endpoint)
        c.put_object(Bucket=BUCKET, Key="team-a/x", Body=b"1")
        assert c.get_object(Bucket=BUCKET, Key="team-a/x")["Body"].read() == b"1"
        assert c.list_objects_v2(Bucket=BUCKET, Prefix="team-a/")["KeyCount"] == 1
        refused = {
            "list the root": lambda: c.list_objects_v2(Bucket=BUCKET),
            "list another prefix": lambda: c.list_objects_v2(Bucket=BUCKET, Prefix="team-b/"),
            "head the bucket": lambda: c.head_bucket(Bucket=BUCKET),
            "locate the bucket": lambda: c.get_bucket_location(Bucket=BUCKET),
            "create the bucket": lambda: c.create_bucket(Bucket=BUCKET),
            "list the buckets": lambda: c.list_buckets(),
            "write another prefix": lambda: c.put_object(Bucket=BUCKET, Key="team-b/x", Body=b""),
            "copy from another prefix": lambda: c.copy_object(
                Bucket=BUCKET, Key="team-a/y", CopySource=f"{BUCKET}/team-b/x"),
        }
        for i, (what, call) in enumerate(refused.items()):
            with pytest.raises(ClientError, match="AccessDenied|403|Forbidden"):
                call()
            assert len(scope.refused) == i + 1, f"{what}: not refused by the proxy"
        # What the run paths did before: s3fs's makedirs probes, then creates, the bucket.
        with pytest.raises(StorageError, match="access denied.* list under s3://shared-bucket/"):
            Bucket(scope.url, scope.endpoint, KEYS).ensure()


def test_the_operator_needs_only_the_prefix(scoped: ScopedS3) -> None:
    url = names.run_url(scoped.url, "default", "demo")
    folder = open_folder(url, scoped.endpoint, KEYS)
    first = run("uid-1", scoped.url, scoped.endpoint)
    assert write_run(folder, first) is None
    assert folder.read_run().metadata.uid == "uid-1"
    assert write_run(folder, first) is None  # same generation: read, not written again
    RunFolder(Bucket(url, scoped.endpoint, KEYS)).write_progress(Progress(group=1, step=7))
    assert {g: p.step for g, p in read_progress(folder, 2).items()} == {1: 7}
    # The same name created again: the earlier run's folder is archived beside it.
    assert write_run(folder, run("uid-2", scoped.url, scoped.endpoint)) == f"{url}.previous-uid-1"
    assert folder.read_run().metadata.uid == "uid-2" and read_progress(folder, 2) == {}
    folder.bucket.rm("")  # storage.onDelete: Delete
    assert folder.read_run() is None


def test_the_trainer_exchanges_under_the_prefix_only(scoped: ScopedS3) -> None:
    bucket = Bucket(names.run_url(scoped.url, "default", "demo"), scoped.endpoint, KEYS)
    folder = RunFolder(bucket)
    teacher = teacher_channel(bucket, 0)
    for step in (10, 20, 30, 40):  # the fourth publish prunes the first blob
        teacher.publish(step, weights_to_bytes({"w": torch.full((2, 2), float(step))}, step))
    assert [p.step for p in teacher.history()] == [40, 30, 20]
    assert "10.safetensors" not in bucket.ls(names.teacher_dir(0))
    poller = PeerPoller(bucket, [0])
    poller.poll_once()  # what a peer group's background poller does
    assert poller.newest() == {0: 40} and poller.warnings == {}
    assert torch.equal(poller.get(0, 40)["w"], torch.full((2, 2), 40.0))
    state = state_channel(bucket, 0)
    state.publish(40, state_to_bytes({"step": 40}))
    assert load_latest(state) == {"step": 40}  # what a restarted pod resumes from
    assert state_from_bytes(state.fetch(state.latest())) == {"step": 40}
    folder.write_progress(Progress(group=0, step=40, state="finished"))
    folder.write_final(0, Final(step=40, teacher=asdict(teacher.latest())))
    assert folder.progress(0).state == "finished" and folder.final(0).pointer("f").step == 40
    folder.write_report(Report(examples=4, groups=[GroupScore(group=0, loss=1.0, accuracy=0.5)]),
                        b"png", "summary")
    assert folder.report().examples == 4 and bucket.get(names.SUMMARY_MD) == b"summary"


def test_large_blobs_stream_in_parts_and_a_failed_upload_leaves_nothing(
        scoped: ScopedS3, s3: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A blob over PART_BYTES goes up as a multipart upload, under the prefix only, and is read
    back in parts; one that fails halfway is aborted: no object, no upload left open."""
    monkeypatch.setattr(storage, "PART_BYTES", 5 * 2**20)  # S3's smallest part
    monkeypatch.setattr(storage, "READ_BYTES", 5 * 2**20)
    bucket = Bucket(names.run_url(scoped.url, "default", "big"), scoped.endpoint, KEYS,
                    attempts=1)
    big = {"w": torch.randn(3 * 2**20)}  # 12 MiB: two parts and the rest
    teacher = teacher_channel(bucket, 0)
    pointer = teacher.publish(10, weights_blob(big, 10).write)
    assert pointer.bytes > 12 * 2**20
    assert torch.equal(weights_from_bytes(teacher.fetch(pointer))["w"], big["w"])

    def dies_halfway(f: Any) -> None:
        written = 0
        for part in weights_blob(big, 20).parts():
            written += f.write(part)
            if written > 7 * 2**20:  # one part uploaded already
                raise OSError("the pod was evicted")

    with pytest.raises(StorageError, match="evicted"):
        teacher.publish(20, dies_halfway)
    assert teacher.latest().step == 10 and bucket.ls(names.teacher_dir(0)) == [
        "10.safetensors", "LATEST.json"]
    uploads = client(s3).list_multipart_uploads(Bucket=BUCKET, Prefix=PREFIX)  # as its owner
    assert uploads.get("Uploads", []) == []


def test_codistill_run_trains_with_only_the_prefix(scoped: ScopedS3, tmp_path: Path) -> None:
    """The whole local run (launcher, trainers, report) on the scoped store: nothing but the
    prefix reached, and the first write made the run folder."""
    storage = {"url": scoped.url, "endpoint": scoped.endpoint}
    path = local_manifest(tmp_path, "scoped", workersPerGroup=1, storage=storage)
    done = codistill("run", str(path), cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    folder = RunFolder(Bucket(names.run_url(scoped.url, "default", "scoped"), scoped.endpoint))
    assert [folder.final(g).step for g in (0, 1)] == [80, 80]
    assert folder.report() is not None


def test_a_missing_bucket_is_one_line_saying_to_create_it(s3: str) -> None:
    """Neither side creates a bucket (that needs rights on the whole bucket); both say so."""
    url = "s3://no-such-bucket/runs/default/demo"
    wanted = (r"run\.json: bucket no-such-bucket does not exist \(create it, or enable the "
              r"chart's devObjectStore\)$")
    with pytest.raises(StorageError, match=wanted):
        write_run(open_folder(url, s3, KEYS), run("uid-1", "s3://no-such-bucket/runs", s3))
    with pytest.raises(StorageError, match="bucket no-such-bucket does not exist"):
        read_progress(open_folder(url, s3, KEYS), 1)  # never shown as "not started"
    with pytest.raises(StorageError, match="bucket no-such-bucket does not exist"):
        teacher_channel(Bucket(url, s3, KEYS), 0).publish(1, b"blob")
    assert [b["Name"] for b in client(s3).list_buckets()["Buckets"]] == ["codistill-test"]
