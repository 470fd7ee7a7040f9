#!/usr/bin/env python3
"""Kueue admitting codistill's job kinds on the real control plane, without a kubelet (pods stay
Pending; about a minute once built):

    python -m cluster.kueue_smoke [--dir DIR]          (from the repository root)

Starts the Training Operator, JobSet, Trainer v2 and Kueue; in namespace `smoke` a ResourceFlavor,
a ClusterQueue with cpu/memory quota for the first three jobs and a LocalQueue `user-queue`, then:
  a. a PyTorchJob (Master + Worker) with the queue label, created with runPolicy.suspend false:
     Kueue's webhook suspends it, its Workload is admitted, Kueue unsuspends it, the Training
     Operator creates its pods;
  b. a TrainJob (a ClusterTrainingRuntime like trainer_smoke's) with the queue label, created with
     spec.suspend false: suspended by the webhook, Workload admitted, Kueue's runtimePatches entry
     written and suspend false, the JobSet created;
  c. a TrainJob like b whose runtimePatches has another manager's entry with a field only Trainer
     2.3 has (podSpecPatch terminationGracePeriodSeconds): Kueue is built with Trainer 2.2.1's Go
     types and Update()s the whole TrainJob on admission; whether the field survives is printed
     (observed, not asserted);
  d. a PyTorchJob that does not fit in what is left of the quota: stays suspended, its Workload
     pending with a QuotaReserved=False condition naming the quota.
Timings and the objects as observed go to DIR/observed/*.json. Exit status 1 if a step fails
(the Kueue log lines with errors are printed then).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from cluster import smoke
from cluster.controlplane import ControlPlane, Kueue, TrainerV2
from cluster.trainer_smoke import runtime as torch_runtime

NS = "smoke"
QUEUE = "user-queue"
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
FLAVOR = "default-flavor"
# Kueue copies a flavor's nodeLabels into the admitted pods' nodeSelector
FLAVOR_NODE_LABELS = {"codistill.io/pool": "smoke"}
CLUSTER_QUEUE = "cluster-queue"
QUOTA = {"cpu": "4", "memory": "4Gi"}  # a (2 cpu) + b (1) + c (0.5) fit, d (4) does not
RUNTIME = "kueue-smoke-torch"
IMAGE = "codistill/trainer:smoke"
KUEUE_MANAGER = "kueue.x-k8s.io/manager"
PYTORCH = ("kubeflow.org/v1", "pytorchjobs")
TRAINJOB = ("trainer.kubeflow.org/v1alpha1", "trainjobs")
JOBSET = ("jobset.x-k8s.io/v1alpha2", "jobsets")


def queue_objects() -> list[dict]:
    k = "kueue.x-k8s.io/v1beta2"
    return [
        {"apiVersion": k, "kind": "ResourceFlavor", "metadata": {"name": FLAVOR},
         "spec": {"nodeLabels": FLAVOR_NODE_LABELS}},
        {"apiVersion": k, "kind": "ClusterQueue", "metadata": {"name": CLUSTER_QUEUE},
         "spec": {"namespaceSelector": {}, "resourceGroups": [{
             "coveredResources": sorted(QUOTA),
             "flavors": [{"name": FLAVOR, "resources": [{"name": r, "nominalQuota": q} for r, q in QUOTA.items()]}]}]}},
        {"apiVersion": k, "kind": "LocalQueue", "metadata": {"name": QUEUE, "namespace": NS},
         "spec": {"clusterQueue": CLUSTER_QUEUE}},
    ]


def requests(cpu: str, memory: str) -> dict:
    return {"requests": {"cpu": cpu, "memory": memory}, "limits": {"cpu": cpu, "memory": memory}}


def pytorchjob(name: str, cpu: str, memory: str) -> dict:
    def replica() -> dict:
        return {"replicas": 1, "restartPolicy": "OnFailure", "template": {"spec": {"containers": [{
            "name": "pytorch", "image": IMAGE, "command": ["python", "-c", "pass"],
            "resources": requests(cpu, memory)}]}}}
    return {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob",
            "metadata": {"name": name, "namespace": NS, "labels": {QUEUE_LABEL: QUEUE}},
            "spec": {"runPolicy": {"suspend": False},
                     "pytorchReplicaSpecs": {"Master": replica(), "Worker": replica()}}}


def trainjob(name: str, cpu: str, memory: str, runtime_patches: list[dict] = ()) -> dict:
    return {"apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "TrainJob",
            "metadata": {"name": name, "namespace": NS, "labels": {QUEUE_LABEL: QUEUE}},
            "spec": {"suspend": False,
                     "runtimeRef": {"apiGroup": "trainer.kubeflow.org", "kind": "ClusterTrainingRuntime",
                                    "name": RUNTIME},
                     "trainer": {"numNodes": 1, "command": ["python", "-c", "pass"],
                                 "resourcesPerNode": requests(cpu, memory)},
                     **({"runtimePatches": list(runtime_patches)} if runtime_patches else {})}}


def pytorch_suspended(job: dict) -> bool | None:
    return job.get("spec", {}).get("runPolicy", {}).get("suspend")


def trainjob_suspended(job: dict) -> bool | None:
    return job.get("spec", {}).get("suspend")


def api_path(group_version: str, plural: str, ns: str | None) -> str:
    prefix = "/api/" if group_version == "v1" else "/apis/"
    return prefix + group_version + (f"/namespaces/{ns}" if ns else "") + f"/{plural}"


def conditions(obj: dict) -> dict[str, dict]:
    return {c["type"]: c for c in obj.get("status", {}).get("conditions") or []}


class Run:
    """The control plane of one smoke run, its observations and its timings."""

    def __init__(self, cp: ControlPlane, observed: Path):
        self.cp, self.observed, self.timings = cp, observed, {}

    def get(self, api: tuple[str, str], name: str | None = None, ns: str | None = NS) -> dict:
        status, body = self.cp.request("GET", api_path(api[0], api[1], ns) + (f"/{name}" if name else ""))
        return body if status == 200 else {}

    def create(self, obj: dict) -> dict:
        """Create through the API (the response is the object as admitted: after the mutating
        webhooks)."""
        path = api_path(obj["apiVersion"], obj["kind"].lower() + "s", obj["metadata"].get("namespace"))
        status, body = self.cp.request("POST", path, obj)
        assert status == 201, f"create {obj['kind']} {obj['metadata']['name']}: {status} {body}"
        return body

    def save(self, name: str, obj: object) -> None:
        (self.observed / f"{name}.json").write_text(json.dumps(obj, indent=1))

    def workload_of(self, uid: str) -> dict:
        items = self.get(("kueue.x-k8s.io/v1beta2", "workloads")).get("items", [])
        return next((w for w in items if any(o["uid"] == uid for o in w["metadata"].get("ownerReferences", []))), {})

    def events(self, name: str) -> list[str]:
        items = self.get(("v1", "events")).get("items", [])
        return [f"{e.get('source', {}).get('component') or e.get('reportingComponent')}: {e['reason']}: {e['message']}"
                for e in sorted(items, key=lambda e: e.get("firstTimestamp") or e["metadata"]["creationTimestamp"])
                if e["involvedObject"]["name"] == name]

    def mark(self, key: str, since: float) -> None:
        self.timings[key] = round(time.monotonic() - since, 2)
        print(f"  {key}: {self.timings[key]} s")

    def admit(self, obj: dict, api: tuple[str, str], suspended: Callable[[dict], bool | None],
              started: Callable[[], object], label: str) -> tuple[dict, dict]:
        """Create obj, check the webhook suspended it, wait for its Workload's admission, for
        Kueue to unsuspend it and for `started()` (its pods / JobSet). Returns (job, workload)."""
        name = obj["metadata"]["name"]
        print(f"{label}: {obj['kind']} {name}")
        t0 = time.monotonic()
        created = self.create(obj)
        self.save(f"{name}-as-created", created)
        print(f"  as created: suspend {suspended(created)}, labels {created['metadata'].get('labels')}")
        assert suspended(created) is True, "Kueue's webhook did not suspend the job"
        uid = created["metadata"]["uid"]
        wl = smoke.wait_for("its Workload", lambda: self.workload_of(uid), timeout=30, every=0.1)
        self.mark(f"{name}: Workload {wl['metadata']['name']} created", t0)
        wl = smoke.wait_for("Workload Admitted", lambda: (w := self.workload_of(uid)) and conditions(w).get(
            "Admitted", {}).get("status") == "True" and w, timeout=30, every=0.1)
        self.mark(f"{name}: Workload Admitted", t0)
        job = smoke.wait_for("job unsuspended", lambda: (j := self.get(api, name)) and suspended(j) is False and j,
                             timeout=30, every=0.1)
        self.mark(f"{name}: suspend false", t0)
        smoke.wait_for("started", started, timeout=60, every=0.2)
        self.mark(f"{name}: started", t0)
        return job, wl

    def pods(self, selector: str) -> list[dict]:
        status, body = self.cp.request("GET", f"/api/v1/namespaces/{NS}/pods?labelSelector={selector}")
        return body.get("items", []) if status == 200 else []


def brief_workload(wl: dict) -> dict:
    return {"name": wl["metadata"]["name"], "labels": wl["metadata"].get("labels"),
            "queueName": wl["spec"].get("queueName"),
            "podSets": [{"name": p["name"], "count": p["count"]} for p in wl["spec"]["podSets"]],
            "admission": wl.get("status", {}).get("admission"),
            "conditions": [{k: c.get(k) for k in ("type", "status", "reason", "message")}
                           for c in wl.get("status", {}).get("conditions") or []]}


def pod_template_changes(template: dict) -> dict:
    """What Kueue may inject into a pod template on admission (labels, annotations, nodeSelector,
    tolerations, scheduling gates)."""
    meta, spec = template.get("metadata") or {}, template.get("spec") or {}
    return {**{k: meta[k] for k in ("labels", "annotations") if meta.get(k)},
            **{k: spec[k] for k in ("nodeSelector", "tolerations", "schedulingGates") if spec.get(k)}}


def writers(obj: dict) -> list[str]:
    """Who wrote the object (managedFields: manager, operation, subresource)."""
    return [f"{m['manager']} {m['operation']}{' ' + m['subresource'] if m.get('subresource') else ''}"
            for m in obj["metadata"].get("managedFields") or []]


def check_pytorchjob(run: Run) -> None:
    def pods():
        return len(run.pods("training.kubeflow.org/job-name=demo-pytorch")) == 2
    job, wl = run.admit(pytorchjob("demo-pytorch", "1", "1Gi"), PYTORCH, pytorch_suspended, pods, "a")
    ps = run.pods("training.kubeflow.org/job-name=demo-pytorch")
    run.save("demo-pytorch", job)
    run.save("demo-pytorch-workload", wl)
    run.save("demo-pytorch-pods", ps)
    print("  job labels:", job["metadata"].get("labels"), "annotations:", job["metadata"].get("annotations"))
    for role, spec in job["spec"]["pytorchReplicaSpecs"].items():
        print(f"  {role} template after admission:", pod_template_changes(spec["template"]) or "unchanged")
    assert all(spec["template"]["spec"].get("nodeSelector") == FLAVOR_NODE_LABELS
               for spec in job["spec"]["pytorchReplicaSpecs"].values()), "no nodeSelector of the flavor"
    print("  Workload:", json.dumps(brief_workload(wl)))
    for p in ps:
        print(f"  pod {p['metadata']['name']}: {p['status'].get('phase')}, {pod_template_changes(p)}")
    print("  job written by:", writers(job))
    print("  events:", *run.events("demo-pytorch"), sep="\n    ")


def jobset_running(run: Run, name: str) -> bool:
    """Trainer created the JobSet suspended; running: unsuspended, and its Job made its pods."""
    js = run.get(JOBSET, name)
    return js and js["spec"].get("suspend") is False and bool(run.pods(f"jobset.sigs.k8s.io/jobset-name={name}"))


def check_trainjob(run: Run) -> None:
    job, wl = run.admit(trainjob("demo-trainjob", "1", "1Gi"), TRAINJOB, trainjob_suspended,
                        lambda: jobset_running(run, "demo-trainjob"), "b")
    js = run.get(JOBSET, "demo-trainjob")
    ps = run.pods("jobset.sigs.k8s.io/jobset-name=demo-trainjob")
    run.save("demo-trainjob", job)
    run.save("demo-trainjob-workload", wl)
    run.save("demo-trainjob-jobset", js)
    patches = job["spec"].get("runtimePatches") or []
    print("  job labels:", job["metadata"].get("labels"), "annotations:", job["metadata"].get("annotations"))
    print("  runtimePatches:", json.dumps(patches))
    assert any(p.get("manager") == KUEUE_MANAGER for p in patches), "no runtimePatches entry of Kueue"
    print("  Workload:", json.dumps(brief_workload(wl)))
    print("  JobSet suspend:", js["spec"].get("suspend"), "node template:",
          pod_template_changes(js["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]) or "unchanged")
    for p in ps:
        print(f"  pod {p['metadata']['name']}: {p['status'].get('phase')}, {pod_template_changes(p)}")
    print("  job written by:", writers(job))
    assert ps and all(p["spec"].get("nodeSelector") == FLAVOR_NODE_LABELS for p in ps), ps
    print("  events:", *run.events("demo-trainjob"), sep="\n    ")


def check_trainjob_v23_field(run: Run) -> None:
    other = {"manager": "codistill.io/smoke", "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": [{
        "name": "node", "template": {"spec": {"template": {"spec": {"terminationGracePeriodSeconds": 7}}}}}]}}}}

    def grace(job: dict) -> object:
        entry = next((p for p in job["spec"].get("runtimePatches") or [] if p["manager"] == other["manager"]), {})
        jobs = entry.get("trainingRuntimeSpec", {}).get("template", {}).get("spec", {}).get("replicatedJobs") or [{}]
        return jobs[0].get("template", {}).get("spec", {}).get("template", {}).get("spec", {}).get(
            "terminationGracePeriodSeconds")

    obj = trainjob("v23-field", "500m", "512Mi", [other])
    job, _ = run.admit(obj, TRAINJOB, trainjob_suspended, lambda: True, "c")
    created = json.loads((run.observed / "v23-field-as-created.json").read_text())
    t0 = time.monotonic()
    with contextlib.suppress(AssertionError):  # observed, not asserted: see the docstring
        smoke.wait_for("JobSet resumed", lambda: jobset_running(run, "v23-field"), timeout=10)
    js = run.get(JOBSET, "v23-field")
    pod = js["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
    run.save("v23-field", job := run.get(TRAINJOB, "v23-field"))
    run.save("v23-field-jobset", js)
    print(f"  terminationGracePeriodSeconds in codistill.io/smoke's runtimePatches entry: as created "
          f"{grace(created)}, after admission {grace(job)}; in the JobSet's pod template "
          f"{pod.get('terminationGracePeriodSeconds')}")
    print("  runtimePatches managers after admission:", [p["manager"] for p in job["spec"].get("runtimePatches") or []])
    print("  job written by:", writers(job))
    print(f"  JobSet suspend {js['spec'].get('suspend')} {time.monotonic() - t0:.0f} s after the TrainJob's; "
          f"pods: {len(run.pods('jobset.sigs.k8s.io/jobset-name=v23-field'))}")
    errors = [e for e in log_errors(run.cp, "trainer") if "v23-field" in e]
    if errors:
        print(f"  Trainer: {len(errors)} reconcile errors, the last: {errors[-1][:150]} ... {errors[-1][-40:]}")


def check_too_big(run: Run) -> None:
    print("d: PyTorchJob too-big (4 cpu; 0.5 of the quota is left)")
    created = run.create(pytorchjob("too-big", "2", "1Gi"))
    uid = created["metadata"]["uid"]
    wl = smoke.wait_for("a QuotaReserved=False condition", lambda: (w := run.workload_of(uid)) and conditions(w).get(
        "QuotaReserved", {}).get("status") == "False" and w, timeout=30, every=0.1)
    time.sleep(3)  # and it stays so
    wl, job = run.workload_of(uid), run.get(PYTORCH, "too-big")
    assert pytorch_suspended(job) is True and "Admitted" not in {
        t for t, c in conditions(wl).items() if c["status"] == "True"}, (job, wl)
    assert not run.pods("training.kubeflow.org/job-name=too-big")
    run.save("too-big", job)
    run.save("too-big-workload", wl)
    print("  suspend:", pytorch_suspended(job), "Workload:", json.dumps(brief_workload(wl)))
    print("  events:", *run.events("too-big"), sep="\n    ")


def log_errors(cp: ControlPlane, name: str) -> list[str]:
    """The error messages in a controller's JSON log."""
    out = []
    for line in (cp.dir / "logs" / f"{name}.log").read_text(errors="replace").splitlines():
        if '"level":"error"' in line:
            with contextlib.suppress(ValueError):
                e = json.loads(line)
                out.append(f"{e.get('msg')}: {e.get('error', '')}")
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", type=Path)
    a = ap.parse_args()
    directory = (a.dir or Path(tempfile.mkdtemp(prefix="codistill-kueue-"))).resolve()
    observed = directory / "observed"
    observed.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    cp = ControlPlane(directory, training_operator=True, trainer_v2=TrainerV2(), kueue=Kueue())
    cp.start()
    run = Run(cp, observed)
    failed = []
    try:
        run.mark("control plane with Training Operator, JobSet, Trainer v2 and Kueue", t0)
        cp.kubectl("create", "namespace", NS)
        for obj in [*queue_objects(), torch_runtime(RUNTIME)]:
            run.create(obj)
        cq = ("kueue.x-k8s.io/v1beta2", "clusterqueues")
        smoke.wait_for("ClusterQueue Active", lambda: conditions(run.get(cq, CLUSTER_QUEUE, None)).get(
            "Active", {}).get("status") == "True")
        for check in (check_pytorchjob, check_trainjob, check_trainjob_v23_field, check_too_big):
            try:
                check(run)
            except AssertionError as e:
                failed.append(check.__name__)
                print(f"  FAILED: {e}")
        run.save("clusterqueue", run.get(cq, CLUSTER_QUEUE, None))
        run.save("timings", run.timings)
        if failed:
            print("Kueue's logged errors:", *log_errors(cp, "kueue")[-20:], sep="\n  ")
    finally:
        procs, ports = list(cp.processes), set(cp.ports.values())
        t1 = time.monotonic()
        cp.stop()
        print(f"stopped in {time.monotonic() - t1:.1f}s; total {time.monotonic() - t0:.1f}s; observed in {observed}")
    left = [p.name for p in procs if p.alive()]
    listening = ports & smoke.listening_ports()
    pg = subprocess.run(["pgrep", "-af", f"{directory}/"], capture_output=True, text=True).stdout.strip()
    assert not left and not listening and not pg, (left, listening, pg)
    print("nothing left (processes, listening sockets)" + (f"; FAILED: {failed}" if failed else "; OK"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
