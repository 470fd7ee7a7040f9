"""The stack the end-to-end tests drive: a node, a bucket, and the operator installed by its chart.

`stack()` builds it on a running control plane as the README's cluster steps do: `helm install`
(which installs the CRD), a namespace enforcing Pod Security `restricted` for the runs, and the
bucket's Secret.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from cluster.controlplane import ControlPlane
from cluster.kubelet import ProcessKubelet
from codistill.net import free_port
from codistill.storage import Bucket
from tests.support.datafixtures import make_tiny_data
from tests.support.helm import CHART, Helm, ensure_helm
from tests.support.kube import wait_for
from tests.support.s3 import S3_KEY, S3_SECRET

ROOT = Path(__file__).resolve().parents[2]
NAMESPACE = "e2e"  # where the runs go: Pod Security `restricted` enforced
SYSTEM = "codistill"  # the chart's namespace, as in the README
BUCKET = "codistill-e2e"
KEYS = {"AWS_ACCESS_KEY_ID": S3_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET}


class Stack:
    """The control plane, a node, a bucket and the operator installed by its chart."""

    def __init__(self, cp: ControlPlane, kubelet: ProcessKubelet, endpoint: str, data: Path):
        self.cp, self.kubelet, self.endpoint, self.data = cp, kubelet, endpoint, data

    def kubectl(self, *args: str, input: str | None = None) -> str:
        return self.cp.kubectl(*args, input=input).stdout

    def get(self, kind: str, name: str | None = None, namespace: str = NAMESPACE) -> Any:
        args = ["get", kind, *([name] if name else []), "-n", namespace, "-o", "json"]
        done = self.cp.kubectl(*args, check=False)
        if done.returncode != 0:
            return None
        found = json.loads(done.stdout)
        return found if name else found["items"]

    def jobs(self, run: str, kind: str = "pytorchjobs") -> list[dict[str, Any]]:
        """The run's objects of `kind` (its jobs, or with kind="pods" their pods)."""
        return [j for j in self.get(kind) or []
                if (j["metadata"].get("labels") or {}).get("codistill.io/run") == run]

    def run(self, name: str) -> dict[str, Any]:
        return self.get("codistillation", name) or {}

    def status(self, name: str) -> dict[str, Any]:
        return self.run(name).get("status") or {}

    def folder(self, name: str) -> Bucket:
        return Bucket(f"s3://{BUCKET}/{NAMESPACE}/{name}", self.endpoint, KEYS)

    def apply(self, name: str, **spec: Any) -> None:
        self.kubectl("apply", "-f", "-", input=yaml.safe_dump(manifest(self, name, **spec)))

    def reasons(self, name: str) -> list[str]:
        events = self.get("events") or []
        return [e["reason"] for e in events if e["involvedObject"]["name"] == name]

    def wait_phase(self, name: str, phase: str, timeout: float = 300) -> dict[str, Any]:
        """Until the run reaches `phase`, printing `kubectl get codistillations` as it goes."""
        deadline, shown = time.monotonic() + timeout, 0.0
        while (status := self.status(name)).get("phase") != phase:
            assert time.monotonic() < deadline, f"{name} not {phase}: {status}"
            if time.monotonic() - shown > 10:
                print(self.kubectl("get", "codistillations", "-n", NAMESPACE))
                shown = time.monotonic()
            time.sleep(1)
        print(self.kubectl("get", "codistillations", "-n", NAMESPACE, "-o", "wide"))
        return status


JOB_KINDS = {"pytorchjob": "pytorchjobs", "trainjob": "trainjobs", "auto": "trainjobs"}


def manifest(stack: Stack, name: str, steps: int = 300, backend: str = "pytorchjob",
             **spec: Any) -> dict[str, Any]:
    """A 2-group x 2-worker run of the tiny LM task on the e2e bucket. Both Kubeflow backends
    are installed here, so `auto` means TrainJobs; PyTorchJobs unless `backend` says so."""
    return {
        "apiVersion": "codistill.io/v1alpha1", "kind": "Codistillation",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "backend": backend, "groups": 2, "workersPerGroup": 2,
            "task": {"name": "lm", "args": {"data_dir": str(stack.data), "seq_len": 16,
                                            "embed": 16, "hidden": 32}},
            "training": {"steps": steps, "batchSize": 8, "evalEverySteps": 100,
                         "evalBatches": 2, "checkpointEverySteps": 50},
            "distillation": {"burnInSteps": 20, "exchangeEverySteps": 20,
                             "reloadEverySteps": 20, "maxStalenessSteps": 1000,
                             "pollIntervalSeconds": 0.2},
            "storage": {"url": f"s3://{BUCKET}", "endpoint": stack.endpoint,
                        "credentialsSecret": "bucket-creds", "onDelete": "Delete"},
            **({"runPolicy": {"backoffLimit": 3}} if backend == "pytorchjob" else {}),
            **spec,
        },
    }


