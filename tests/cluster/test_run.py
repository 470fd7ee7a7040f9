"""`make e2e`: a Codistillation from `kubectl apply` to Succeeded on a real control plane.

Real parts throughout: kube-apiserver (RBAC, PodSecurity `restricted` on the run's namespace),
kube-controller-manager (garbage collector, Deployments, Indexed Jobs), both Kubeflow backends
with their webhooks (the Training Operator v1.9.4 for PyTorchJobs; Kubeflow Trainer v2.3.0 and
JobSet v0.12.0 for TrainJobs), the chart installed by the real `helm` (with its
ClusterTrainingRuntime), the operator in a pod as the chart's ServiceAccount (its RBAC and
nothing more), moto's S3 server, and the trainers as real processes. The process kubelet
(cluster/kubelet.py) runs the pods: its own network namespace and IP each, the Services the
controllers create and JobSet's pod hostnames resolved through /etc/hosts.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import pytest
import yaml

from codistill.storage import Bucket
from tests.cluster.stack import (
    BUCKET,
    JOB_KINDS,
    KEYS,
    NAMESPACE,
    Stack,
    manifest,
    processes,
)
from tests.support.kube import wait_for
from tests.support.localrun import workers_of

pytestmark = pytest.mark.slow


BACKENDS = ["pytorchjob", "auto"]  # auto: TrainJobs, Kubeflow Trainer v2 being installed


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_run_trains_to_succeeded_through_the_real_controllers(stack: Stack,
                                                                backend: str) -> None:
    kind, name = JOB_KINDS[backend], f"e2e-{backend[:2]}"
    stack.apply(name, backend=backend)
    wait_for(lambda: len(stack.jobs(name, kind)) == 2, f"two {kind}", timeout=60)
    pods = wait_for(lambda: (p := stack.jobs(name, "pods")) and len(p) == 4
                    and all(x["status"].get("podIP") for x in p) and p, "four pods with IPs",
                    timeout=120)
    assert len({p["status"]["podIP"] for p in pods}) == 4  # a network namespace each
    # the operator killed mid-run: its pod restarts it, and it converges on the same jobs
    wait_for(lambda: (stack.status(name).get("step") or 0) > 0, "training started", timeout=180)
    for pid in processes("codistill_operator"):
        os.kill(pid, signal.SIGKILL)
    # (after test_operator_kills' three kills, the kubelet's back-off is up to 40 s)
    wait_for(lambda: processes("codistill_operator"), "the operator back", timeout=180)
    status = stack.wait_phase(name, "Succeeded")
    assert sorted(j["metadata"]["name"] for j in stack.jobs(name, kind)) == [
        f"{name}-g0", f"{name}-g1"]
    assert stack.run(name)["status"]["applied"]["backend"] == kind[:-1]
    assert [g["step"] for g in status["groups"]] == [300, 300]
    assert all(g["teachers"] and g["loss"] > 0 for g in status["groups"]), status["groups"]
    store = stack.folder(name)
    for g in (0, 1):
        assert store.get_json(f"groups/{g}/teacher/LATEST.json")["step"] == 300
    assert store.get_json("report/report.json")["churn"]["pairs"]
    conditions = {c["type"]: c["status"] for c in status["conditions"]}
    assert conditions["Succeeded"] == "True" and conditions["Ready"] == "True"
    stack.kubectl("delete", "codistillation", name, "-n", NAMESPACE)
    wait_for(lambda: not stack.jobs(name, kind), "jobs collected by the garbage collector")
    wait_for(lambda: not stack.jobs(name, "pods"), "pods gone", timeout=120)
    wait_for(lambda: not store.exists("run.json"), "run folder deleted (onDelete: Delete)")


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_killed_master_restarts_and_its_group_resumes(stack: Stack, backend: str) -> None:
    name = f"kill-{backend[:2]}"
    stack.apply(name, steps=400, backend=backend)
    store = stack.folder(name)
    state = "groups/0/state/LATEST.json"
    wait_for(lambda: store.exists(state) and store.get_json(state)["step"] >= 100,
             "group 0 saved state at step 100", timeout=240)
    saved = store.get_json(state)["step"]
    other_before = store.get_json("groups/1/progress.json")["step"]
    url = f"s3://{BUCKET}/{NAMESPACE}/{name}"
    (master,) = [pid for pid, env in workers_of(url).items()
                 if env.get("CODISTILL_GROUP") == "0" and env.get("RANK") == "0"]
    os.kill(master, signal.SIGKILL)
    wait_for(lambda: (store.get_json("groups/0/progress.json") or {}).get("resumedFrom"),
             "group 0 resumed", timeout=180)
    assert store.get_json("groups/0/progress.json")["resumedFrom"] >= saved > 0
    status = stack.wait_phase(name, "Succeeded")
    groups = {g["group"]: g for g in status["groups"]}
    assert groups[0]["restarts"] >= 1 and groups[1]["restarts"] == 0
    assert store.get_json("groups/1/progress.json")["step"] > other_before


def test_finished_jobs_removed_by_ttl_stay_removed_and_a_recreated_run_starts_fresh(
        stack: Stack) -> None:
    def retained(steps: int, **spec: Any) -> str:
        doc = manifest(stack, "again", steps=steps, **spec)
        doc["spec"]["storage"]["onDelete"] = "Retain"
        return yaml.safe_dump(doc)

    stack.kubectl("apply", "-f", "-", input=retained(40, runPolicy={"ttlSecondsAfterFinished": 1}))
    stack.wait_phase("again", "Succeeded")
    wait_for(lambda: not stack.jobs("again"), "the Training Operator removed the jobs")
    time.sleep(5)  # five status intervals
    assert not stack.jobs("again") and stack.status("again")["phase"] == "Succeeded"
    first = stack.run("again")["metadata"]["uid"]
    stack.kubectl("delete", "codistillation", "again", "-n", NAMESPACE)
    stack.kubectl("apply", "-f", "-", input=retained(60))
    stack.wait_phase("again", "Succeeded")
    written = stack.folder("again").get_json("run.json")
    assert written["metadata"]["uid"] != first and written["spec"]["training"]["steps"] == 60
    assert stack.folder("again").get_json("groups/0/progress.json")["step"] == 60
    old = Bucket(f"{stack.folder('again').url}.previous-{first}", stack.endpoint, KEYS)
    assert old.get_json("run.json")["spec"]["training"]["steps"] == 40
    assert "RunFolderArchived" in stack.reasons("again")
    stack.kubectl("delete", "codistillation", "again", "-n", NAMESPACE)


def test_a_pod_template_the_job_crd_refuses_is_invalid_at_once(stack: Stack) -> None:
    template = {"spec": {"containers": [{"name": "pytorch",
                                         "resources": {"limits": {"memory": "4 GiB"}}}]}}
    stack.apply("badtemplate", template=template)
    wait_for(lambda: (c := {c["type"]: c for c in stack.status("badtemplate").get("conditions")
                            or []}.get("Ready")) and c["reason"] == "InvalidSpec",
             "Ready=False InvalidSpec")
    ready = next(c for c in stack.status("badtemplate")["conditions"] if c["type"] == "Ready")
    # the Training Operator's webhook names the field; where Kueue runs, its job webhook sees the
    # job first and names the rule the quantity breaks
    message = ready["message"]
    assert ready["status"] == "False" and "refused" in message, ready
    assert "memory" in message or "quantities must match" in message, ready
    time.sleep(5)  # no retry loop: no job, one event
    assert not stack.jobs("badtemplate")
    assert stack.reasons("badtemplate").count("InvalidSpec") == 1
    assert not stack.folder("badtemplate").exists("run.json")  # nothing written


def test_bad_input_ends_in_a_condition_and_an_event_naming_the_cause(stack: Stack) -> None:
    """Within a status interval or two (1 s here), nothing half-created (issue 11, bad input)."""
    stack.apply("noimage", image="registry.invalid/codistill/nothing:1")
    degraded = wait_for(lambda: (c := {c["type"]: c for c in stack.status("noimage").get(
        "conditions") or []}.get("Degraded")) and c["status"] == "True" and c, "Degraded",
        timeout=120)
    assert degraded["reason"] == "PodsNotStarting" and "ErrImagePull" in degraded["message"]
    assert "registry.invalid/codistill/nothing:1" in degraded["message"], degraded
    wait_for(lambda: "RunDegraded" in stack.reasons("noimage"), "the RunDegraded event")

    stack.kubectl("create", "secret", "generic", "half-creds", "-n", NAMESPACE,
                  f"--from-literal=AWS_ACCESS_KEY_ID={KEYS['AWS_ACCESS_KEY_ID']}")
    stack.apply("halfsecret", storage={**manifest(stack, "x")["spec"]["storage"],
                                       "credentialsSecret": "half-creds"})
    stack.apply("nobucket", storage={**manifest(stack, "x")["spec"]["storage"],
                                     "endpoint": "http://127.0.0.1:9"})
    for name, reason, cause in (("halfsecret", "InvalidSpec", "AWS_SECRET_ACCESS_KEY"),
                                ("nobucket", "StorageUnavailable", "127.0.0.1:9")):
        ready = wait_for(lambda n=name: (c := {c["type"]: c for c in stack.status(n).get(
            "conditions") or []}.get("Ready")) and c["status"] == "False" and c, f"{name} refused")
        assert ready["reason"] == reason and cause in ready["message"], ready
        wait_for(lambda n=name, r=reason: r in stack.reasons(n), f"the {reason} event")
        assert not stack.jobs(name)


def test_trainjobs_suspend_resume_and_are_replaced_when_their_spec_changes(stack: Stack) -> None:
    """A TrainJob's spec is immutable but for `suspend`: suspend and resume patch it; another
    image replaces the jobs, and the groups resume from their state in the bucket."""
    name, kind = "tjchange", "trainjobs"
    stack.apply(name, steps=300, backend="trainjob", runPolicy={"suspend": True})
    status = stack.wait_phase(name, "Suspended", timeout=120)
    assert [g["phase"] for g in status["groups"]] == ["Suspended", "Suspended"]
    assert all(j["spec"]["suspend"] for j in stack.jobs(name, kind)) and not stack.jobs(name, "pods")
    stack.apply(name, steps=300, backend="trainjob")
    store = stack.folder(name)
    wait_for(lambda: (store.get_json("groups/0/state/LATEST.json") or {}).get("step", 0) >= 50,
             "group 0 saved state at step 50", timeout=240)
    before = {j["metadata"]["name"]: j["metadata"]["uid"] for j in stack.jobs(name, kind)}
    stack.apply(name, steps=300, backend="trainjob", image="localhost:5000/codistill/trainer:v2")
    wait_for(lambda: "JobsReplaced" in stack.reasons(name), "the JobsReplaced event", timeout=60)
    status = stack.wait_phase(name, "Succeeded", timeout=300)
    after = {j["metadata"]["name"]: j for j in stack.jobs(name, kind)}
    assert sorted(after) == sorted(before) and all(
        after[n]["metadata"]["uid"] != uid for n, uid in before.items())
    assert {j["spec"]["trainer"]["image"] for j in after.values()} == {
        "localhost:5000/codistill/trainer:v2"}
    assert store.get_json("groups/0/progress.json")["resumedFrom"] >= 50
    assert [g["step"] for g in status["groups"]] == [300, 300]
    assert {"GroupSuspended", "Resumed", "JobsReplaced"} <= set(stack.reasons(name))
