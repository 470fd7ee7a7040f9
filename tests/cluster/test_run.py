"""`make e2e`: a Codistillation from `kubectl apply` to Succeeded on a real control plane.

Real parts throughout: kube-apiserver (RBAC, PodSecurity `restricted` on the run's namespace),
kube-controller-manager (garbage collector, Deployments), the Kubeflow Training Operator v1.9.4
and its webhook, the chart installed by the real `helm`, the operator in a pod as the chart's
ServiceAccount (its RBAC and nothing more), moto's S3 server, and the trainers as real
processes. The process kubelet (cluster/kubelet.py) runs the pods: its own network namespace
and IP each, the Services the Training Operator creates resolved through /etc/hosts.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import pytest
import yaml

from codistill.storage import Bucket
from tests.cluster.stack import BUCKET, KEYS, NAMESPACE, Stack, manifest, processes
from tests.support.kube import wait_for
from tests.support.localrun import workers_of

pytestmark = pytest.mark.slow


def test_a_run_trains_to_succeeded_through_the_real_controllers(stack: Stack) -> None:
    stack.apply("e2e")
    wait_for(lambda: len(stack.jobs("e2e")) == 2, "two PyTorchJobs", timeout=60)
    pods = wait_for(lambda: (p := stack.jobs("e2e", "pods")) and len(p) == 4
                    and all(x["status"].get("podIP") for x in p) and p, "four pods with IPs",
                    timeout=120)
    assert len({p["status"]["podIP"] for p in pods}) == 4  # a network namespace each
    # the operator killed mid-run: its pod restarts it, and it converges on the same jobs
    wait_for(lambda: (stack.status("e2e").get("step") or 0) > 0, "training started", timeout=180)
    for pid in processes("codistill_operator"):
        os.kill(pid, signal.SIGKILL)
    # (after test_operator_kills' three kills, the kubelet's back-off is up to 40 s)
    wait_for(lambda: processes("codistill_operator"), "the operator back", timeout=180)
    status = stack.wait_phase("e2e", "Succeeded")
    assert sorted(j["metadata"]["name"] for j in stack.jobs("e2e")) == ["e2e-g0", "e2e-g1"]
    assert [g["step"] for g in status["groups"]] == [300, 300]
    assert all(g["teachers"] and g["loss"] > 0 for g in status["groups"]), status["groups"]
    store = stack.folder("e2e")
    for g in (0, 1):
        assert store.get_json(f"groups/{g}/teacher/LATEST.json")["step"] == 300
    assert store.get_json("report/report.json")["churn"]["pairs"]
    conditions = {c["type"]: c["status"] for c in status["conditions"]}
    assert conditions["Succeeded"] == "True" and conditions["Ready"] == "True"
    stack.kubectl("delete", "codistillation", "e2e", "-n", NAMESPACE)
    wait_for(lambda: not stack.jobs("e2e"), "jobs collected by the garbage collector")
    wait_for(lambda: not stack.jobs("e2e", "pods"), "pods gone", timeout=120)
    wait_for(lambda: not store.exists("run.json"), "run folder deleted (onDelete: Delete)")


def test_a_killed_master_restarts_and_its_group_resumes(stack: Stack) -> None:
    stack.apply("kill", steps=400)
    store = stack.folder("kill")
    state = "groups/0/state/LATEST.json"
    wait_for(lambda: store.exists(state) and store.get_json(state)["step"] >= 100,
             "group 0 saved state at step 100", timeout=240)
    saved = store.get_json(state)["step"]
    other_before = store.get_json("groups/1/progress.json")["step"]
    url = f"s3://{BUCKET}/{NAMESPACE}/kill"
    (master,) = [pid for pid, env in workers_of(url).items()
                 if env.get("CODISTILL_GROUP") == "0" and env.get("RANK") == "0"]
    os.kill(master, signal.SIGKILL)
    wait_for(lambda: (store.get_json("groups/0/progress.json") or {}).get("resumedFrom"),
             "group 0 resumed", timeout=180)
    assert store.get_json("groups/0/progress.json")["resumedFrom"] >= saved > 0
    status = stack.wait_phase("kill", "Succeeded")
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
    assert ready["status"] == "False" and "memory" in ready["message"], ready
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
