"""The operator for real: kopf against kmock's API server (tests/kube.py) and moto's S3 server.

The tests play the user (kubectl apply/patch/delete over HTTP), the Training Operator (patching
job conditions) and the trainer (writing progress.json into the bucket).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from typing import Any

import pytest

from codistill import names
from codistill.net import free_port
from codistill.storage import Bucket, StorageError
from codistill_operator.names import FINALIZER, SPEC_HASH
from tests.support.crdschema import INVALID, assert_meets_webhook, corpus_entry, kubeflow, validator
from tests.support.kube import (
    JOBS,
    PODS,
    RUNS,
    SECRETS,
    Cluster,
    Operator,
    manifest,
    secret,
    wait_for,
)
from tests.support.s3 import S3_KEY, S3_SECRET

KEYS = {"AWS_ACCESS_KEY_ID": S3_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET}


def folder(endpoint: str, name: str, url: str = "s3://codistill-test/runs") -> Bucket:
    return Bucket(names.run_url(url, "default", name), endpoint, KEYS)


def condition(run: dict[str, Any] | None, kind: str) -> dict[str, Any]:
    found = ((run or {}).get("status") or {}).get("conditions") or []
    return next((c for c in found if c["type"] == kind), {})


def ready(cluster: Cluster, name: str, status: str = "True", reason: str = "") -> dict:
    """The run once its Ready condition is `status` (and `reason`, if given)."""
    def probe() -> dict | None:
        run = cluster.get(RUNS, name)
        c = condition(run, "Ready")
        ok = c.get("status") == status and (not reason or c.get("reason") == reason)
        return run if ok else None

    return wait_for(probe, f"{name} Ready={status} {reason}")


def reasons(cluster: Cluster, name: str) -> list[str]:
    return [e["reason"] for e in cluster.events(name)]


def play_training_operator(cluster: Cluster, job: str, *conditions: str) -> None:
    """Set a job's conditions the way Kubeflow's Training Operator does (last one current)."""
    found = [{"type": t, "status": "True" if t == conditions[-1] or t == "Created" else "False",
              "reason": f"PyTorchJob{t}", "message": f"job {t.lower()}"} for t in conditions]
    cluster.patch(JOBS, job, {"status": {"conditions": found}}, subresource="status")


def get_url(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.status, response.read().decode()


def test_the_emulator_behaves_like_an_api_server(cluster: Cluster) -> None:
    """What the operator tests rely on: server-side metadata, generation, /status isolation,
    typed lists, JSON watches from a resourceVersion, and owner-based garbage collection."""
    run = cluster.create(RUNS, manifest("a", "http://minio:9000"))
    meta = run["metadata"]
    assert meta["uid"] and meta["generation"] == 1 and meta["resourceVersion"]
    patched = cluster.patch(RUNS, "a", {"spec": {"groups": 3}, "status": {"phase": "Running"}})
    assert patched["metadata"]["generation"] == 2 and "status" not in patched
    patched = cluster.patch(RUNS, "a", {"status": {"phase": "Running"}}, subresource="status")
    assert patched["metadata"]["generation"] == 2 and patched["status"] == {"phase": "Running"}
    listed = cluster.request("GET", cluster.path(RUNS, "default"))
    assert listed["kind"] == "CodistillationList"
    owned = {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob", "metadata": {
        "name": "a-g0", "ownerReferences": [{"uid": meta["uid"], "controller": True}]}}
    cluster.create(JOBS, owned)
    watch = f"{cluster.url}{cluster.path(JOBS, 'default')}?watch=true&resourceVersion=" + \
        listed["metadata"]["resourceVersion"]
    with urllib.request.urlopen(watch, timeout=10) as stream:
        assert stream.headers["Content-Type"] == "application/json"
        cluster.delete(RUNS, "a")
        event = json.loads(stream.readline())
    assert (event["type"], event["object"]["metadata"]["name"]) == ("ADDED", "a-g0")
    assert cluster.list(JOBS) == []  # collected with its owner


def test_apply_creates_the_jobs_the_run_folder_and_ready(cluster: Cluster, operator: Operator,
                                                          s3: str) -> None:
    cluster.create(RUNS, manifest("demo", s3))
    run = ready(cluster, "demo")
    jobs = sorted(cluster.list(JOBS), key=lambda j: j["metadata"]["name"])
    assert [j["metadata"]["name"] for j in jobs] == ["demo-g0", "demo-g1"]
    for job in jobs:
        kubeflow().validate(job)
        assert_meets_webhook(job)
        assert job["metadata"]["ownerReferences"][0]["uid"] == run["metadata"]["uid"]
        assert set(job["metadata"]["annotations"]) == {SPEC_HASH}  # kopf wrote nothing on it
        assert not job["metadata"].get("finalizers")
        assert S3_SECRET not in json.dumps(job)  # credentials only by secretKeyRef
    written = folder(s3, "demo").get_json(names.RUN_JSON)  # run.json for generation 1
    assert written["metadata"]["generation"] == 1 and written["spec"]["groups"] == 2
    status = run["status"]
    assert status["bucket"] == "s3://codistill-test/runs/default/demo"
    assert status["observedGeneration"] == 1 and status["applied"]["generation"] == 1
    validator().validate(run)  # the status the operator wrote fits the CRD's status schema
    assert not run["metadata"].get("finalizers")  # onDelete: Retain needs none
    wait_for(lambda: {"JobsCreated", "Applied"} <= set(reasons(cluster, "demo")), "events")
    code, health = get_url(operator.liveness)
    assert code == 200 and json.loads(health)["runs"] == 1
    _, scraped = get_url(f"http://127.0.0.1:{operator.metrics}/metrics")
    assert 'codistill_reconciles_total{handler="reconcile",outcome="applied"}' in scraped
    assert "codistill_reconcile_duration_seconds_bucket" in scraped


def test_a_missing_bucket_is_named_in_ready_and_never_created(cluster: Cluster,
                                                              operator: Operator, s3: str) -> None:
    storage = {"url": "s3://fresh-bucket/runs", "endpoint": s3, "credentialsSecret": "s3-creds"}
    cluster.create(RUNS, manifest("demo", s3, storage=storage))
    run = ready(cluster, "demo", "False", "StorageUnavailable")
    assert condition(run, "Ready")["message"] == (
        "read s3://fresh-bucket/runs/default/demo/run.json: bucket fresh-bucket does not exist "
        "(create it, or enable the chart's devObjectStore)")
    assert cluster.list(JOBS) == []
    with pytest.raises(StorageError, match="bucket fresh-bucket does not exist"):
        folder(s3, "demo", "s3://fresh-bucket/runs").get(names.RUN_JSON)


def test_a_backend_that_is_not_installed_is_named_in_ready_and_nothing_is_created(
        cluster: Cluster, operator: Operator, s3: str) -> None:
    """kmock serves PyTorchJobs only: no Kubeflow Trainer v2."""
    cluster.create(RUNS, manifest("demo", s3, backend="trainjob"))
    run = ready(cluster, "demo", "False", "BackendUnavailable")
    assert condition(run, "Ready")["message"] == (
        "spec.backend: trainjob: Kubeflow Trainer v2 is not installed (no "
        "trainer.kubeflow.org/v1alpha1 API)")
    assert run["status"]["phase"] == "Pending" and "applied" not in run["status"]
    assert cluster.list(JOBS) == [] and not folder(s3, "demo").exists(names.RUN_JSON)
    assert "BackendUnavailable" in reasons(cluster, "demo")


def progress(group: int, step: int, loss: float, **extra: Any) -> dict[str, Any]:
    return {"group": group, "step": step, "steps": 1000, "state": "training", "loss": loss,
            "taskLoss": loss, "distillLoss": 0.1, "evalLoss": None, "teachers": {},
            "staleness": {}, "lastPublished": step, "examplesPerSec": 100.0, "time": 1.8e9,
            "resumedFrom": None, "warnings": [], **extra}


def groups_of(cluster: Cluster, name: str) -> dict[int, dict[str, Any]]:
    return {g["group"]: g for g in (cluster.get(RUNS, name).get("status") or {}).get("groups", [])}


def test_status_follows_the_jobs_and_the_progress_files(cluster: Cluster, operator: Operator,
                                                         s3: str) -> None:
    cluster.create(RUNS, manifest("demo", s3, distillation={"maxStalenessSteps": 300}))
    ready(cluster, "demo")
    bucket = folder(s3, "demo")
    for g in (0, 1):
        play_training_operator(cluster, f"demo-g{g}", "Created", "Running")
    bucket.put_json(names.progress_file(0), progress(0, 120, 2.0, teachers={"1": 100},
                                                      staleness={"1": 20}))
    bucket.put_json(names.progress_file(1), progress(1, 80, 3.0))
    run = wait_for(lambda: (r := cluster.get(RUNS, "demo"))["status"].get("step") == 80 and r,
                   "step 80")
    assert run["status"]["phase"] == "Running" and run["status"]["loss"] == 2.5
    assert run["status"]["groupsReady"] == "2/2"
    assert condition(run, "Distilling")["status"] == "True"
    assert groups_of(cluster, "demo")[0]["teachers"] == {"1": 100}

    play_training_operator(cluster, "demo-g1", "Created", "Running", "Restarting")
    wait_for(lambda: groups_of(cluster, "demo")[1]["restarts"] == 1, "a restart counted")
    play_training_operator(cluster, "demo-g1", "Created", "Running")
    bucket.put_json(names.progress_file(0), progress(0, 900, 1.0, teachers={"1": 400},
                                                      staleness={"1": 500}))
    run = wait_for(lambda: (r := cluster.get(RUNS, "demo")) and condition(r, "Degraded").get(
        "reason") == "PeersStale" and r, "stale peers")
    assert groups_of(cluster, "demo")[0]["stalePeers"] == ["1"]

    play_training_operator(cluster, "demo-g1", "Created", "Running", "Failed")
    run = wait_for(lambda: (r := cluster.get(RUNS, "demo"))["status"]["phase"] == "Degraded"
                   and condition(r, "Degraded")["reason"] == "GroupFailed" and r, "degraded")
    assert condition(run, "Running")["status"] == "True"  # the other group goes on
    play_training_operator(cluster, "demo-g0", "Created", "Running", "Succeeded")
    run = wait_for(lambda: (r := cluster.get(RUNS, "demo"))["status"]["phase"] == "Failed" and r,
                   "failed")
    assert condition(run, "Failed")["status"] == "True"
    # kopf posts events from its own queue, after the status patch: wait for them
    expected = {"GroupStarted", "GroupRestarting", "PeersStale", "GroupFailed", "RunDegraded",
                "GroupSucceeded", "RunFailed"}
    seen = wait_for(lambda: expected <= set(found := reasons(cluster, "demo")) and found,
                    "the run's events")
    assert seen.count("GroupRestarting") == 1 and seen.count("RunFailed") == 1
    validator().validate(run)


def test_the_run_succeeds_when_every_group_has(cluster: Cluster, operator: Operator,
                                               s3: str) -> None:
    cluster.create(RUNS, manifest("demo", s3, groups=3))
    ready(cluster, "demo")
    for g in range(3):
        play_training_operator(cluster, f"demo-g{g}", "Created", "Running", "Succeeded")
    run = wait_for(lambda: (r := cluster.get(RUNS, "demo"))["status"]["phase"] == "Succeeded"
                   and r, "succeeded")
    assert condition(run, "Succeeded")["status"] == "True" and run["status"]["groupsReady"] == "3/3"
    wait_for(lambda: "RunSucceeded" in reasons(cluster, "demo"), "the success event")
    assert reasons(cluster, "demo").count("GroupSucceeded") == 3


def test_a_job_removed_after_its_group_finished_is_not_created_again(
        cluster: Cluster, operator: Operator, s3: str) -> None:
    cluster.create(RUNS, manifest("demo", s3, runPolicy={"ttlSecondsAfterFinished": 0}))
    ready(cluster, "demo")
    for g in range(2):
        play_training_operator(cluster, f"demo-g{g}", "Created", "Running", "Succeeded")
    wait_for(lambda: cluster.get(RUNS, "demo")["status"]["phase"] == "Succeeded", "succeeded")
    for g in range(2):
        cluster.delete(JOBS, f"demo-g{g}")  # what the Training Operator does after the TTL
    wait_for(lambda: cluster.list(JOBS) == [], "the jobs removed")
    time.sleep(2)  # ten status intervals, and the deletions' own reconciles, have passed
    assert cluster.list(JOBS) == [] and reasons(cluster, "demo").count("JobsCreated") == 1
    assert cluster.get(RUNS, "demo")["status"]["phase"] == "Succeeded"


def test_a_deleted_job_is_created_again_only_once_its_groups_pods_are_gone(
        cluster: Cluster, operator: Operator, s3: str) -> None:
    """Two generations of one group must never train at once: both would write its folder."""
    cluster.create(RUNS, manifest("demo", s3))
    ready(cluster, "demo")
    labels = {names.LABEL_RUN: "demo", names.LABEL_GROUP: "0"}
    cluster.create(PODS, {"apiVersion": "v1", "kind": "Pod", "metadata": {
        "name": "demo-g0-master-0", "namespace": "default", "labels": labels},
        "spec": {"containers": [{"name": "pytorch", "image": "trainer"}]}})
    old = cluster.get(JOBS, "demo-g0")["metadata"]["uid"]
    cluster.delete(JOBS, "demo-g0")  # by hand; its pod still terminating
    time.sleep(2)  # the deletion's reconcile and ten status intervals
    assert cluster.get(JOBS, "demo-g0") is None
    cluster.delete(PODS, "demo-g0-master-0")
    again = wait_for(lambda: cluster.get(JOBS, "demo-g0"), "demo-g0 created again", timeout=10)
    assert again["metadata"]["uid"] != old


def test_a_run_created_again_under_its_name_starts_fresh(cluster: Cluster, operator: Operator,
                                                         s3: str) -> None:
    cluster.create(RUNS, manifest("demo", s3, training={"steps": 2000}))
    first = ready(cluster, "demo")["metadata"]["uid"]
    folder(s3, "demo").put_json(names.progress_file(0), {"group": 0, "step": 1500})
    cluster.delete(RUNS, "demo")
    wait_for(lambda: cluster.get(RUNS, "demo") is None, "the run gone")
    cluster.create(RUNS, manifest("demo", s3, training={"steps": 50}))
    second = ready(cluster, "demo")["metadata"]["uid"]
    written = folder(s3, "demo").get_json(names.RUN_JSON)
    assert written["metadata"]["uid"] == second != first
    assert written["spec"]["training"]["steps"] == 50  # the new spec, not the old run.json
    assert not folder(s3, "demo").exists(names.progress_file(0))
    old = Bucket(f"{folder(s3, 'demo').url}.previous-{first}", s3, KEYS)
    assert old.get_json(names.RUN_JSON)["spec"]["training"]["steps"] == 2000
    assert old.get_json(names.progress_file(0))["step"] == 1500
    wait_for(lambda: "RunFolderArchived" in reasons(cluster, "demo"), "the archive event")


def suspended(cluster: Cluster) -> list[bool]:
    return [j["spec"]["runPolicy"].get("suspend", False) for j in cluster.list(JOBS)]


def test_suspend_and_resume_reach_every_job(cluster: Cluster, operator: Operator, s3: str) -> None:
    cluster.create(RUNS, manifest("demo", s3, groups=3))
    ready(cluster, "demo")
    cluster.patch(RUNS, "demo", {"spec": {"runPolicy": {"suspend": True}}})
    wait_for(lambda: suspended(cluster) == [True] * 3, "every job suspended")
    wait_for(lambda: folder(s3, "demo").get_json(names.RUN_JSON)["spec"]["runPolicy"]["suspend"],
             "run.json of generation 2")
    cluster.patch(RUNS, "demo", {"spec": {"runPolicy": {"suspend": False}}})
    wait_for(lambda: suspended(cluster) == [False] * 3, "every job resumed")
    wait_for(lambda: {"Suspended", "Resumed"} <= set(reasons(cluster, "demo")), "events")
    assert len(cluster.list(JOBS)) == 3


def test_a_change_to_an_immutable_field_is_refused_whole(cluster: Cluster, operator: Operator,
                                                          s3: str) -> None:
    cluster.create(RUNS, manifest("demo", s3))
    ready(cluster, "demo")
    before = {j["metadata"]["name"]: j["metadata"]["resourceVersion"] for j in cluster.list(JOBS)}
    cluster.patch(RUNS, "demo", {"spec": {"groups": 3, "image": "trainer:2"}})
    run = ready(cluster, "demo", "False", "ImmutableFieldChanged")
    assert "spec.groups: 2 -> 3" in condition(run, "Ready")["message"]
    assert run["status"]["observedGeneration"] == 2 and run["status"]["applied"]["generation"] == 1
    after = {j["metadata"]["name"]: j["metadata"]["resourceVersion"] for j in cluster.list(JOBS)}
    assert after == before  # nothing applied, not even the image
    assert folder(s3, "demo").get_json(names.RUN_JSON)["metadata"]["generation"] == 1
    wait_for(lambda: "ImmutableFieldChanged" in reasons(cluster, "demo"), "a Warning event")

    cluster.patch(RUNS, "demo", {"spec": {"groups": 2}})  # revert: the image change now applies
    ready(cluster, "demo", "True")
    images = {j["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0][
        "image"] for j in cluster.list(JOBS)}
    assert images == {"trainer:2"} and len(cluster.list(JOBS)) == 2
    assert folder(s3, "demo").get_json(names.RUN_JSON)["metadata"]["generation"] == 3
    wait_for(lambda: "JobsUpdated" in reasons(cluster, "demo"), "the update event")


def test_delete_with_retain_keeps_the_folder(cluster: Cluster, operator: Operator, s3: str) -> None:
    cluster.create(RUNS, manifest("demo", s3))
    ready(cluster, "demo")
    cluster.delete(RUNS, "demo")
    wait_for(lambda: cluster.get(RUNS, "demo") is None, "the run gone")
    wait_for(lambda: cluster.list(JOBS) == [], "its jobs collected (ownerReferences)")
    assert folder(s3, "demo").exists(names.RUN_JSON)


def test_delete_with_delete_removes_the_folder_first(cluster: Cluster, operator: Operator,
                                                     s3: str) -> None:
    cluster.create(RUNS, manifest("demo", s3, storage={
        "url": "s3://codistill-test/runs", "endpoint": s3, "credentialsSecret": "s3-creds",
        "onDelete": "Delete"}))
    run = ready(cluster, "demo")
    wait_for(lambda: FINALIZER in (cluster.get(RUNS, "demo")["metadata"].get("finalizers") or []),
             "the finalizer")
    folder(s3, "demo").put_json(names.progress_file(0), progress(0, 10, 1.0))
    cluster.delete(RUNS, "demo")
    wait_for(lambda: cluster.get(RUNS, "demo") is None, "the run gone")
    assert not folder(s3, "demo").exists(names.RUN_JSON)
    assert folder(s3, "demo").ls("groups") == []
    assert cluster.list(JOBS) == []
    assert run["metadata"]["uid"]  # events outlive the run
    assert "RunFolderDeleted" in reasons(cluster, "demo")


def test_an_unreachable_bucket_does_not_hold_deletion_forever(cluster: Cluster,
                                                              operator: Operator, s3: str) -> None:
    cluster.create(RUNS, manifest("demo", s3, storage={
        "url": "s3://codistill-test/runs", "endpoint": s3, "credentialsSecret": "s3-creds",
        "onDelete": "Delete"}))
    ready(cluster, "demo")
    wait_for(lambda: cluster.get(RUNS, "demo")["metadata"].get("finalizers"), "the finalizer")
    cluster.delete(SECRETS, "s3-creds")  # the operator can no longer reach the bucket
    cluster.delete(RUNS, "demo")
    wait_for(lambda: cluster.get(RUNS, "demo") is None, "the run released")
    (kept,) = [e for e in cluster.events("demo") if e["reason"] == "RunFolderKept"]
    assert kept["type"] == "Warning" and "s3://codistill-test/runs/default/demo" in kept["message"]
    assert folder(s3, "demo").exists(names.RUN_JSON)


def job_names(cluster: Cluster) -> list[str]:
    return sorted(j["metadata"]["name"] for j in cluster.list(JOBS))


def test_restarts_half_way_converge_to_exactly_the_jobs(cluster: Cluster, s3: str) -> None:
    cluster.create(SECRETS, secret())
    cluster.emulator.lose_create_response.add("demo-g1")  # stored, but the operator hears 500
    first = Operator()
    try:
        cluster.create(RUNS, manifest("demo", s3))
        run = ready(cluster, "demo")
        assert job_names(cluster) == ["demo-g0", "demo-g1"]
        assert not cluster.emulator.lose_create_response  # the 500 was served, and survived
    finally:
        first.stop()
    # While the operator is down: a job deleted, one edited by hand, a stray, and a spec change.
    g1 = cluster.get(JOBS, "demo-g1")
    cluster.delete(JOBS, "demo-g0")
    cluster.patch(JOBS, "demo-g1", {"spec": {"nprocPerNode": "7"}})
    stray = {"apiVersion": g1["apiVersion"], "kind": g1["kind"], "spec": g1["spec"],
             "metadata": {**{k: g1["metadata"][k] for k in ("labels", "ownerReferences")},
                          "name": "demo-g5", "annotations": {SPEC_HASH: "x"}}}
    cluster.create(JOBS, stray)
    cluster.patch(RUNS, "demo", {"spec": {"image": "trainer:2"}})
    second = Operator()
    try:
        def converged() -> bool:
            jobs = cluster.list(JOBS)
            images = {j["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"][
                "containers"][0]["image"] for j in jobs}
            return job_names(cluster) == ["demo-g0", "demo-g1"] and images == {"trainer:2"}

        wait_for(converged, "exactly two current jobs")
        ready(cluster, "demo")
        assert cluster.get(JOBS, "demo-g1")["spec"]["nprocPerNode"] == "1"
        uids = {j["metadata"]["ownerReferences"][0]["uid"] for j in cluster.list(JOBS)}
        assert uids == {run["metadata"]["uid"]}
    finally:
        second.stop()


def test_invalid_manifests_are_refused_naming_the_field(cluster: Cluster, operator: Operator,
                                                        s3: str) -> None:
    cluster.create(SECRETS, secret("s3-half-creds", AWS_ACCESS_KEY_ID=S3_KEY))
    expected = {}
    for path in INVALID:
        doc, field, _ = corpus_entry(path)
        cluster.create(RUNS, doc)
        expected[doc["metadata"]["name"]] = field
    for name, field in expected.items():
        run = ready(cluster, name, "False", "InvalidSpec")
        assert field in condition(run, "Ready")["message"], (name, condition(run, "Ready"))
        assert run["status"]["phase"] == "Invalid"
    for name, field in expected.items():
        warnings = [e for e in cluster.events(name) if e["type"] == "Warning"]
        assert any(field in e["message"] for e in warnings), (name, warnings)
    assert cluster.list(JOBS) == []
    assert folder(s3, "x").fs.ls("codistill-test") == []  # no run folder was written


@pytest.mark.slow
def test_python_m_codistill_operator_runs_it(cluster: Cluster, s3: str) -> None:
    liveness, metrics = free_port(), free_port()
    cluster.create(SECRETS, secret())
    proc = subprocess.Popen(
        [sys.executable, "-m", "codistill_operator", "--namespace", "default",
         "--liveness-port", str(liveness), "--metrics-port", str(metrics),
         "--status-interval", "0.5"],
        env={**os.environ, "KUBECONFIG": str(cluster.kubeconfig)},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        elsewhere = manifest("demo", s3)
        elsewhere["metadata"]["namespace"] = "other"
        cluster.create(RUNS, elsewhere)
        cluster.create(RUNS, manifest("demo", s3))
        wait_for(lambda: len(cluster.list(JOBS)) == 2, "two jobs", timeout=60)
        ready(cluster, "demo")
        assert get_url(f"http://127.0.0.1:{liveness}/healthz")[0] == 200
        assert "codistill_runs{" in get_url(f"http://127.0.0.1:{metrics}/metrics")[1]
    finally:
        proc.terminate()
        output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, output[-2000:]
    assert "status" not in cluster.get(RUNS, "demo", "other")  # not a watched namespace
    logs = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    assert logs and all("message" in line for line in logs)
    assert S3_SECRET not in output  # credentials are never logged


def test_a_finished_runs_job_deleted_while_the_operator_was_down_is_not_created_again(
        cluster: Cluster, s3: str) -> None:
    """Re-creating it would train a finished group again and announce its success twice."""
    from prometheus_client import REGISTRY

    def applied() -> float:  # reconciles that got as far as the jobs, by any Operator here
        labels = {"handler": "reconcile", "outcome": "applied"}
        return REGISTRY.get_sample_value("codistill_reconciles_total", labels) or 0.0

    cluster.create(SECRETS, secret())
    first = Operator()
    try:
        cluster.create(RUNS, manifest("demo", s3))
        ready(cluster, "demo")
        for g in range(2):
            play_training_operator(cluster, f"demo-g{g}", "Created", "Running", "Succeeded")
        wait_for(lambda: "RunSucceeded" in reasons(cluster, "demo"), "the run succeeded")
    finally:
        first.stop()
    cluster.delete(JOBS, "demo-g0")
    before = applied()
    second = Operator()
    try:
        wait_for(lambda: applied() > before, "the run resumed")
        time.sleep(1)  # five status intervals
        assert job_names(cluster) == ["demo-g1"]
        assert cluster.get(RUNS, "demo")["status"]["phase"] == "Succeeded"
        seen = reasons(cluster, "demo")
        assert seen.count("JobsCreated") == 1 and seen.count("GroupSucceeded") == 2, seen
        assert seen.count("RunSucceeded") == 1, seen
    finally:
        second.stop()
