#!/usr/bin/env python3
"""End-to-end check of the local control plane (about 30 s once built):

    python -m cluster.smoke [--dir DIR] [--keep]   (from the repository root)

starts etcd + kube-apiserver + kube-controller-manager + the Training Operator, then checks:
kubectl version and /readyz; a namespace enforcing the `restricted` Pod Security Standard; a
PyTorchJob (1 Master + 1 Worker) for which the operator creates both pods (Pending: no kubelet)
and both Services; two invalid PyTorchJobs refused by the operator's webhook at create time;
the garbage collector deleting pods and Services with their job; and, after stop(), that no
started process is left and none of the ports is still listening.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from cluster.controlplane import RESTRICTED_PYTORCH_INIT_CONTAINER, ControlPlane, TrainingOperator

NS = "smoke"
SECURE = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
POD_SECURE = {"runAsNonRoot": True, "runAsUser": 1000, "seccompProfile": {"type": "RuntimeDefault"}}


def job(name: str, master_replicas: int = 1, container: str = "pytorch") -> dict:
    def replica(n: int) -> dict:
        return {"replicas": n, "restartPolicy": "OnFailure", "template": {"spec": {
            "securityContext": POD_SECURE,
            "containers": [{"name": container, "image": "codistill/trainer:0.1.0", "securityContext": SECURE}]}}}
    return {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob", "metadata": {"name": name, "namespace": NS},
            "spec": {"pytorchReplicaSpecs": {"Master": replica(master_replicas), "Worker": replica(1)}}}


def wait_for(what: str, check, timeout: float = 30, every: float = 0.3):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out: {what}")
        time.sleep(every)


def listening_ports() -> set[int]:
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if f[3] == "0A":  # LISTEN
                ports.add(int(f[1].rsplit(":", 1)[1], 16))
    return ports


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", type=Path)
    ap.add_argument("--keep", action="store_true", help="leave it running (stop with controlplane.py down)")
    a = ap.parse_args()
    directory = a.dir or Path(tempfile.mkdtemp(prefix="codistill-cluster-"))
    t0 = time.monotonic()
    cp = ControlPlane(directory, verbose=True, die_with_parent=not a.keep,
                      training_operator=TrainingOperator(
                          pytorch_init_container_template=RESTRICTED_PYTORCH_INIT_CONTAINER))
    cp.start()
    ok = False
    try:
        print(f"started in {time.monotonic() - t0:.1f}s")
        print(cp.kubectl("version").stdout.strip())
        assert cp.kubectl("get", "--raw", "/readyz").stdout.strip() == "ok"
        cp.kubectl("create", "namespace", NS)
        cp.kubectl("label", "namespace", NS, "pod-security.kubernetes.io/enforce=restricted")

        cp.kubectl("create", "-f", "-", input=json.dumps(job("demo")))
        def names(kind):
            return sorted(cp.kubectl("-n", NS, "get", kind, "-o", "name").stdout.split())
        pods = wait_for("both pods", lambda: names("pods") if len(names("pods")) == 2 else None)
        svcs = wait_for("both services", lambda: names("services") if len(names("services")) == 2 else None)
        print("operator created:", *pods, *svcs)
        phases = cp.kubectl("-n", NS, "get", "pods", "-o", "jsonpath={.items[*].status.phase}").stdout.split()
        assert phases == ["Pending", "Pending"], phases

        for bad, expect in ((job("bad-replicas", master_replicas=2), "must be 1"),
                            (job("bad-container", container="trainer"), "must have at least one container")):
            r = cp.kubectl("create", "-f", "-", input=json.dumps(bad), check=False)
            assert r.returncode != 0 and "denied the request" in r.stderr and expect in r.stderr, r.stderr
            print("refused:", r.stderr.strip()[:160])

        cp.kubectl("-n", NS, "delete", "pytorchjob", "demo", "--wait=true")
        t_gc = time.monotonic()
        wait_for("garbage collection", lambda: not names("pods") and not names("services"), timeout=60)
        print(f"garbage collected in {time.monotonic() - t_gc:.1f}s")
        print("garbage collector removed the pods and services")
        ok = True
    finally:
        if a.keep and ok:
            print(f"left running: export KUBECONFIG={cp.kubeconfig}; stop: python3 cluster/controlplane.py down --dir {directory}")
            return 0
        procs, ports = list(cp.processes), set(cp.ports.values())
        t1 = time.monotonic()
        cp.stop()
        print(f"stopped in {time.monotonic() - t1:.1f}s")
    left = [p.name for p in procs if p.alive()]
    still = ports & listening_ports()
    assert not left, f"still running: {left}"
    assert not still, f"still listening: {still}"
    if not a.dir:
        shutil.rmtree(directory, ignore_errors=True)
    print("no process left, no port left listening; OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
