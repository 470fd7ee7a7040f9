"""The TrainJob backend's pure parts: rendered TrainJobs vs Kubeflow Trainer's real CRDs (v2.2 and
v2.3), what a TrainJob cannot carry, the choice of backend, the plan (patch or replace), and the
group phase a TrainJob's status gives."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from codistill import names, trainjob
from codistill.spec import parse
from codistill_operator import backends, children
from codistill_operator.names import RECREATE_HASH
from codistill_operator.status import observe
from tests.controller.test_operator_logic import SPECS, URL, body, jobs_of
from tests.support.crdschema import TRAINER_RELEASES, trainjob_crd, version_schema
from tests.support.crdschema import trainjob as trainjob_schema

# The SPECS a TrainJob can carry: not the sidecar, not runPolicy.backoffLimit/schedulingPolicy.
SUPPORTED = {
    **{k: v for k, v in SPECS.items() if k not in ("template", "queue and policy")},
    "queue and deadline": {"runPolicy": {"queueName": "team-a", "suspend": True,
                                         "activeDeadlineSeconds": 3600}},
    "template": {"template": {
        "metadata": {"labels": {"team": "a"}},
        "spec": {"nodeSelector": {"gpu": "h100"}, "tolerations": [{"key": "gpu"}],
                 "containers": [{"name": "pytorch", "resources": {"limits": {"nvidia.com/gpu": 8}},
                                 "env": [{"name": "NCCL_DEBUG", "value": "INFO"}]}]},
    }},
}


def trainjobs(**spec: Any) -> list[dict[str, Any]]:
    return jobs_of(body(**spec), "trainjob")


def pod_patch(job: dict[str, Any]) -> dict[str, Any]:
    (patch,) = job["spec"]["runtimePatches"]
    assert patch["manager"] == trainjob.MANAGER
    (node,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    assert node["name"] == names.TRAINJOB_REPLICATED_JOB
    return node["template"]["spec"]["template"]


@pytest.mark.parametrize("release", TRAINER_RELEASES)
@pytest.mark.parametrize("name", SUPPORTED)
def test_rendered_trainjobs_meet_kubeflow_trainers_crd(name: str, release: str) -> None:
    jobs = trainjobs(**SUPPORTED[name])
    assert [j["metadata"]["name"] for j in jobs] == ["demo-g0", "demo-g1"]
    for job in jobs:
        errors = [e.message for e in trainjob_schema(release).iter_errors(job)]
        assert not errors, errors
        assert job["kind"] == "TrainJob" and job["apiVersion"] == "trainer.kubeflow.org/v1alpha1"
        assert job["spec"]["runtimeRef"] == {"name": "codistill", "apiGroup":
                                             "trainer.kubeflow.org",
                                             "kind": "ClusterTrainingRuntime"}


def test_a_trainjob_runs_torchrun_on_the_contract_env_and_never_sets_the_reserved_names() -> None:
    (job, _) = trainjobs(workersPerGroup=3, nprocPerWorker=4, template=SUPPORTED["template"][
        "template"])
    trainer = job["spec"]["trainer"]
    assert trainer["command"] == ["torchrun", "-m", "codistill_trainer.worker"]
    assert (trainer["numNodes"], trainer["numProcPerNode"]) == (3, 4)
    assert trainer["resourcesPerNode"] == {"limits": {"nvidia.com/gpu": 8}}
    env = {e["name"]: e for e in trainer["env"]}
    assert env["CODISTILL_GROUP"]["value"] == "0" and env["NCCL_DEBUG"]["value"] == "INFO"
    assert env["CODISTILL_RUN_URL"]["value"] == URL
    assert env["CODISTILL_CPUS"]["valueFrom"]["resourceFieldRef"]["containerName"] == "node"
    assert not set(env) & set(names.TORCHRUN_ENV)
    secret = env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]
    assert secret == {"name": "s3-creds", "key": "AWS_SECRET_ACCESS_KEY"}
    pod = pod_patch(job)
    assert pod["metadata"]["labels"][names.LABEL_RUN] == "demo"
    assert pod["metadata"]["labels"][names.LABEL_GROUP] == "0"
    assert pod["metadata"]["labels"]["team"] == "a"
    spec = pod["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["nodeSelector"] == {"gpu": "h100"} and spec["tolerations"] == [{"key": "gpu"}]
    (container,) = spec["containers"]
    assert container["name"] == "node"
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert {"name": "codistill-shm", "mountPath": "/dev/shm"} in container["volumeMounts"]


def test_run_policy_and_queue_map_onto_the_trainjob() -> None:
    (job, _) = trainjobs(**SUPPORTED["queue and deadline"])
    assert job["spec"]["suspend"] is True and job["spec"]["activeDeadlineSeconds"] == 3600
    assert job["metadata"]["labels"][names.LABEL_QUEUE] == "team-a"


def test_what_a_trainjob_cannot_carry_is_named_field_by_field() -> None:
    run = parse(body(**SPECS["template"], runPolicy={"backoffLimit": 3,
                                                      "ttlSecondsAfterFinished": 5},
                     backend="trainjob"))
    problems = trainjob.unsupported(run)
    assert [p.split(":")[0] for p in problems] == [
        "spec.runPolicy.backoffLimit", "spec.runPolicy.ttlSecondsAfterFinished",
        "spec.template.spec.containers[1]"]
    template = {"spec": {"hostIPC": True, "containers": [
        {"name": "pytorch", "ports": [{"containerPort": 1}],
         "env": [{"name": "PET_NNODES", "value": "9"}]}]}}
    problems = trainjob.unsupported(parse(body(template=template)))
    assert [p.split(":")[0] for p in problems] == [
        "spec.template.spec.hostIPC", "spec.template.spec.containers[0].ports",
        "spec.template.spec.containers[0].env"]
    assert "PET_NNODES is reserved" in problems[2]
    assert trainjob.unsupported(parse(body(**SUPPORTED["template"]))) == []


def openapi(release: str, drop: str | None = None) -> dict[str, Any]:
    """An OpenAPI v3 document of trainer.kubeflow.org/v1alpha1 as the API server publishes it,
    from the release's CRD (`drop`: a spec field taken out, for an older Trainer)."""
    schema = copy.deepcopy(version_schema(yaml.safe_load(trainjob_crd(release).read_text()),
                                          "v1alpha1"))
    if drop:
        del schema["properties"]["spec"]["properties"][drop]
    gvk = [{"group": "trainer.kubeflow.org", "version": "v1alpha1", "kind": "TrainJob"}]
    return {"components": {"schemas": {
        "org.kubeflow.trainer.v1alpha1.TrainJob": {**schema, "x-kubernetes-group-version-kind": gvk},
    }}}


