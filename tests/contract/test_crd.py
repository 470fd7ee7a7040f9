"""The generated CRD: one source of truth with the run spec, and a schema that refuses bad input.

The invalid-manifest corpus (tests/data/invalid/) is checked here against the CRD's own schema; the
same files go through the running operator in test_operator.py.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from pydantic import BaseModel

from codistill import spec
from codistill_operator import crd, validate
from tests.support.crdschema import INVALID, corpus_entry, validator, version_schema

ROOT = Path(__file__).resolve().parents[2]


def names_field(error: jsonschema.ValidationError, field: str) -> bool:
    path = ".".join(str(p) for p in error.absolute_path)
    if error.validator == "additionalProperties":
        parent, _, key = field.rpartition(".")
        return path == parent and repr(key) in error.message
    return path == field


def test_committed_crd_is_the_generated_one() -> None:
    committed = (ROOT / "manifests" / "crd.yaml").read_text()
    assert committed == crd.render(), "manifests/crd.yaml drifted from the spec: `make manifests`"


def test_module_prints_the_crd(capsys: pytest.CaptureFixture[str]) -> None:
    crd.main()
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed == crd.crd()
    assert printed["metadata"]["name"] == "codistillations.codistill.io"


def test_names_columns_and_status_subresource() -> None:
    doc = crd.crd()["spec"]
    assert doc["names"]["shortNames"] == ["codist"] and doc["scope"] == "Namespaced"
    (version,) = doc["versions"]
    assert version["subresources"] == {"status": {}}
    columns = {c["name"]: (c["jsonPath"], c["priority"])
               for c in version["additionalPrinterColumns"]}
    default = [n for n, (_, p) in columns.items() if p == 0]
    assert default == ["Groups", "Phase", "Step", "Loss", "Age"]
    assert columns["Ready"] == (".status.groupsReady", 1)
    assert columns["Bucket"] == (".status.bucket", 1)
    assert columns["Jobs"] == (".status.applied.backend", 1)
    status = version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
    for path, _ in columns.values():
        head, _, key = path.lstrip(".").partition(".")
        assert head != "status" or key.split(".")[0] in status, f"column {path}: no such status"


def walk(node: dict[str, Any], path: str = ""):
    for key, child in (node.get("properties") or {}).items():
        yield f"{path}.{key}".lstrip("."), child
        yield from walk(child, f"{path}.{key}")
    if isinstance(node.get("items"), dict):
        yield from walk(node["items"], f"{path}[]")


def test_every_field_is_documented_and_typed() -> None:
    schema = version_schema(crd.crd(), spec.API_VERSION)
    fields = list(walk(schema["properties"]["spec"], "spec"))
    fields += list(walk(schema["properties"]["status"], "status"))
    assert len(fields) > 60
    for path, node in fields:
        assert node.get("description"), f"{path} has no description (kubectl explain shows none)"
        typed = "type" in node or node.get("x-kubernetes-int-or-string")
        assert typed, f"{path} has no type"


def model_fields(model: type[BaseModel], path: str):
    """(CR path, pydantic field) for every field of the run spec, nested models included."""
    for name, info in model.model_fields.items():
        here = f"{path}.{info.alias or name}"
        yield here, info
        kind = info.annotation
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            yield from model_fields(kind, here)


def node_at(schema: dict[str, Any], path: str) -> dict[str, Any]:
    for key in path.split("."):
        schema = schema["properties"][key]
    return schema


def test_defaults_bounds_and_enums_come_from_the_spec() -> None:
    schema = version_schema(crd.crd(), spec.API_VERSION)
    seen = 0
    for path, info in model_fields(spec.Spec, "spec"):
        node = node_at(schema, path)
        assert node["description"] == info.description, path
        if info.default is not None and not info.is_required() and info.default_factory is None:
            assert node["default"] == info.default, path
            seen += 1
        for meta in info.metadata:
            for attr, key in (("ge", "minimum"), ("le", "maximum"), ("gt", "minimum")):
                if getattr(meta, attr, None) is not None:
                    assert node[key] == getattr(meta, attr), f"{path}.{key}"
            if getattr(meta, "gt", None) is not None:
                assert node["exclusiveMinimum"] is True, path
    assert seen >= 25
    assert node_at(schema, "spec.training.optimizer.name")["enum"] == ["adamw", "adam", "sgd"]
    assert node_at(schema, "spec.training")["default"] == {}  # nested defaults apply


def test_free_form_and_int_or_string_fields() -> None:
    schema = version_schema(crd.crd(), spec.API_VERSION)
    for path in ("spec.task.args", "spec.template", "spec.runPolicy.schedulingPolicy"):
        assert node_at(schema, path)["x-kubernetes-preserve-unknown-fields"] is True, path
    teachers = node_at(schema, "spec.distillation.teachers")
    assert teachers["x-kubernetes-int-or-string"] is True and teachers["default"] == "all"
    assert teachers["anyOf"] == [{"type": "integer"}, {"type": "string"}]


def test_cel_rules_cover_the_spec_validators() -> None:
    schema = version_schema(crd.crd(), spec.API_VERSION)
    distillation = node_at(schema, "spec.distillation")["x-kubernetes-validations"]
    assert any("maxStalenessSteps >=" in r["rule"] for r in distillation)
    assert any("teachers < self.groups" in r["rule"] for r in node_at(schema, "spec")[
        "x-kubernetes-validations"])
    assert any("metadata.name" in r["rule"] for r in schema["x-kubernetes-validations"])


def test_a_valid_run_passes_and_gets_no_schema_errors() -> None:
    from tests.support.kube import manifest

    doc = manifest("ok", "http://minio:9000", distillation={"teachers": 1})
    validator().validate(doc)
    validate.check(doc)


def test_corpus_is_large_and_covers_every_refuser() -> None:
    entries = [corpus_entry(p) for p in INVALID]
    assert len(entries) >= 25
    assert {by for _, _, by in entries} == {"schema", "cel", "operator"}
    assert len({doc["metadata"]["name"] for doc, _, _ in entries}) == len(entries)


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.stem)
def test_invalid_manifest_is_refused_naming_its_field(path: Path) -> None:
    doc, field, by = corpus_entry(path)
    errors = list(validator().iter_errors(doc))
    if by == "schema":
        assert any(names_field(e, field) for e in errors), [e.message for e in errors]
    else:
        assert not errors, f"the schema refuses {path.name}: mark it refused-by: schema"
    if "credentialsSecret" in field and by == "operator":
        return  # needs the cluster's Secret: test_operator.py applies it
    with pytest.raises(spec.SpecError, match=re.escape(field)):
        validate.check(doc)
