"""What the CRD's schema cannot say, checked before anything is created: the contract's cluster
rules (codistill.validation), the credentials Secret, and the fields that cannot change.

Every message starts with the field it is about (`spec.storage.url: ...`), like `spec.parse`'s.
"""

from __future__ import annotations

from typing import Any

from codistill import names, validation
from codistill.names import KIND
from codistill.spec import Codistillation

from .errors import MissingSecret

# Fields that cannot change under running jobs: they decide what is trained, by whom, and where
# its state lives. A change to any of them is refused as a whole (never half-applied).
IMMUTABLE = (
    "groups", "workersPerGroup", "nprocPerWorker", "task",
    "storage.url", "storage.endpoint", "storage.credentialsSecret", "training.dataSharding",
)


def source(body: dict[str, Any]) -> str:
    meta = body.get("metadata") or {}
    return f"{KIND} {meta.get('namespace')}/{meta.get('name')}"


def check(body: dict[str, Any]) -> Codistillation:
    """The parsed run, or SpecError naming every field that is wrong (codistill.validation)."""
    return validation.check(body, source(body))


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
