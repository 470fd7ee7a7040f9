"""Which Kubeflow job runs a run's groups: TrainJob (Trainer v2) or PyTorchJob (Training Operator).

`spec.backend: auto` takes TrainJob where Kubeflow Trainer v2 is installed and new enough, else
PyTorchJob. The choice is made once, when a run's jobs are first created, and recorded in its
status (status.applied.backend): installing Trainer v2 later never moves a running run.

Trainer v2 is found by the TrainJob schema the API server publishes (OpenAPI v3), which every
authenticated client may read: no RBAC on CRDs is needed. "New enough" is Kueue's test (its
PRs #14886/#14943): the schema has `spec.runtimePatches` (Trainer 2.2; 2.1 has
podTemplateOverrides instead, which codistill does not write).
"""

from __future__ import annotations

import threading
import time
from typing import Any, NamedTuple

from codistill import names
from codistill.spec import Codistillation

from .errors import Retry


class JobKind(NamedTuple):
    group: str
    version: str
    plural: str
    kind: str
    # How a job is deleted. PyTorchJobs in the foreground: the job stays until its pods are gone.
    # TrainJobs in the background: Trainer v2.3 re-creates the JobSet of a TrainJob that is being
    # deleted in the foreground, which then never goes (seen on the real controllers). Callers
    # wait for the pods instead.
    propagation: str


KINDS = {
    "pytorchjob": JobKind(names.KUBEFLOW_GROUP, names.KUBEFLOW_VERSION, names.PYTORCHJOB_PLURAL,
                          names.PYTORCHJOB_KIND, "Foreground"),
    "trainjob": JobKind(names.TRAINER_GROUP, names.TRAINER_VERSION, names.TRAINJOB_PLURAL,
                        names.TRAINJOB_KIND, "Background"),
}
TRAINER_SCHEMA = f"/openapi/v3/apis/{names.TRAINER_GROUP}/{names.TRAINER_VERSION}"
CACHE_SECONDS = 60.0  # how long one look at the API server's schema is trusted


class Unavailable(Retry):
    """The backend the run needs is not installed, or too old: nothing is created, and the
    reconcile is retried (the user may install it)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def trainjob_problem(schema: dict[str, Any] | None) -> str | None:
    """Why the API server's OpenAPI v3 document for trainer.kubeflow.org/v1alpha1 (None: the
    group is not served) rules TrainJobs out; None when they can be used."""
    if schema is None:
        return "Kubeflow Trainer v2 is not installed (no trainer.kubeflow.org/v1alpha1 API)"
    for definition in (schema.get("components") or {}).get("schemas", {}).values():
        kinds = definition.get("x-kubernetes-group-version-kind") or []
        if any(k.get("kind") == names.TRAINJOB_KIND for k in kinds):
            spec = (definition.get("properties") or {}).get("spec") or {}
            spec = _resolve(schema, spec)
            if "runtimePatches" in (spec.get("properties") or {}):
                return None
            return ("Kubeflow Trainer v2 is older than 2.2 (its TrainJob has no "
                    "spec.runtimePatches): upgrade it to 2.2 or later")
    return "Kubeflow Trainer v2 serves no TrainJob kind"


def _resolve(schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    """Follow one `$ref` (or `allOf: [$ref]`) to its definition in the same document."""
    ref = node.get("$ref") or next((x.get("$ref") for x in node.get("allOf") or []), None)
    if not ref:
        return node
    return (schema.get("components") or {}).get("schemas", {}).get(ref.rsplit("/", 1)[-1], {})


class Detector:
    """Trainer v2's availability, looked up at most once a minute (every new run asks)."""

    def __init__(self) -> None:
        self._seen: tuple[float, str | None] | None = None
        self._lock = threading.Lock()

    def trainjob_problem(self, read: Any) -> str | None:
        """`read()`: the OpenAPI v3 document of Trainer v2's API group, or None (404)."""
        with self._lock:
            if self._seen and time.monotonic() - self._seen[0] < CACHE_SECONDS:
                return self._seen[1]
        problem = trainjob_problem(read())
        with self._lock:
            self._seen = (time.monotonic(), problem)
        return problem


def choose(run: Codistillation, applied: str | None, problem: Any) -> str:
    """The backend of `run`: the one its jobs were created with, else the requested one, with
    `auto` resolved; `problem()` says why TrainJobs cannot be used (None: they can).

    Raises Unavailable when an explicit `trainjob` cannot run here."""
    if applied:
        return applied
    wanted = run.spec.backend
    if wanted == "pytorchjob":
        return wanted
    why = problem()
    if why is None:
        return "trainjob"
    if wanted == "trainjob":
        raise Unavailable("BackendUnavailable", f"spec.backend: trainjob: {why}")
    return "pytorchjob"
