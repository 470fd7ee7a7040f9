"""A real Kueue (v0.19.2) admitting codistill's groups, on each backend.

`runPolicy.queueName` labels each group's job with the LocalQueue; Kueue's webhook suspends it at
creation, and Kueue admits it once its ClusterQueue has quota for the group's pods, then resumes it.
The quota here fits one group at a time (2 pods x 500m of a 1-CPU ClusterQueue): the groups train
one after the other, each one's job suspended until the other has finished.
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
    room for one group's pods, and the LocalQueue the runs name."""
    objects = [
        {"apiVersion": KUEUE, "kind": "ResourceFlavor", "metadata": {"name": "default-flavor"}},
        {"apiVersion": KUEUE, "kind": "ClusterQueue", "metadata": {"name": "codistill"},
         "spec": {"namespaceSelector": {}, "resourceGroups": [{
             "coveredResources": ["cpu", "memory"],
             "flavors": [{"name": "default-flavor", "resources": [
                 {"name": "cpu", "nominalQuota": "1"}, {"name": "memory", "nominalQuota": "4Gi"}]}],
         }]}},
        {"apiVersion": KUEUE, "kind": "LocalQueue",
         "metadata": {"name": QUEUE, "namespace": NAMESPACE}, "spec": {"clusterQueue": "codistill"}},
    ]
    stack.kubectl("apply", "--server-side", "-f", "-",
                  input=json.dumps({"apiVersion": "v1", "kind": "List", "items": objects}))


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
    # one group admitted, the other held by Kueue (suspended, its Workload without quota)
    seen = wait_for(lambda: sorted(suspended(j) for j in stack.jobs(name, kind)) == [False, True]
                    and stack.jobs(name, kind), "one group admitted, one waiting", timeout=60)
    waiting = next(j["metadata"]["name"] for j in seen if suspended(j))
    workloads = [w for w in stack.get("workloads") or []
                 if w["metadata"]["ownerReferences"][0]["name"] in {j["metadata"]["name"]
                                                                   for j in seen}]
    assert len(workloads) == 2
    held = next(w for w in workloads if w["metadata"]["ownerReferences"][0]["name"] == waiting)
    reserved = {c["type"]: c for c in held["status"].get("conditions") or []}["QuotaReserved"]
    assert reserved["status"] == "False" and "insufficient unused quota" in reserved["message"]
    group = int(waiting.rsplit("-g", 1)[1])
    wait_for(lambda: (stack.status(name).get("groups") or [{}, {}])[group].get("phase")
             == "Suspended", f"group {group} shown Suspended")
    # the held group is admitted once the other has finished and freed the quota
    status = stack.wait_phase(name, "Succeeded", timeout=240)
    assert [g["step"] for g in status["groups"]] == [40, 40]
    assert "GroupSuspended" in stack.reasons(name)
