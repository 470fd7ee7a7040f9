#!/usr/bin/env python3
"""End-to-end check of the process kubelet (cluster/kubelet.py) with the real control plane and
the real Training Operator (about a minute once built):

    .venv/bin/python -m cluster.kubelet_smoke [--dir DIR]   (from the repository root)

In a namespace enforcing the `restricted` Pod Security Standard:
  1. a PyTorchJob (1 Master + 1 Worker, the trainer image's mapping, runAsNonRoot, uid/gid 10001,
     seccomp RuntimeDefault, no privilege escalation, all capabilities dropped) whose `pytorch`
     container joins a gloo process group through MASTER_ADDR: both pods Running, then
     Succeeded; the job's Succeeded condition (set by the operator); distinct pod IPs; the
     worker's init container resolving the master through its /etc/hosts; `kubectl logs`;
  2. a pod exercising the env contract (secretKeyRef, configMapKeyRef, fieldRef, resourceFieldRef
     with divisor, envFrom), an emptyDir with medium Memory, and restartPolicy OnFailure: it
     fails once (exit 3), is restarted, then succeeds;
  3. a pod whose image maps to root under runAsNonRoot (admitted by Pod Security, refused by the
     kubelet) and one with an unmapped image;
  4. a long-running PyTorchJob deleted: the garbage collector deletes its pods, the kubelet
     SIGTERMs the processes, deletes the pod objects and removes their netns;
and at the end nothing is left: no process, no listening port, no netns, no veth, no bridge.
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from cluster import smoke
from cluster.controlplane import RESTRICTED_PYTORCH_INIT_CONTAINER, ControlPlane, TrainingOperator
from cluster.kubelet import ProcessKubelet
from cluster.smoke import listening_ports

NS = "smoke"
TRAINER = "codistill/trainer:0.1.0"
POD_SECURE = {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001,
              "seccompProfile": {"type": "RuntimeDefault"}}
SECURE = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
# proves the env contract, DNS through /etc/hosts, the identity and the privileges
DDP = """
import os, socket, torch.distributed as d
status = dict(l.split(':\\t') for l in open('/proc/self/status').read().splitlines() if ':\\t' in l)
print('uid', os.getuid(), 'gid', os.getgid(), 'NoNewPrivs', status['NoNewPrivs'], 'CapEff', status['CapEff'])
print('hostname', socket.gethostname(), 'ip', socket.gethostbyname(socket.gethostname()),
      'MASTER_ADDR', os.environ['MASTER_ADDR'], '->', socket.gethostbyname(os.environ['MASTER_ADDR']))
d.init_process_group('gloo')
print('RANK', os.environ['RANK'], 'world', d.get_world_size(), flush=True)
d.barrier()
d.destroy_process_group()
"""
# the ServiceAccount token, through the `kubernetes` Service (10.96.0.1:443 -> the apiserver)
WHOAMI = """
import json, os, ssl, urllib.request
sa = '/var/run/secrets/kubernetes.io/serviceaccount'
st = os.stat(sa + '/token')
ctx = ssl.create_default_context(cafile=sa + '/ca.crt')
url = 'https://%s:%s/apis/authentication.k8s.io/v1/selfsubjectreviews' % (
    os.environ['KUBERNETES_SERVICE_HOST'], os.environ['KUBERNETES_SERVICE_PORT'])
req = urllib.request.Request(url, method='POST', data=json.dumps({'apiVersion': 'authentication.k8s.io/v1',
    'kind': 'SelfSubjectReview'}).encode(), headers={'Content-Type': 'application/json',
    'Authorization': 'Bearer ' + open(sa + '/token').read()})
user = json.load(urllib.request.urlopen(req, context=ctx))['status']['userInfo']['username']
print('token mode %o uid %d; apiserver says: %s' % (st.st_mode & 0o777, st.st_uid, user))
req = urllib.request.Request(url.replace(os.environ['KUBERNETES_SERVICE_HOST'], 'kubernetes.default.svc'),
                             method='GET')
try:
    urllib.request.urlopen(req, context=ctx)
except urllib.error.HTTPError as e:
    print('kubernetes.default.svc: TLS ok, HTTP', e.code)