def test_trainer_v2_is_usable_from_2_2_and_named_when_missing_or_too_old() -> None:
    for release in TRAINER_RELEASES:
        assert backends.trainjob_problem(openapi(release)) is None
    assert "not installed" in backends.trainjob_problem(None)
    too_old = backends.trainjob_problem(openapi("v2.3.0", drop="runtimePatches"))
    assert "older than 2.2" in too_old and "runtimePatches" in too_old


@pytest.mark.parametrize(("requested", "applied", "problem", "chosen"), [
    ("auto", None, None, "trainjob"),
    ("auto", None, "not installed", "pytorchjob"),
    ("pytorchjob", None, None, "pytorchjob"),
    ("trainjob", None, None, "trainjob"),
    ("auto", "pytorchjob", None, "pytorchjob"),  # installed later: a running run stays put
])
def test_the_backend_is_chosen_once(requested: str, applied: str | None, problem: str | None,
                                    chosen: str) -> None:
    run = parse(body(backend=requested))
    assert backends.choose(run, applied, lambda: problem) == chosen


def test_an_explicit_trainjob_backend_that_is_missing_is_unavailable() -> None:
    with pytest.raises(backends.Unavailable) as e:
        backends.choose(parse(body(backend="trainjob")), None, lambda: "Trainer v2 is missing")
    assert e.value.reason == "BackendUnavailable"
    assert str(e.value) == "spec.backend: trainjob: Trainer v2 is missing"


