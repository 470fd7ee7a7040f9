#!/usr/bin/env python3
"""End-to-end check of Kubeflow Trainer v2 + JobSet on the real control plane with the process
kubelet (about a minute once built):

    .venv/bin/python -m cluster.trainer_smoke [--dir DIR] [--with-training-operator]
                                              (from the repository root)

In a namespace enforcing the `restricted` Pod Security Standard:
  1. a ClusterTrainingRuntime (mlPolicy numNodes 1, torch; one replicatedJob `node` whose
     container `node` runs the trainer image's mapping as 10001:10001 with a restricted
     securityContext) and a TrainJob on it with numNodes 2, numProcPerNode 1, created by a user
     who may only create/get/list/watch/delete TrainJobs: torchrun in both pods rendezvouses
     through PET_MASTER_ADDR/PET_MASTER_PORT (gloo, init_process_group + all_reduce); the TrainJob
     reaches Complete=True; its status.jobsStatus, the JobSet, the pods' labels, annotations and
     injected env are printed;
  2. the webhook refuses at create time a TrainJob with a reserved env (PET_NNODES) and one whose
     runtime does not exist;
  3. a running TrainJob deleted: the garbage collector deletes its JobSet, Jobs and pods;
and at the end nothing is left: no process, no listening port, no netns, no veth, no bridge.
The objects as observed are written to DIR/observed/*.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cluster import smoke
from cluster.controlplane import ControlPlane, TrainerV2, write_kubeconfig
from cluster.kubelet import ProcessKubelet
from cluster.kubelet_smoke import assert_nothing_left

NS = "smoke"
IMAGE = "codistill/trainer:smoke"
RUNTIME = "smoke-torch"
CLIENT = "smoke-trainjob-client"
POD_SECURE = {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001,
              "seccompProfile": {"type": "RuntimeDefault"}}
SECURE = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
# run by torchrun (one worker per pod): the env Trainer injected, the names, the collective
DDP = """
import os, socket, torch, torch.distributed as d
print({k: v for k, v in sorted(os.environ.items()) if k.startswith(('PET_', 'SMOKE'))})
print('torchrun set', {k: os.environ[k] for k in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT')})
print('hostname', socket.gethostname(), 'PET_MASTER_ADDR ->', socket.gethostbyname(os.environ['PET_MASTER_ADDR']))
if os.environ['PET_NODE_RANK'] == '1':
    print(open('/etc/hosts').read())
d.init_process_group('gloo')
t = torch.tensor([d.get_rank() + 1.0])
d.all_reduce(t)
print('rank', d.get_rank(), 'world', d.get_world_size(), 'all_reduce', t.item(), flush=True)
d.destroy_process_group()
"""
SLEEPER = """
import signal, sys, time
signal.signal(signal.SIGTERM, lambda *a: (print('got SIGTERM', flush=True), sys.exit(0)))
print('sleeping', flush=True)
time.sleep(600)
"""


def runtime(name: str = RUNTIME) -> dict:
    """A torch ClusterTrainingRuntime: one replicated Job `node`, its container `node` (restricted)."""
    return {"apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "ClusterTrainingRuntime",
            "metadata": {"name": name, "labels": {"trainer.kubeflow.org/framework": "torch"}},
            "spec": {"mlPolicy": {"numNodes": 1, "torch": {}},
                     "template": {"spec": {"replicatedJobs": [{
                         "name": "node",
                         "template": {"metadata": {"labels": {"trainer.kubeflow.org/trainjob-ancestor-step": "trainer"}},
                                      "spec": {"template": {"spec": {
                                          "securityContext": POD_SECURE,
                                          "containers": [{"name": "node", "image": IMAGE,
                                                          "securityContext": SECURE}]}}}}}]}}}}


def trainjob(name: str, command: list[str], args: list[str] = (), env: list[dict] = (),
             runtime_name: str = RUNTIME) -> dict:
    return {"apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "TrainJob",
            "metadata": {"name": name, "namespace": NS},
            "spec": {"runtimeRef": {"apiGroup": "trainer.kubeflow.org", "kind": "ClusterTrainingRuntime",
                                    "name": runtime_name},
                     "trainer": {"numNodes": 2, "numProcPerNode": 1, "command": command, "args": list(args),
                                 "env": [{"name": "SMOKE", "value": "1"}, *env]}}}


def wait_for(what: str, check, timeout: float = 60, every: float = 0.1):
    return smoke.wait_for(what, check, timeout, every)


def sh(cmd: str) -> str:
    return subprocess.run(cmd, shell=True, capture_output=True, text=True).stdout.strip()


def client_kubeconfig(cp: ControlPlane) -> Path:
    """A user with only the TrainJob verbs an operator needs, in NS (RBAC is checked on the
    create; the webhook reads the runtime as the Trainer, not as this user)."""
    crt, key = cp.pki.cert(CLIENT, "ca", CLIENT, client=True)
    role = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": CLIENT, "namespace": NS},
            "rules": [{"apiGroups": ["trainer.kubeflow.org"], "resources": ["trainjobs"],
                       "verbs": ["create", "get", "list", "watch", "delete"]}]}
    binding = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
               "metadata": {"name": CLIENT, "namespace": NS},
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": CLIENT},
               "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": CLIENT}]}
    for obj in (role, binding):
        cp.kubectl("create", "-f", "-", input=json.dumps(obj))
    return write_kubeconfig(cp.dir / f"{CLIENT}.kubeconfig", cp.server, cp.pki.path("ca", "crt"), crt, key, CLIENT)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", type=Path)
    ap.add_argument("--with-training-operator", action="store_true",
                    help="run the v1 Training Operator next to them (other API group: they coexist)")
    a = ap.parse_args()
    directory = (a.dir or Path(tempfile.mkdtemp(prefix="codistill-trainer-"))).resolve()
    observed = directory / "observed"
    observed.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    cp = ControlPlane(directory, trainer_v2=TrainerV2(), training_operator=a.with_training_operator)
    kubelet = ProcessKubelet(cp, directory / "kubelet", backoff=(1.0, 10.0))
    netns_before = sh("ip netns list")
    cp.start()
    try:
        t1 = time.monotonic()
        kubelet.start()
        print(f"control plane with JobSet and Trainer {t1 - t0:.1f}s, kubelet {time.monotonic() - t1:.1f}s")

        def get(kind: str, name: str, ns: str | None = NS) -> dict:
            r = cp.kubectl(*(["-n", ns] if ns else []), "get", kind, name, "-o", "json", check=False)
            return json.loads(r.stdout) if r.returncode == 0 else {}

        def items(kind: str, selector: str) -> list[dict]:
            out = cp.kubectl("-n", NS, "get", kind, "-l", selector, "-o", "json")
            return sorted(json.loads(out.stdout)["items"], key=lambda p: p["metadata"]["name"])

        def save(name: str, obj: object) -> None:
            (observed / f"{name}.json").write_text(json.dumps(obj, indent=1))

        cp.kubectl("create", "namespace", NS)
        cp.kubectl("label", "namespace", NS, "pod-security.kubernetes.io/enforce=restricted")
        cp.kubectl("create", "-f", "-", input=json.dumps(runtime()))
        client = client_kubeconfig(cp)

        def create_as_client(obj: dict, check: bool = True) -> subprocess.CompletedProcess:
            return cp.kubectl("create", "-f", "-", input=json.dumps(obj), kubeconfig=client, check=check)

        # 1. a TrainJob of two nodes
        t_job = time.monotonic()
        create_as_client(trainjob("demo", ["torchrun"], ["--no-python", "python", "-c", DDP]))
        js = wait_for("the JobSet", lambda: get("jobset", "demo"), timeout=30)
        print(f"JobSet demo {time.monotonic() - t_job:.1f}s after the TrainJob was created")
        pods = wait_for("both pods Running", lambda: (ps := items("pods", "jobset.sigs.k8s.io/jobset-name=demo"))
                        and len(ps) == 2 and all(p.get("status", {}).get("phase") == "Running" for p in ps) and ps,
                        timeout=60)
        print(f"both pods Running {time.monotonic() - t_job:.1f}s after the TrainJob was created")
        print("TrainJob status while running:", get("trainjob", "demo").get("status"))
        print("ClusterTrainingRuntime finalizers:", get("clustertrainingruntime", RUNTIME, None)["metadata"].get(
            "finalizers"))
        pods = wait_for("both pods Succeeded", lambda: (ps := items("pods", "jobset.sigs.k8s.io/jobset-name=demo"))
                        and len(ps) == 2 and all(p.get("status", {}).get("phase") == "Succeeded" for p in ps) and ps,
                        timeout=180)
        print(f"both pods Succeeded {time.monotonic() - t_job:.1f}s after the TrainJob was created")
        tj = wait_for("TrainJob Complete", lambda: (t := get("trainjob", "demo")) and any(
            c["type"] == "Complete" and c["status"] == "True" for c in t.get("status", {}).get("conditions", []))
            and t, timeout=60)
        print(f"TrainJob Complete {time.monotonic() - t_job:.1f}s after it was created")
        print("TrainJob status:", json.dumps(tj["status"], indent=1))
        save("trainjob", tj)
        save("jobset", get("jobset", "demo"))
        save("jobs", items("jobs", "jobset.sigs.k8s.io/jobset-name=demo"))
        save("pods", pods)
        save("services", json.loads(cp.kubectl("-n", NS, "get", "services", "-o", "json").stdout)["items"])
        assert [s["name"] for s in tj["status"].get("jobsStatus", [])] == ["node"], tj["status"]
        js = get("jobset", "demo")
        print("JobSet conditions:", {c["type"]: c["status"] for c in js.get("status", {}).get("conditions", [])},
              "replicatedJobsStatus:", js.get("status", {}).get("replicatedJobsStatus"))
        ips = {}
        for p in pods:
            meta, spec = p["metadata"], p["spec"]
            node = next(c for c in spec["containers"] if c["name"] == "node")
            ips[meta["name"]] = p["status"]["podIP"]
            print(f"--- pod {meta['name']}: hostname {spec.get('hostname')} subdomain {spec.get('subdomain')} "
                  f"ip {p['status']['podIP']} restartPolicy {spec.get('restartPolicy')}")
            print("labels:", meta.get("labels"))
            print("annotations:", meta.get("annotations"))
            print("node env:", node.get("env"), "ports:", node.get("ports"))
            print("node command:", node.get("command"), "args[:2]:", (node.get("args") or [])[:2])
            log = kubelet.logs(NS, meta["name"], "node")
            print(f"--- log of {meta['name']}:\n{log.strip()}")
            assert "world 2 all_reduce 3.0" in log, log
        assert len(set(ips.values())) == 2, ips

        # 2. the webhook's refusals at create time
        for what, obj in (("reserved env", trainjob("bad-env", ["python"], ["-c", "pass"],
                                                     [{"name": "PET_NNODES", "value": "3"}])),
                          ("missing runtime", trainjob("bad-runtime", ["python"], ["-c", "pass"],
                                                       runtime_name="no-such-runtime"))):
            r = create_as_client(obj, check=False)
            print(f"{what}: exit {r.returncode}: {r.stderr.strip()}")
            assert r.returncode and "denied the request" in r.stderr, r.stderr
        assert not get("trainjob", "bad-env") and not get("trainjob", "bad-runtime")

        # 3. deletion of a running TrainJob
        create_as_client(trainjob("sleeper", ["python"], ["-c", SLEEPER]))
        pods = wait_for("sleeper pods sleeping", lambda: (ps := items("pods", "jobset.sigs.k8s.io/jobset-name=sleeper"))
                        and len(ps) == 2 and all("sleeping" in kubelet.logs(NS, p["metadata"]["name"], "node")
                                                 for p in ps) and ps, timeout=60)
        t_del = time.monotonic()
        cp.kubectl("-n", NS, "delete", "trainjob", "sleeper", "--wait=true", kubeconfig=client)
        wait_for("JobSet, Jobs, pods gone", lambda: not get("jobset", "sleeper") and not items(
            "jobs", "jobset.sigs.k8s.io/jobset-name=sleeper") and not items(
            "pods", "jobset.sigs.k8s.io/jobset-name=sleeper"), timeout=60)
        print(f"JobSet, Jobs and pods gone {time.monotonic() - t_del:.1f}s after the TrainJob's deletion")
        for p in pods:
            assert "got SIGTERM" in kubelet.logs(NS, p["metadata"]["name"], "node")
        cp.kubectl("-n", NS, "delete", "trainjob", "demo", "--wait=true", kubeconfig=client)
        wait_for("demo's pods gone", lambda: not items("pods", "jobset.sigs.k8s.io/jobset-name=demo"), timeout=60)
        assert wait_for("no netns of pods", lambda: "cdst-" not in sh("ip netns list") or None, timeout=10)
        print("after the deletions: no JobSet, Job, pod or netns left")
    finally:
        procs, ports = list(cp.processes), set(cp.ports.values())
        t2 = time.monotonic()
        kubelet.stop()
        cp.stop()
        print(f"stopped in {time.monotonic() - t2:.1f}s; total {time.monotonic() - t0:.1f}s")
    assert_nothing_left(procs, ports, netns_before, directory)
    print("nothing left (processes, listening sockets, netns, links); OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
