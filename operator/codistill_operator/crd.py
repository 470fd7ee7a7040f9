"""The `codistillations.codistill.io` CRD, generated from the run spec's pydantic models.

One source of truth: field names, types, bounds, enums, defaults and descriptions all come from
`codistill.spec` (and the status from `status.schema`), turned into a structural
openAPIV3Schema. The model validators that span fields become CEL rules in `RULES`, so
`kubectl apply` refuses what `spec.parse` refuses. `python -m codistill_operator.crd` prints it;
`manifests/crd.yaml` is that output, committed.
"""

from __future__ import annotations

import copy
import sys
from typing import Any

import yaml
from pydantic import BaseModel

from codistill.names import API_GROUP, API_VERSION, KIND, PLURAL
from codistill.spec import DNS1035, Spec

from .status.schema import RunStatus

# The cross-field checks of spec.py's model validators, as CEL, keyed by the object they sit on.
# Every field a rule reads is guarded with has(): the API server also checks the rules against
# each object's `default: {}` before nested defaults fill it in, and refuses the CRD if a rule
# cannot evaluate there. At admission the defaults are in, so the guards never weaken a rule.
RULES: dict[str, list[dict[str, str]]] = {
    "": [
        {
            "rule": f"self.metadata.name.matches('{DNS1035.pattern}')",
            "message": "metadata.name must be a lower-case DNS-1035 label (job names derive "
            "from it)",
        },
        {
            # names.longest_name: <name>-g<G-1>-worker-<W-2>, or <name>-g<G-1>-master-0
            "rule": "!has(self.spec) || !has(self.spec.groups) || !has(self.spec.workersPerGroup) "
            "|| size(self.metadata.name) + 2 + size(string(self.spec.groups - 1)) + "
            "(self.spec.workersPerGroup > 1 ? 8 + size(string(self.spec.workersPerGroup - 2)) "
            ": 9) <= 63",
            "message": "metadata.name is too long: the Training Operator's Services "
            "<name>-g<group>-worker-<index> must have at most 63 characters",
        },
    ],
    "spec": [
        {
            "rule": "!has(self.distillation) || !has(self.distillation.teachers) "
            "|| !has(self.groups) || type(self.distillation.teachers) == string "
            "|| self.distillation.teachers < self.groups",
            "message": "distillation.teachers must be 'all' or less than groups",
            "fieldPath": ".distillation.teachers",
        },
    ],
    "spec.distillation": [
        {
            "rule": "!has(self.maxStalenessSteps) || !has(self.exchangeEverySteps) "
            "|| !has(self.reloadEverySteps) "
            "|| self.maxStalenessSteps >= self.exchangeEverySteps + self.reloadEverySteps",
            "message": "maxStalenessSteps must be >= exchangeEverySteps + reloadEverySteps, "
            "or every teacher would be skipped as stale",
            "fieldPath": ".maxStalenessSteps",
        },
        {
            "rule": "!has(self.teachers) || type(self.teachers) == string || self.teachers >= 1",
            "message": "teachers must be 'all' or a number >= 1",
            "fieldPath": ".teachers",
        },
    ],
}

COLUMNS = [
    ("Groups", "integer", ".spec.groups", 0, "Model groups."),
    ("Phase", "string", ".status.phase", 0, "Run phase."),
    ("Step", "integer", ".status.step", 0, "Slowest group's step."),
    ("Loss", "number", ".status.loss", 0, "Mean training loss."),
    ("Age", "date", ".metadata.creationTimestamp", 0, "Time since creation."),
    ("Ready", "string", ".status.groupsReady", 1, "Groups running or done."),
    ("Jobs", "string", ".status.applied.backend", 1, "Its jobs: trainjob or pytorchjob."),
    ("Bucket", "string", ".status.bucket", 1, "The run folder."),
]
_DROP = {"title", "additionalProperties", "$defs"}
_ORDER = ["type", "format", "description", "nullable", "default", "enum", "pattern"]


def _ordered(node: dict[str, Any]) -> dict[str, Any]:
    """Readable key order: what a field is first, then its bounds, then what it contains."""
    late = ("anyOf", "items", "additionalProperties", "properties", "required")
    rank = {k: i for i, k in enumerate(_ORDER)} | {k: 100 + i for i, k in enumerate(late)}
    return dict(sorted(node.items(), key=lambda kv: (rank.get(kv[0], 50), kv[0].startswith("x-"))))