def test_a_trainjob_is_patched_for_suspend_and_replaced_for_anything_else() -> None:
    (live, _) = trainjobs()
    (stop, _) = trainjobs(runPolicy={"suspend": True})
    plan = children.plan([stop], [live])
    assert plan.replace == [] and [n for n, _ in plan.update] == ["demo-g0"]
    (ops,) = [ops for _, ops in plan.update]
    assert ops[0] == {"op": "replace", "path": "/spec/suspend", "value": True}
    assert stop["metadata"]["annotations"][RECREATE_HASH] == live["metadata"]["annotations"][
        RECREATE_HASH]
    (new_image, _) = trainjobs(image="example.com/trainer:2")
    plan = children.plan([new_image], [live])
    assert plan.replace == ["demo-g0"] and plan.update == [] and plan.create == []


def test_a_queued_trainjob_is_resumed_by_kueue_not_by_us() -> None:
    queue = {"queueName": "team-a"}
    (live, _) = trainjobs(runPolicy={**queue, "suspend": True})
    (resume, _) = trainjobs(runPolicy=queue)
    (_, ops), = children.plan([resume], [live]).update
    assert ops[0]["value"] is True  # Kueue's to set false, on admission


@pytest.mark.parametrize(("status", "suspend", "phase"), [
    ({}, False, "Pending"),
    ({"conditions": [{"type": "Suspended", "status": "True", "message": "by Kueue"}]}, True,
     "Suspended"),
    ({"jobsStatus": [{"name": "node", "active": 1, "ready": 0}]}, False, "Running"),
    ({"jobsStatus": [{"name": "node", "active": 1, "ready": 1}]}, False, "Running"),
    ({"conditions": [{"type": "Complete", "status": "True", "message": "done"}]}, False,
     "Succeeded"),
    ({"conditions": [{"type": "Failed", "status": "True", "message": "DeadlineExceeded"}]}, False,
     "Failed"),
])
def test_a_trainjobs_status_maps_to_the_group_phases(status: dict, suspend: bool,
                                                     phase: str) -> None:
    job = {"kind": "TrainJob", "spec": {"suspend": suspend}, "status": status}
    assert observe.job_phase(job)[0] == phase


def test_the_vendored_crds_are_the_modules_when_the_cluster_binaries_are_built() -> None:
    bindir = Path(__file__).resolve().parents[2] / ".cache" / "cluster" / "bin"
    built = {"v2.3.0": bindir / "trainer-v2.3.0" / "manifests" / "crds",
             "v2.2.0": bindir / "trainer-crds-v2.2.0"}
    if not all(d.is_dir() for d in built.values()):
        pytest.skip("cluster/build.sh has not run here: nothing to compare with")
    for release, folder in built.items():
        module = (folder / "trainer.kubeflow.org_trainjobs.yaml").read_text()
        assert module == trainjob_crd(release).read_text(), release


def test_a_job_api_that_is_not_served_names_the_backend_to_install() -> None:
    from codistill_operator.reconcile import _missing

    assert _missing(backends.KINDS["pytorchjob"], "pytorchjob") == (
        "spec.backend: pytorchjob: the Training Operator is not installed (no kubeflow.org/v1 "
        "PyTorchJob API)")
    assert _missing(backends.KINDS["pytorchjob"], "auto").startswith(
        "spec.backend: auto: neither Kubeflow Trainer v2 (>= 2.2) nor the Training Operator")
    assert "Kubeflow Trainer v2 is not installed" in _missing(backends.KINDS["trainjob"],
                                                              "trainjob")
