"""What the CRD's schema cannot say, checked before anything is created.

Every message starts with the field it is about (`spec.storage.url: ...`), like `spec.parse`'s.
"""

from __future__ import annotations

import re
from typing import Any

import fsspec
from pydantic import ValidationError

from codistill import names
from codistill.names import KIND
from codistill.spec import Codistillation, SpecError, describe, parse

from .errors import MissingSecret

LOCAL_ONLY = {"file", "local", "memory"}  # no two pods share these
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
POD_TEMPLATE_KEYS = {"metadata", "spec"}
# Fields that cannot change under running jobs: they decide what is trained, by whom, and where
# its state lives. A change to any of them is refused as a whole (never half-applied).
IMMUTABLE = (
    "groups", "workersPerGroup", "nprocPerWorker", "task",
    "storage.url", "storage.endpoint", "storage.credentialsSecret", "training.dataSharding",
)


def source(body: dict[str, Any]) -> str:
    meta = body.get("metadata") or {}
    return f"{KIND} {meta.get('namespace')}/{meta.get('name')}"


def _storage(run: Codistillation) -> str | None:
    url = run.spec.storage.url
    if not url:
        return "spec.storage.url: required on a cluster: a bucket all pods reach, e.g. s3://bucket"
    protocol = url.split("://", 1)[0]
    if protocol in LOCAL_ONLY:
        return f"spec.storage.url: {protocol}:// is for local runs only; pods need a shared bucket"
    try:
        fsspec.get_filesystem_class(protocol)
    except (ValueError, ImportError):
        return f"spec.storage.url: storage protocol '{protocol}' is unknown to the operator"
    return None


def _queue(run: Codistillation) -> str | None:
    name = run.spec.run_policy.queue_name
    if name is not None and (len(name) > 63 or not LABEL_VALUE.match(name)):
        return f"spec.runPolicy.queueName: must be a label value (<= 63 characters), got {name!r}"
    return None


def _template(run: Codistillation) -> str | None:
    template = run.spec.template or {}
    unknown = sorted(set(template) - POD_TEMPLATE_KEYS)
    if unknown:
        return f"spec.template: a pod template has only metadata and spec, got {unknown}"
    containers = (template.get("spec") or {}).get("containers") or []
    if not isinstance(containers, list):
        return "spec.template.spec.containers: must be a list"
    for i, container in enumerate(containers):
        if not isinstance(container, dict) or not container.get("name"):
            return f"spec.template.spec.containers[{i}].name: required"
    return None


def check(body: dict[str, Any]) -> Codistillation:
    """The parsed run, or SpecError naming every field that is wrong.

    JSON types are checked strictly too ("yes" is no boolean), as the CRD's schema does: the
    operator must not accept what `kubectl apply` would refuse.
    """
    run = parse(body, source(body))
    try:
        Codistillation.model_validate(body, strict=True)
    except ValidationError as e:
        raise SpecError(f"{source(body)}: {describe(e)}") from None
    problems = [p for p in (_storage(run), _queue(run), _template(run)) if p]
    if problems:
        raise SpecError(f"{source(body)}: {'; '.join(problems)}")
    return run


def credentials(name: str | None, data: dict[str, str] | None, namespace: str) -> dict[str, str]:
    """The AWS keys from the Secret `name` (`data`: its contents, None when it does not exist)."""
    if not name:
        return {}
    field = "spec.storage.credentialsSecret"
    if data is None:
        raise MissingSecret(f"{field}: Secret {namespace}/{name} not found")
    missing = [k for k in names.CREDENTIAL_KEYS if not data.get(k)]
    if missing:
        raise MissingSecret(f"{field}: Secret {namespace}/{name} lacks {', '.join(missing)}")
    return {k: data[k] for k in names.CREDENTIAL_KEYS}


def frozen(run: Codistillation) -> dict[str, Any]:
    """The values of the IMMUTABLE fields, by dotted path."""
    values: dict[str, Any] = {}
    spec = run.resolved()["spec"]
    for path in IMMUTABLE:
        node: Any = spec
        for key in path.split("."):
            node = node[key]
        values[path] = node
    return values


def changed(applied: dict[str, Any], run: Codistillation) -> list[str]:
    """`spec.<field>: applied -> requested` for each immutable field the spec changes.

    A field missing from `applied` was null: the API server's merge patch of the status drops
    null members, so absent means unset, and setting it later is a change like any other."""
    if not applied:
        return []
    now = frozen(run)
    return [
        f"spec.{path}: {applied.get(path)!r} -> {now[path]!r}"
        for path in IMMUTABLE
        if applied.get(path) != now[path]
    ]