def _resolve(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """Inline a `$ref` (pydantic keeps the field's description beside it)."""
    if "$ref" not in node:
        return node
    target = copy.deepcopy(defs[node["$ref"].rsplit("/", 1)[-1]])
    return {**target, **{k: v for k, v in node.items() if k != "$ref"}}


def _optional(node: dict[str, Any]) -> dict[str, Any]:
    """`X | None` (anyOf with null) becomes a nullable X without a default."""
    branches = [b for b in node["anyOf"] if b.get("type") != "null"]
    if len(branches) == len(node["anyOf"]) or len(branches) != 1:
        return node
    rest = {k: v for k, v in node.items() if k not in ("anyOf", "default")}
    return {**branches[0], **rest, "nullable": True}


def _int_or_string(node: dict[str, Any]) -> dict[str, Any]:
    """The int-or-string pattern of structural schemas; string constants become a pattern."""
    consts = [b["const"] for b in node["anyOf"] if "const" in b]
    out = {k: v for k, v in node.items() if k != "anyOf"}
    out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if consts:
        out["pattern"] = "^(" + "|".join(consts) + ")$"
    return out


def _exclusive(out: dict[str, Any]) -> None:
    """JSON Schema's numeric exclusive bounds become OpenAPI v3.0's boolean form."""
    for bound, limit in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if isinstance(out.get(bound), (int, float)) and not isinstance(out[bound], bool):
            out[limit], out[bound] = out[bound], True


def _fractional_bounds(out: dict[str, Any]) -> None:
    """A fractional `minimum`/`maximum` is also a CEL rule: the API server checks an integer
    value (`temperature: 0`) against the bound truncated to an integer, so 0 >= 0.01 passes."""
    for bound, op in (("minimum", ">="), ("maximum", "<=")):
        limit = out.get(bound)
        if out.get("type") == "number" and isinstance(limit, float) and not limit.is_integer():
            if out.get(f"exclusive{bound.title()}"):
                op = op[0]  # > or <
            out.setdefault("x-kubernetes-validations", []).append(
                {"rule": f"self {op} {limit}", "message": f"must be {op} {limit}"})


def structural(node: dict[str, Any], defs: dict[str, Any], required: bool = True) -> dict:
    """One pydantic JSON-schema node as a Kubernetes structural schema node."""
    node = _resolve(node, defs)
    if "anyOf" in node:
        node = _int_or_string(node) if node.get("x-kubernetes-int-or-string") else _optional(node)
        node = _resolve(node, defs)  # `Model | None`: the model was behind the anyOf
    out = {k: v for k, v in node.items() if k not in _DROP and k != "properties"}
    if "const" in out:
        out["enum"] = [out.pop("const")]
    _exclusive(out)
    _fractional_bounds(out)
    extra = node.get("additionalProperties")
    if extra is True:
        out["x-kubernetes-preserve-unknown-fields"] = True
    elif isinstance(extra, dict):
        out["additionalProperties"] = structural(extra, defs)
    if "items" in out:
        out["items"] = structural(out["items"], defs)
    if "properties" in node:
        needed = set(node.get("required", []))
        out["properties"] = {
            k: structural(v, defs, k in needed) for k, v in node["properties"].items()
        }
    if out.get("type") == "object" and not required and "default" not in out:
        if not out.get("nullable"):
            out["default"] = {}  # so the API server fills in the nested defaults
    return _ordered(out)


def model_schema(model: type[BaseModel]) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True, mode="validation")
    return structural(raw, raw.get("$defs", {}))


def _add_rules(schema: dict[str, Any]) -> dict[str, Any]:
    for path, rules in RULES.items():
        node = schema
        for key in filter(None, path.split(".")):
            node = node["properties"][key]
        node["x-kubernetes-validations"] = node.get("x-kubernetes-validations", []) + rules
    return schema


def openapi_schema() -> dict[str, Any]:
    spec = model_schema(Spec)
    spec.update(description="The desired run: groups, task, training, distillation, storage.")
    spec["default"] = {}
    status = model_schema(RunStatus)
    status["description"] = "Observed state, written by the operator."
    return _add_rules({
        "type": "object",
        "description": "Online distillation (codistillation): N model groups, each a "
        "data-parallel Kubeflow job (TrainJob or PyTorchJob), distilling from each other's "
        "stale checkpoints in a bucket.",
        "properties": {
            "apiVersion": {"type": "string", "description": f"{API_GROUP}/{API_VERSION}"},
            "kind": {"type": "string", "description": KIND},
            "metadata": {"type": "object"},
            "spec": spec,
            "status": status,
        },
    })


def crd() -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PLURAL}.{API_GROUP}"},
        "spec": {
            "group": API_GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": KIND.lower(),
                "shortNames": ["codist"],
                "categories": ["codistill"],
            },
            "versions": [{
                "name": API_VERSION,
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "additionalPrinterColumns": [
                    {"name": n, "type": t, "jsonPath": p, "priority": pr, "description": d}
                    for n, t, p, pr, d in COLUMNS
                ],
                "schema": {"openAPIV3Schema": openapi_schema()},
            }],
        },
    }


def render() -> str:
    head = "# Generated by `python -m codistill_operator.crd` from the run spec; do not edit.\n"
    return head + yaml.safe_dump(crd(), sort_keys=False, width=100)


def main() -> None:
    sys.stdout.write(render())


if __name__ == "__main__":
    main()
