"""`make e2e`: from `kubectl apply` to a finished, codistilled run, on one machine.

Every part is the real one except the cluster: kmock's Kubernetes API server (with the emulator
of tests/kube.py), moto's S3 server, the operator as its own process exactly as its container runs
it (`python -m codistill_operator`), kubectl, and the trainers as real processes. The Kubeflow
Training Operator's part is played by training_operator.py, which knows only the PyTorchJob
contract. What only a real cluster proves (scheduling, networking between pods, the real
controller and garbage collector, RBAC) is listed in the README's contributing section.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from codistill.net import free_port
from tests.e2e.training_operator import TrainingOperator
from tests.support.datafixtures import make_tiny_data
from tests.support.kube import JOBS, RUNS, Cluster, wait_for
from tests.support.localrun import workers_of
from tests.support.s3 import S3_KEY, S3_SECRET

pytestmark = pytest.mark.slow
BUCKET = "codistill-e2e"
STEPS = 400


def kubectl_binary() -> str:
    found = shutil.which("kubectl")
    if found is None:
        pytest.skip("kubectl is not on PATH")
    return found


class World:
    """The API server, the operator process, the Training Operator stand-in, and kubectl."""

    def __init__(self, tmp: Path, endpoint: str):
        self.tmp, self.endpoint = tmp, endpoint
        self.cluster = Cluster(tmp)
        self.env = {**os.environ, "KUBECONFIG": str(self.cluster.kubeconfig)}
        self.kubectl_bin = kubectl_binary()
        self.ports = [free_port(), free_port()]
        self.operator = subprocess.Popen(
            [sys.executable, "-m", "codistill_operator", "--all-namespaces",
             "--liveness-port", str(self.ports[0]), "--metrics-port", str(self.ports[1]),
             "--status-interval", "1"],
            env=self.env, stdout=(tmp / "operator.log").open("wb"), stderr=subprocess.STDOUT,
            start_new_session=True)
        from kubernetes import client, config

        api = config.new_client_from_config(str(self.cluster.kubeconfig))
        self.training = TrainingOperator(api, tmp / "pods").start()
        self.api = client.CustomObjectsApi(api)

    def kubectl(self, *args: str) -> str:
        done = subprocess.run([self.kubectl_bin, *args], env=self.env, capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout

    def run(self, name: str) -> dict[str, Any] | None:
        return self.cluster.get(RUNS, name)

    def close(self) -> None:
        """Stop everything this world started, by PID, whatever happened."""
        self.training.stop()
        if self.operator.poll() is None:
            os.killpg(self.operator.pid, signal.SIGTERM)
            try:
                self.operator.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.operator.pid, signal.SIGKILL)
                self.operator.wait()
        self.cluster.close()


@pytest.fixture
def world(tmp_path: Path, s3: str) -> Iterator[World]:
    w = World(tmp_path, s3)
    try:
        yield w
    finally:
        w.close()
        print((tmp_path / "operator.log").read_text(errors="replace")[-3000:])
    assert w.operator.poll() is not None
    for name in ("e2e", "kill"):
        assert not workers_of(f"s3://{BUCKET}/default/{name}"), "trainer processes left running"
    for port in (*w.ports, int(w.cluster.url.rsplit(":", 1)[1])):
        assert not listening(port), f"port {port} still listening"


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def manifest(tmp: Path, endpoint: str, name: str, on_delete: str = "Delete") -> Path:
    """A 2-group x 2-worker run on the S3 bucket, with its credentials Secret, in one file."""
    data = make_tiny_data(tmp / "data")
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "bucket-creds"},
              "stringData": {"AWS_ACCESS_KEY_ID": S3_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET}}
    run = {
        "apiVersion": "codistill.io/v1alpha1", "kind": "Codistillation",
        "metadata": {"name": name},
        "spec": {
            "groups": 2, "workersPerGroup": 2,
            "task": {"name": "lm", "args": {"data_dir": str(data), "seq_len": 16, "embed": 16,
                                            "hidden": 32}},
            "training": {"steps": STEPS, "batchSize": 8, "evalEverySteps": 100,
                         "evalBatches": 2, "checkpointEverySteps": 50},
            "distillation": {"burnInSteps": 20, "exchangeEverySteps": 20,
                             "reloadEverySteps": 20, "maxStalenessSteps": 1000,
                             "pollIntervalSeconds": 0.1},
            "storage": {"url": f"s3://{BUCKET}", "endpoint": endpoint,
                        "credentialsSecret": "bucket-creds", "onDelete": on_delete},
            "runPolicy": {"backoffLimit": 3},
        },
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump_all([secret, run]))
    return path


def bucket(endpoint: str, name: str):
    from codistill.storage import Bucket

    return Bucket(f"s3://{BUCKET}/default/{name}", endpoint,
                  {"AWS_ACCESS_KEY_ID": S3_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET})


def phase(world: World, name: str) -> str | None:
    return ((world.run(name) or {}).get("status") or {}).get("phase")


def test_apply_to_succeeded_then_delete(world: World, tmp_path: Path):
    world.kubectl("apply", "--validate=false", "-f", str(manifest(tmp_path, world.endpoint, "e2e")))
    jobs = wait_for(lambda: len(world.cluster.list(JOBS)) == 2 and world.cluster.list(JOBS),
                    "two PyTorchJobs", timeout=60)
    assert sorted(j["metadata"]["name"] for j in jobs) == ["e2e-g0", "e2e-g1"]
    table = ""
    deadline = time.monotonic() + 300
    while phase(world, "e2e") != "Succeeded":
        assert time.monotonic() < deadline, f"not Succeeded: {world.run('e2e')['status']}"
        table = world.kubectl("get", "codistillations")
        print(table)
        time.sleep(2)
    status = world.run("e2e")["status"]
    assert [g["step"] for g in status["groups"]] == [STEPS, STEPS]
    assert all(g["loss"] > 0 and g["teachers"] for g in status["groups"]), status["groups"]
    table = world.kubectl("get", "codistillations")
    assert all(col in table for col in ("GROUPS", "PHASE", "STEP", "LOSS", "AGE")), table
    assert "Succeeded" in table
    wide = world.kubectl("get", "codist", "-o", "wide")
    assert "READY" in wide and f"s3://{BUCKET}" in wide, wide
    store = bucket(world.endpoint, "e2e")
    for g, peer in ((0, "1"), (1, "0")):
        assert store.get_json(f"groups/{g}/teacher/LATEST.json")["step"] == STEPS
        assert peer in store.get_json(f"groups/{g}/progress.json")["teachers"]
    assert store.get_json("report/report.json")["churn"]["pairs"]
    world.kubectl("delete", "codistillation", "e2e")
    wait_for(lambda: not world.cluster.list(JOBS), "jobs deleted with their owner", timeout=60)
    wait_for(lambda: not store.exists("run.json"), "run folder deleted (onDelete: Delete)",
             timeout=60)


def test_killed_master_restarts_and_resumes(world: World, tmp_path: Path):
    world.kubectl("apply", "--validate=false", "-f", str(manifest(tmp_path, world.endpoint, "kill")))
    store = bucket(world.endpoint, "kill")
    state = "groups/0/state/LATEST.json"
    wait_for(lambda: store.exists(state) and store.get_json(state)["step"] >= 100,
             "group 0 saved state at step 100", timeout=240)
    job = next(j for j in world.training.jobs.values() if j.name == "kill-g0")
    other = next(j for j in world.training.jobs.values() if j.name == "kill-g1")
    # group 1 may start later than group 0: wait until it has reported at all
    other_before = wait_for(lambda: store.get_json("groups/1/progress.json"),
                            "group 1 progress", timeout=120)["step"]
    saved = store.get_json(state)["step"]
    os.kill(job.procs[0].pid, signal.SIGKILL)  # the Master
    wait_for(lambda: job.restarts == 1, "the Training Operator restarted the group", timeout=60)
    wait_for(lambda: (store.get_json("groups/0/progress.json") or {}).get("resumedFrom"),
             "group 0 resumed", timeout=120)
    progress = store.get_json("groups/0/progress.json")
    assert progress["resumedFrom"] >= saved > 0 and progress["step"] >= saved
    wait_for(lambda: phase(world, "kill") == "Succeeded", "the run succeeded", timeout=300)
    status = world.run("kill")["status"]
    groups = {g["group"]: g for g in status["groups"]}
    assert groups[0]["restarts"] >= 1 and groups[1]["restarts"] == 0
    assert other.restarts == 0 and store.get_json("groups/1/progress.json")["step"] > other_before