def processes(needle: str) -> list[int]:
    """Live processes of the kubelet's pods whose command line holds `needle`: a pod has a
    network namespace of its own, so trainers and operators that other tests run on this
    machine are neither counted nor killed."""
    host = os.readlink("/proc/self/ns/net")
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = (proc / "stat").read_text().split()[2]
            net = os.readlink(proc / "ns" / "net")
        except (OSError, ValueError):
            continue
        if needle in cmdline and state != "Z" and net != host:
            found.append(int(proc.name))
    return found


@contextmanager
def stack(control_plane: ControlPlane, tmp: Path) -> Iterator[Stack]:
    """The whole stack on `control_plane`; on the way out every run is deleted and every pod
    gone, and nothing of the operator or the trainers is left running."""
    # The pods run as uid 10001 with a private /tmp: their data lies in the repository's cache.
    data = make_tiny_data(ROOT / ".cache" / "e2e" / "data")
    moto = subprocess.Popen([str(ROOT / ".venv" / "bin" / "moto_server"), "-H", "127.0.0.1",
                             "-p", str(port := free_port())],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with ProcessKubelet(control_plane, tmp / "kubelet") as kubelet:
            # the pods reach the host on its bridge address; so do the tests
            world = Stack(control_plane, kubelet, f"http://{kubelet.expose(port)}", data)
            wait_for(lambda: _bucket_ready(world), "moto's S3 server")
            _install(world, tmp / "helm")
            yield world
            for run in world.get("codistillations") or []:
                world.kubectl("delete", "codistillation", run["metadata"]["name"], "-n",
                              NAMESPACE, "--wait=false")
            wait_for(lambda: not world.get("pods"), "every trainer pod gone", timeout=120)
    finally:
        moto.terminate()
        moto.wait(10)
    assert not processes("codistill_trainer.worker") and not processes("codistill_operator")


def _bucket_ready(world: Stack) -> bool:
    try:
        Bucket(f"s3://{BUCKET}", world.endpoint, KEYS).ensure()
        return True
    except Exception:  # not listening yet
        return False


def _install(world: Stack, home: Path) -> None:
    """The README's cluster steps: the run namespace, helm install, the bucket Secret."""
    helm = Helm(ensure_helm(), home)
    # The runs' namespace first: the chart puts the Role reading its Secrets there (docs: row 3)
    world.kubectl("create", "namespace", NAMESPACE)
    world.kubectl("label", "namespace", NAMESPACE, "pod-security.kubernetes.io/enforce=restricted")
    done = helm.run("install", "codistill", str(CHART), "-n", SYSTEM, "--create-namespace",
                    "--kubeconfig", str(world.cp.kubeconfig), "--wait", "--timeout", "120s",
                    "--set", "image.repository=localhost:5000/codistill/operator",
                    "--set", "image.tag=e2e", "--set", "statusIntervalSeconds=1",
                    # Watching all namespaces, Secrets are read only where this says
                    "--set-json", f'rbac.secretNamespaces=["{NAMESPACE}"]')
    assert done.returncode == 0, done.stderr
    print(done.stdout)
    # the CRD is served once the API server has published its OpenAPI (a few seconds)
    wait_for(lambda: world.cp.kubectl("explain", "codistillation", check=False).returncode == 0,
             "the Codistillation API served", timeout=60)
    secret = {"apiVersion": "v1", "kind": "Secret",
              "metadata": {"name": "bucket-creds", "namespace": NAMESPACE}, "stringData": KEYS}
    world.kubectl("apply", "-f", "-", input=json.dumps(secret))
    wait_for(lambda: processes("codistill_operator"), "the operator pod running", timeout=120)