print('host service via the bridge:', urllib.request.urlopen('http://%s/' % os.environ['HOST_SVC']).read().decode())
"""
SLEEPER = """
import signal, sys, time
signal.signal(signal.SIGTERM, lambda *a: (print('got SIGTERM', flush=True), sys.exit(0)))
print('sleeping', flush=True)
time.sleep(600)
"""


class Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"hello")

    def log_message(self, *a) -> None:
        pass


def pytorchjob(name: str, code: str) -> dict:
    def replica() -> dict:
        return {"replicas": 1, "restartPolicy": "OnFailure", "template": {"spec": {
            "securityContext": POD_SECURE,
            "containers": [{"name": "pytorch", "image": TRAINER, "securityContext": SECURE,
                            "command": ["python", "-c", code]}]}}}
    return {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob", "metadata": {"name": name, "namespace": NS},
            "spec": {"pytorchReplicaSpecs": {"Master": replica(), "Worker": replica()}}}


def pod(name: str, containers: list[dict], **spec) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": NS, "labels": {"app": name}},
            "spec": {"securityContext": POD_SECURE, "containers": containers, **spec}}


def wait_for(what: str, check, timeout: float = 60, every: float = 0.1):
    return smoke.wait_for(what, check, timeout, every)


def sh(cmd: str) -> str:
    return subprocess.run(cmd, shell=True, capture_output=True, text=True).stdout.strip()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", type=Path)
    a = ap.parse_args()
    directory = a.dir or Path(tempfile.mkdtemp(prefix="codistill-kubelet-"))
    t0 = time.monotonic()
    cp = ControlPlane(directory, training_operator=TrainingOperator(
        pytorch_init_container_template=RESTRICTED_PYTORCH_INIT_CONTAINER))
    kubelet = ProcessKubelet(cp, directory / "kubelet", backoff=(1.0, 10.0), verbose=True)
    netns_before = sh("ip netns list")
    cp.start()
    try:
        t1 = time.monotonic()
        kubelet.start()
        print(f"control plane {t1 - t0:.1f}s, kubelet {time.monotonic() - t1:.1f}s")
        print(cp.kubectl("get", "nodes", "-o", "wide").stdout.strip())

        def get(kind: str, name: str) -> dict:
            r = cp.kubectl("-n", NS, "get", kind, name, "-o", "json", check=False)
            return json.loads(r.stdout) if r.returncode == 0 else {}

        def job_pods(job: str) -> list[dict]:
            out = cp.kubectl("-n", NS, "get", "pods", "-l", f"training.kubeflow.org/job-name={job}", "-o", "json")
            return sorted(json.loads(out.stdout)["items"], key=lambda p: p["metadata"]["name"])

        def create(obj: dict) -> None:
            cp.kubectl("create", "-f", "-", input=json.dumps(obj))

        cp.kubectl("create", "namespace", NS)
        cp.kubectl("label", "namespace", NS, "pod-security.kubernetes.io/enforce=restricted")

        # 1. the PyTorchJob
        t_job = time.monotonic()
        create(pytorchjob("demo", DDP))
        pods = wait_for("both pods Running", lambda: (ps := job_pods("demo")) and len(ps) == 2 and all(
            p.get("status", {}).get("phase") == "Running" for p in ps) and ps, timeout=60)
        print(f"both pods Running {time.monotonic() - t_job:.1f}s after the job was created")
        pods = wait_for("both pods Succeeded", lambda: (ps := job_pods("demo")) and all(
            p.get("status", {}).get("phase") == "Succeeded" for p in ps) and ps, timeout=120)
        print(f"both pods Succeeded {time.monotonic() - t_job:.1f}s after the job was created")
        conds = wait_for("job Succeeded", lambda: (c := {x["type"]: x["status"] for x in
                         get("pytorchjob", "demo").get("status", {}).get("conditions", [])}).get("Succeeded") == "True" and c)
        print("job conditions:", conds)
        ips = {p["metadata"]["name"]: p["status"]["podIP"] for p in pods}
        assert len(set(ips.values())) == 2, ips
        print("pod IPs:", ips)
        for p in pods:
            name = p["metadata"]["name"]
            print(f"--- kubectl logs {name}:\n" + cp.kubectl("-n", NS, "logs", name).stdout.strip())
        worker = "demo-worker-0"
        init_log = cp.kubectl("-n", NS, "logs", worker, "-c", "init-pytorch").stdout
        print(f"--- kubectl logs {worker} -c init-pytorch:\n{init_log.strip()}")
        assert ips["demo-master-0"] in init_log, init_log
        for p in pods:
            log = kubelet.logs(NS, p["metadata"]["name"], "pytorch")
            assert "world 2" in log and "NoNewPrivs 1" in log and "CapEff 0000000000000000" in log, log
            assert "uid 10001 gid 10001" in log and f"-> {ips['demo-master-0']}" in log, log
        st = get("pod", worker)["status"]
        print("worker conditions:", {c["type"]: c["status"] for c in st["conditions"]},
              "init:", st["initContainerStatuses"][0]["state"], "main:", st["containerStatuses"][0]["state"])

        # 2. the env contract, an emptyDir in memory, OnFailure with a restart; a server of the
        # host that listens on 127.0.0.1 only (as moto would), exposed on the bridge
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hello)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        host_svc = kubelet.expose(server.server_address[1])
        cp.kubectl("-n", NS, "create", "secret", "generic", "creds", "--from-literal=key=s3cr3t")
        cp.kubectl("-n", NS, "create", "configmap", "conf", "--from-literal=mode=fast", "--from-literal=level=3")
        env = [{"name": "SECRET", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "key"}}},
               {"name": "MODE", "valueFrom": {"configMapKeyRef": {"name": "conf", "key": "mode"}}},
               {"name": "APP", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
               {"name": "POD_UID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.uid"}}},
               {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
               {"name": "SA", "valueFrom": {"fieldRef": {"fieldPath": "spec.serviceAccountName"}}},
               {"name": "CPU_M", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu", "divisor": "1m"}}},
               {"name": "MEM_MI", "valueFrom": {"resourceFieldRef": {"resource": "limits.memory", "divisor": "1Mi"}}},
               {"name": "REQ_CPU", "valueFrom": {"resourceFieldRef": {"resource": "requests.cpu", "divisor": "1m"}}},
               {"name": "WHOAMI", "value": WHOAMI}, {"name": "HOST_SVC", "value": host_svc}]
        script = ("echo SECRET=$SECRET MODE=$MODE APP=$APP NODE=$NODE SA=$SA CPU_M=$CPU_M MEM_MI=$MEM_MI "
                  "REQ_CPU=$REQ_CPU CFG_level=$CFG_level POD_UID=$POD_UID; "
                  "grep ' /scratch ' /proc/mounts; "
                  "python -c \"$WHOAMI\"; "
                  "if [ ! -e /scratch/ran ]; then touch /scratch/ran; echo first run fails; exit 3; fi; echo second run")
        create(pod("features", [{"name": "main", "image": TRAINER, "securityContext": SECURE,
                                 "command": ["sh", "-c", script], "env": env,
                                 "envFrom": [{"prefix": "CFG_", "configMapRef": {"name": "conf"}}],
                                 "resources": {"limits": {"memory": "256Mi"}, "requests": {"cpu": "250m"}},
                                 "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}]}],
                   restartPolicy="OnFailure", volumes=[{"name": "scratch", "emptyDir": {"medium": "Memory"}}]))
        st = wait_for("features Succeeded", lambda: (s := get("pod", "features").get("status", {})).get("phase")
                      == "Succeeded" and s, timeout=60)
        cs = st["containerStatuses"][0]
        print("features:", "restartCount", cs["restartCount"], "lastState", cs["lastState"]["terminated"]["exitCode"],
              "state", cs["state"]["terminated"]["reason"])
        assert cs["restartCount"] == 1 and cs["lastState"]["terminated"]["exitCode"] == 3, cs
        first, second = kubelet.logs(NS, "features", "main", 0), kubelet.logs(NS, "features", "main", 1)
        print("--- features, run 0:\n" + first.strip() + "\n--- run 1:\n" + second.strip())
        assert "SECRET=s3cr3t MODE=fast APP=features NODE=codistill-node SA=default" in first, first
        assert "MEM_MI=256 REQ_CPU=250 CFG_level=3" in first and "tmpfs" in first and "second run" in second
        assert "token mode 600 uid 10001; apiserver says: system:serviceaccount:smoke:default" in first, first
        assert "kubernetes.default.svc: TLS ok" in first and "via the bridge: hello" in first, first
        server.shutdown()
        server.server_close()

        # 3. refusals
        alpine = {"name": "main", "image": "alpine:3.10", "securityContext": SECURE, "command": ["sh", "-c", "id"]}
        create(pod("as-root", [alpine], securityContext={k: v for k, v in POD_SECURE.items()
                                                          if k not in ("runAsUser", "runAsGroup")}))
        create(pod("unmapped", [{**alpine, "image": "nginx:1.27"}]))
        for name, reason in (("as-root", "CreateContainerConfigError"), ("unmapped", "ErrImagePull")):
            w = wait_for(f"{name} waiting", lambda: (get("pod", name).get("status", {}).get("containerStatuses")
                                                    or [{}])[0].get("state", {}).get("waiting", {}).get("reason")
                         == reason and get("pod", name)["status"]["containerStatuses"][0]["state"]["waiting"])
            print(f"{name}: phase {get('pod', name)['status']['phase']}, waiting {w}")
        assert "container has runAsNonRoot and image will run as root" in get("pod", "as-root")["status"][
            "containerStatuses"][0]["state"]["waiting"]["message"]
        for name in ("as-root", "unmapped", "features"):
            cp.kubectl("-n", NS, "delete", "pod", name, "--wait=true")

        # 4. deletion of a running job
        create(pytorchjob("sleeper", SLEEPER))
        pods = wait_for("sleeper pods Running", lambda: (ps := job_pods("sleeper")) and len(ps) == 2 and all(
            "sleeping" in kubelet.logs(NS, p["metadata"]["name"], "pytorch") for p in ps) and ps, timeout=60)
        netns = sh("ip netns list")
        print("netns while running:", " ".join(line.split()[0] for line in netns.splitlines()))
        t_del = time.monotonic()
        cp.kubectl("-n", NS, "delete", "pytorchjob", "sleeper", "--wait=true")
        wait_for("garbage collection", lambda: not job_pods("sleeper"), timeout=60)
        print(f"pods gone {time.monotonic() - t_del:.1f}s after the job's deletion")
        for p in pods:
            log = kubelet.logs(NS, p["metadata"]["name"], "pytorch")
            assert "got SIGTERM" in log, log
        print("both processes logged: got SIGTERM")
        cp.kubectl("-n", NS, "delete", "pytorchjob", "demo", "--wait=true")
        wait_for("demo's pods gone", lambda: not job_pods("demo"), timeout=60)
        assert wait_for("no netns of pods", lambda: "cdst-" not in sh("ip netns list") or None, timeout=10)
        print("after the deletions: no pod netns left")
    finally:
        procs, ports = list(cp.processes), set(cp.ports.values())
        t2 = time.monotonic()
        kubelet.stop()
        cp.stop()
        print(f"stopped in {time.monotonic() - t2:.1f}s; total {time.monotonic() - t0:.1f}s")
    assert_nothing_left(procs, ports, netns_before, directory)
    print("nothing left; OK")
    return 0


def assert_nothing_left(procs: list, ports: set[int], netns_before: str, directory: Path) -> None:
    """After stop(): no process, listening socket, netns, link or mount of the run is left."""
    left = [p.name for p in procs if p.alive()]
    assert not left, f"still running: {left}"
    ss = sh("ss -ltnp")
    ours = [line for line in ss.splitlines()[1:] if any(f":{p} " in line for p in ports)
            or "10.244.0.1" in line or "10.96.0.1" in line or f"pid={os.getpid()}," in line]
    print(f"ss -ltnp: {len(ss.splitlines()) - 1} listening sockets, none of this run's: {ours}")
    assert not ports & listening_ports() and not ours, ss
    assert sh("ip netns list") == netns_before
    links = sh("ip -br link")
    assert "cdst0" not in links and "cdv" not in links, links
    # not through a shell, and `DIR/`: a command line with `--dir DIR` (this one's) would match
    pg = subprocess.run(["pgrep", "-af", f"{directory}/|cdst-"], capture_output=True,
                        text=True).stdout.strip()
    assert not pg, pg
    assert not Path("/run/secrets/kubernetes.io").exists() and not Path("/etc/netns").exists()


if __name__ == "__main__":
    sys.exit(main())
