"""Running a PyTorchJob as the Training Operator would: replicas and their environment."""

import pytest

from codistill import pytorchjob, spec
from codistill_trainer.cli import kubeflow


def job(**fields):
    run = spec.parse({"apiVersion": "codistill.io/v1alpha1", "kind": "Codistillation",
                      "metadata": {"name": "r", "namespace": "ml"},
                      "spec": {"storage": {"url": "s3://b", "credentialsSecret": "creds"},
                               **fields}})
    return pytorchjob.render_job(run, 1, "s3://b/ml/r")


def test_env_as_the_controller_injects_it():
    j = job(workersPerGroup=3, nprocPerWorker=2)
    secrets = {("creds", "AWS_ACCESS_KEY_ID"): "id", ("creds", "AWS_SECRET_ACCESS_KEY"): "key"}
    pods = kubeflow.pods(j, lambda n, k: secrets[(n, k)], "10.0.0.1", 23456)
    assert [p.name for p in pods] == ["r-g1-master-0", "r-g1-worker-0", "r-g1-worker-1"]
    assert [p.env["RANK"] for p in pods] == ["0", "1", "2"]
    assert {p.env["WORLD_SIZE"] for p in pods} == {"6"}  # 3 nodes x 2 processes
    assert {p.env["PET_NPROC_PER_NODE"] for p in pods} == {"2"}
    env = pods[2].env
    assert env["CODISTILL_GROUP"] == "1" and env["CODISTILL_GROUPS"] == "2"
    assert env["CODISTILL_RUN_URL"] == "s3://b/ml/r"
    assert env["AWS_ACCESS_KEY_ID"] == "id" and env["MASTER_ADDR"] == "10.0.0.1"


def test_credentials_are_references_in_the_job_never_values():
    j = job()
    env = j["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["env"]
    refs = {e["name"]: e for e in env if "secretKeyRef" in e.get("valueFrom", {})}
    assert set(refs) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    assert not any("AWS" in e["name"] and "value" in e for e in env if "SECRET" in e["name"])
    assert all("value" not in e for e in refs.values())


def test_local_secret_needs_the_variable():
    from codistill_trainer.cli.launch import local_secret

    assert local_secret({"AWS_ACCESS_KEY_ID": "x"})("creds", "AWS_ACCESS_KEY_ID") == "x"
    with pytest.raises(spec.SpecError, match="credentialsSecret"):
        local_secret({})("creds", "AWS_SECRET_ACCESS_KEY")
