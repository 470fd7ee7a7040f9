"""A real Kueue (v0.19.2) admitting codistill's groups, on each backend.

`runPolicy.queueName` labels each group's job with the LocalQueue; Kueue's webhook suspends it at
creation, and Kueue admits it once its ClusterQueue has quota for the group's pods, then resumes it.
The ClusterQueue starts on hold (`stopPolicy: Hold`), so both groups are seen suspended for as
long as the test needs, however slow the machine; released, its quota fits one group at a time
(2 pods x 500m of a 1-CPU ClusterQueue): the groups train one after the other, which the
Workloads' conditions show afterwards (an observation of the brief window in which one group is
admitted and the other waits would race the first group's training).
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.cluster.stack import JOB_KINDS, NAMESPACE, Stack
from tests.support.kube import wait_for

pytestmark = pytest.mark.slow
KUEUE = "kueue.x-k8s.io/v1beta2"
QUEUE = "user-queue"
POD = {"requests": {"cpu": "500m", "memory": "256Mi"}}


def queues(stack: Stack) -> None:
    """A ResourceFlavor (no node labels: the one node has none of its own), a ClusterQueue with
    room for one group's pods, on hold, and the LocalQueue the runs name."""
    objects = [
        {"apiVersion": KUEUE, "kind": "ResourceFlavor", "metadata": {"name": "default-flavor"}},
        {"apiVersion": KUEUE, "kind": "ClusterQueue", "metadata": {"name": "codistill"},
         "spec": {"namespaceSelector": {}, "stopPolicy": "Hold", "resourceGroups": [{
             "coveredResources": ["cpu", "memory"],
             "flavors": [{"name": "default-flavor", "resources": [
                 {"name": "cpu", "nominalQuota": "1"}, {"name": "memory", "nominalQuota": "4Gi"}]}],
         }]}},
        {"apiVersion": KUEUE, "kind": "LocalQueue",
         "metadata": {"name": QUEUE, "namespace": NAMESPACE}, "spec": {"clusterQueue": "codistill"}},
    ]
    stack.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-",
                  input=json.dumps({"apiVersion": "v1", "kind": "List", "items": objects}))


def condition_time(workload: dict[str, Any], kind: str) -> str:
    """When the Workload's condition `kind` last became True (RFC 3339, seconds)."""
    found = {c["type"]: c for c in workload["status"].get("conditions") or []}[kind]
    assert found["status"] == "True", (kind, found)
    return found["lastTransitionTime"]


def suspended(job: dict[str, Any]) -> bool:
    spec = job["spec"]
    return bool(spec.get("suspend", (spec.get("runPolicy") or {}).get("suspend")))


@pytest.mark.parametrize("backend", ["pytorchjob", "auto"])
def test_kueue_admits_the_groups_as_its_quota_allows(stack: Stack, backend: str) -> None:
    queues(stack)
    kind, name = JOB_KINDS[backend], f"queued-{backend[:2]}"
    stack.apply(name, steps=40, backend=backend, runPolicy={"queueName": QUEUE},
                template={"spec": {"containers": [{"name": "pytorch", "resources": POD}]}})
    jobs = wait_for(lambda: len(j := stack.jobs(name, kind)) == 2 and j, f"two {kind}", timeout=60)
    assert all(j["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == QUEUE for j in jobs)
    # held by Kueue: both jobs suspended, both groups shown Suspended
    assert all(suspended(j) for j in jobs)
    wait_for(lambda: [g.get("phase") for g in stack.status(name).get("groups") or []]
             == ["Suspended", "Suspended"], "both groups shown Suspended", timeout=120)
    stack.kubectl("patch", "clusterqueues", "codistill", "--type=merge",
                  "-p", '{"spec": {"stopPolicy": "None"}}')
    status = stack.wait_phase(name, "Succeeded", timeout=240)
    assert [g["step"] for g in status["groups"]] == [40, 40]
    assert "GroupSuspended" in stack.reasons(name)
    # admitted one at a time: the second only once the first had finished and freed the quota
    owned = {j["metadata"]["name"] for j in jobs}
    workloads = [w for w in stack.get("workloads") or []
                 if w["metadata"]["ownerReferences"][0]["name"] in owned]
    assert len(workloads) == 2
    first, second = sorted(workloads, key=lambda w: condition_time(w, "Admitted"))
    assert condition_time(second, "Admitted") >= condition_time(first, "Finished")
    waited = [e["message"] for e in stack.get("events") or []
              if e["involvedObject"]["name"] == second["metadata"]["name"]
              and e["reason"] == "Pending"]
    assert any("insufficient unused quota" in m for m in waited), waited
