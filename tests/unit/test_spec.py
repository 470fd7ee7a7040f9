"""The run spec: defaults, and errors that name the field."""

import pytest

from codistill import spec

BASE = {"apiVersion": "codistill.io/v1alpha1", "kind": "Codistillation", "metadata": {"name": "x"}}


def parse(**fields):
    return spec.parse({**BASE, "spec": fields})


def test_defaults_fill_every_field():
    run = parse()
    resolved = run.resolved()["spec"]
    assert resolved["groups"] == 2 and resolved["training"]["dataSharding"] == "disjoint"
    assert resolved["distillation"]["teachers"] == "all"
    assert resolved["storage"]["onDelete"] == "Retain"
    assert spec.parse(run.resolved()) == run  # run.json round-trips


@pytest.mark.parametrize("fields, field", [
    ({"groups": 0}, "spec.groups"),
    ({"groups": "two"}, "spec.groups"),
    ({"workersPerGroup": 0}, "spec.workersPerGroup"),
    ({"training": {"steps": -1}}, "spec.training.steps"),
    ({"training": {"stepz": 5}}, "spec.training.stepz: unknown field"),
    ({"training": {"dataSharding": "random"}}, "spec.training.dataSharding"),
    ({"training": {"optimizer": {"lr": 0}}}, "spec.training.optimizer.lr"),
    ({"distillation": {"temperature": 0}}, "spec.distillation.temperature"),
    ({"distillation": {"teachers": "some"}}, "spec.distillation.teachers"),
    ({"distillation": {"teachers": 2}}, "spec.distillation.teachers: must be < groups"),
    ({"distillation": {"maxStalenessSteps": 10}}, "spec.distillation.maxStalenessSteps"),
    ({"storage": {"url": "bucket"}}, "spec.storage.url"),
    ({"storage": {"onDelete": "Keep"}}, "spec.storage.onDelete"),
    ({"task": {"name": "no spaces allowed"}}, "spec.task.name"),
    ({"colour": "red"}, "spec.colour: unknown field"),
])
def test_errors_name_the_field(fields, field):
    with pytest.raises(spec.SpecError) as e:
        parse(**fields)
    assert field in str(e.value) and "\n" not in str(e.value)


def test_name_must_leave_room_for_job_names():
    with pytest.raises(spec.SpecError, match="metadata.name"):
        spec.parse({**BASE, "metadata": {"name": "a" * 62}, "spec": {"groups": 2}})
    with pytest.raises(spec.SpecError, match="metadata.name"):
        spec.parse({**BASE, "metadata": {"name": "Upper"}})


def test_load_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("spec: [unclosed\n")
    with pytest.raises(spec.SpecError, match=r"bad.yaml: line \d+ malformed YAML"):
        spec.load(bad)
    none = tmp_path / "none.yaml"
    none.write_text("kind: Secret\n")
    with pytest.raises(spec.SpecError, match="none.yaml: expected exactly one .*Codistillation"):
        spec.load(none)
    with pytest.raises(spec.SpecError, match="missing.yaml: cannot read"):
        spec.load(tmp_path / "missing.yaml")


def test_other_documents_are_skipped(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("kind: Secret\nmetadata: {name: creds}\n---\n"
                    "apiVersion: codistill.io/v1alpha1\nkind: Codistillation\nmetadata: {name: r}\n")
    assert spec.load(path).metadata.name == "r"


def test_names_leave_room_for_the_training_operators_services():
    name = "a" * 50  # jobs a...-g1 (53) fit; Services up to a...-g1-worker-99 (63) fit
    spec.parse({**BASE, "metadata": {"name": name}, "spec": {"groups": 2, "workersPerGroup": 2}})
    with pytest.raises(spec.SpecError, match="metadata.name: .*Service 'a+-g1-worker-100'"):
        spec.parse({**BASE, "metadata": {"name": name},
                    "spec": {"groups": 2, "workersPerGroup": 102}})


def test_a_secret_name_may_have_dots_as_kubernetes_allows():
    doc = {**BASE, "spec": {"storage": {"credentialsSecret": "bucket.creds"}}}
    assert spec.parse(doc).spec.storage.credentials_secret == "bucket.creds"
    assert spec.parse(BASE).spec.training.rendezvous_timeout_seconds == 1800
