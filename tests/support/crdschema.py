"""CRD schemas as JSON Schema validators: ours (generated) and Kubeflow's PyTorchJob (vendored in
tests/data/, see its README), plus the invalid-manifest corpus in tests/data/invalid/."""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from codistill import names
from codistill.spec import DNS1035
from codistill_operator import crd

DATA = Path(__file__).resolve().parent.parent / "data"
INVALID = sorted((DATA / "invalid").glob("*.yaml"))
KUBEFLOW_CRD = DATA / "kubeflow.org_pytorchjobs.yaml"
TRAINER_RELEASES = ("v2.2.0", "v2.3.0")  # Kubeflow Trainer v2 releases whose TrainJob CRD we meet


def trainjob_crd(release: str) -> Path:
    return DATA / f"trainer.kubeflow.org_trainjobs-{release}.yaml"


def as_json_schema(node: Any) -> Any:
    """An OpenAPI v3.0 CRD schema as draft-4 JSON Schema, as strict as `kubectl apply`:
    `nullable` admits null, and objects with known properties refuse unknown fields (the API
    server's strict field validation) unless marked to preserve them."""
    if isinstance(node, list):
        return [as_json_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: as_json_schema(v) for k, v in node.items() if k != "nullable"}
    if node.get("nullable") and "type" in node:
        out["type"] = [node["type"], "null"]
    if "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields"):
        out.setdefault("additionalProperties", False)
    return out


def version_schema(doc: dict[str, Any], version: str) -> dict[str, Any]:
    (found,) = [v for v in doc["spec"]["versions"] if v["name"] == version]
    return found["schema"]["openAPIV3Schema"]


@cache
def validator() -> jsonschema.Draft4Validator:
    """Our CRD's schema, generated from the run spec."""
    schema = as_json_schema(version_schema(crd.crd(), names.API_VERSION))
    jsonschema.Draft4Validator.check_schema(schema)
    return jsonschema.Draft4Validator(schema)


@cache
def kubeflow() -> jsonschema.Draft4Validator:
    """Kubeflow's PyTorchJob v1 schema (Training Operator 1.9)."""
    doc = yaml.safe_load(KUBEFLOW_CRD.read_text())
    return jsonschema.Draft4Validator(as_json_schema(version_schema(doc, names.KUBEFLOW_VERSION)))


@cache
def trainjob(release: str) -> jsonschema.Draft4Validator:
    """Kubeflow Trainer's TrainJob v1alpha1 schema, of `release`."""
    doc = yaml.safe_load(trainjob_crd(release).read_text())
    return jsonschema.Draft4Validator(as_json_schema(version_schema(doc, names.TRAINER_VERSION)))


def assert_meets_webhook(job: dict[str, Any]) -> None:
    """The Training Operator's admission rules (v1.9), beyond its schema."""
    name = job["metadata"]["name"]
    assert DNS1035.match(name) and len(name) <= 63
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] == 1
    for replica in replicas.values():
        containers = replica["template"]["spec"]["containers"]
        assert any(c["name"] == names.CONTAINER and c.get("image") for c in containers)


def corpus_entry(path: Path) -> tuple[dict[str, Any], str, str]:
    """The manifest, the field it gets wrong and what refuses it (its header comments)."""
    text = path.read_text()
    field = re.search(r"^# field: (\S+)$", text, re.M).group(1)
    by = re.search(r"^# refused-by: (schema|cel|operator)$", text, re.M).group(1)
    return yaml.safe_load(text), field, by
