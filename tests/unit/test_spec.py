"""The run spec: defaults, and errors that name the field."""

import json

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


HEAD = "apiVersion: codistill.io/v1alpha1\nkind: Codistillation\nmetadata: {name: x}\n"


def test_names_refuse_a_trailing_newline():
    with pytest.raises(spec.SpecError, match="metadata.name") as e:
        spec.parse({**BASE, "metadata": {"name": "quickstart\n"}})
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("namespace", ["../../../../x", "Team", "a" * 64, "", "a.b", "x\n"])
def test_namespace_must_be_a_dns_label(namespace):
    with pytest.raises(spec.SpecError, match="metadata.namespace") as e:
        spec.parse({**BASE, "metadata": {"name": "x", "namespace": namespace}})
    assert "\n" not in str(e.value)
    assert spec.parse({**BASE, "metadata": {"name": "x", "namespace": "team-a"}})


@pytest.mark.parametrize("fields, field", [
    ({"groups": True}, "spec.groups"),
    ({"groups": "2"}, "spec.groups"),
    ({"groups": 2.0}, "spec.groups"),
    ({"runPolicy": {"suspend": "yes"}}, "spec.runPolicy.suspend"),
    ({"training": {"optimizer": {"lr": "0.1"}}}, "spec.training.optimizer.lr"),
    ({"distillation": {"teachers": True}}, "spec.distillation.teachers"),
])
def test_types_are_strict_as_in_the_crd(fields, field):
    with pytest.raises(spec.SpecError, match=field) as e:
        parse(**fields)
    assert "\n" not in str(e.value)


def test_a_number_field_takes_an_integer_as_the_crd_does(tmp_path):
    run = parse(distillation={"temperature": 2, "weight": 1}, training={"optimizer": {"lr": 1}})
    assert run.spec.distillation.temperature == 2.0 and run.spec.training.optimizer.lr == 1.0
    path = tmp_path / "run.yaml"  # YAML 1.1 reads 3e-4 as a string; kubectl as a number
    path.write_text(HEAD + "spec: {training: {optimizer: {lr: 3e-4}}, distillation: {weight: 1}}\n")
    assert spec.load(path).spec.training.optimizer.lr == 3e-4


@pytest.mark.parametrize("data, expected", [
    (b"\x00\xff\xfe\x81\x80binary", "not UTF-8/UTF-16 YAML text"),
    (HEAD.encode("latin-1") + "spec: {task: {args: {a: caf\xe9}}}\n".encode("latin-1"),
     "not UTF-8/UTF-16 YAML text"),
    (HEAD.encode() + b"spec: {task: {args: {a: " + b"[" * 5000 + b"]" * 5000 + b"}}}\n",
     "nested more than 100 levels deep"),
    # deep enough to fail pydantic's serializer when run.json is written, not Python's stack
    (HEAD.encode() + b"spec: {task: {args: {a: " + b"[" * 300 + b"]" * 300 + b"}}}\n",
     "nested more than 100 levels deep"),
    (HEAD.encode() + b"spec: {task: {args: {v: !!binary gAD/}}}\n", "binary values"),
    (HEAD.encode() + b"spec: {groups: " + b"1" * 5000 + b"}\n", "integer of 5000 characters"),
    (HEAD.encode() + b"spec: {task: {args: {a: 0x" + b"f" * 5000 + b"}}}\n", "integer of"),
    (HEAD.encode() + b"spec: {groups: 2, groups: 64}\n", "duplicate key 'groups'"),
])
def test_unreadable_or_too_deep_yaml_is_a_spec_error_naming_the_file(tmp_path, data, expected):
    path = tmp_path / "bad.yaml"
    path.write_bytes(data)
    with pytest.raises(spec.SpecError, match=f"bad.yaml: .*{expected}") as e:
        spec.load(path)
    assert "\n" not in str(e.value)


def test_utf16_with_a_bom_is_read(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_bytes(HEAD.encode("utf-16"))
    assert spec.load(path).metadata.name == "x"


def test_yaml_aliases_are_refused(tmp_path):
    bomb = HEAD + "spec:\n  task:\n    args:\n      a: &a [1, 2, 3]\n      b: [*a, *a, *a]\n"
    path = tmp_path / "bomb.yaml"
    path.write_text(bomb)
    with pytest.raises(spec.SpecError, match=r"bomb.yaml: line 8 malformed YAML: aliases \(\*a\)"):
        spec.load(path)


@pytest.mark.parametrize("template, field", [
    ({"spec": {"containers": [{"name": "pytorch", "env": "x"}]}},
     "spec.template.spec.containers[0].env: must be a list"),
    ({"spec": {"containers": [{"name": "pytorch", "env": ["x"]}]}},
     "spec.template.spec.containers[0].env[0]: must be a mapping"),
    ({"spec": {"containers": "pytorch"}}, "spec.template.spec.containers: must be a list"),
    ({"spec": {"containers": ["pytorch"]}}, "spec.template.spec.containers[0]: must be a mapping"),
    ({"spec": {"containers": [{"name": "p", "volumeMounts": 3}]}},
     "spec.template.spec.containers[0].volumeMounts: must be a list"),
    ({"spec": {"volumes": {"a": 1}}}, "spec.template.spec.volumes: must be a list"),
    ({"spec": "x"}, "spec.template.spec: must be a mapping"),
    ({"metadata": ["x"]}, "spec.template.metadata: must be a mapping"),
])
def test_template_lists_must_be_lists_of_mappings(template, field):
    from codistill.pytorchjob import render_jobs

    with pytest.raises(spec.SpecError) as e:
        parse(template=template)
    assert field in str(e.value) and "\n" not in str(e.value)
    ok = {"spec": {"containers": [{"name": "pytorch", "env": [{"name": "A", "value": "1"}]}]}}
    (job, _) = render_jobs(parse(template=ok), "file:///tmp/x")
    env = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["env"]
    assert env[0] == {"name": "A", "value": "1"}


@pytest.mark.parametrize("temperature", [1e-300, 0.001, 101])
def test_temperature_is_bounded(temperature):
    with pytest.raises(spec.SpecError, match="spec.distillation.temperature"):
        parse(distillation={"temperature": temperature})
    assert parse(distillation={"temperature": 0.01}).spec.distillation.temperature == 0.01


def test_nesting_within_the_bound_is_read_and_written(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(HEAD + "spec: {task: {args: {a: " + "[" * 90 + "]" * 90 + "}}}\n")
    json.dumps(spec.load(path).resolved())


def test_a_merged_key_may_be_overridden(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(HEAD + "spec: {<<: {groups: 3}, groups: 1}\n")
    assert spec.load(path).spec.groups == 1


def test_errors_echo_long_values_and_many_fields_only_in_part():
    with pytest.raises(spec.SpecError) as e:
        spec.parse({**BASE, "apiVersion": "x" * 100_000})
    assert "apiVersion" in str(e.value) and "(100002 characters)" in str(e.value)
    assert len(str(e.value)) < 300
    with pytest.raises(spec.SpecError) as e:
        parse(groups="x" * 100_000, **{f"k{i}": 1 for i in range(10_000)})
    assert str(e.value).endswith("; and 9996 more") and len(str(e.value)) < 600
