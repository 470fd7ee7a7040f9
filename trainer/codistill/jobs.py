"""A run's groups as Kubeflow jobs, by backend: what the operator creates and `codistill render`
prints (PyTorchJobs are also what `codistill run` runs locally)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from . import pytorchjob, trainjob
from .spec import Codistillation

RENDER: dict[str, Callable[[Codistillation, str], list[dict[str, Any]]]] = {
    "pytorchjob": pytorchjob.render_jobs,
    "trainjob": trainjob.render_jobs,
}


def unsupported(run: Codistillation, backend: str) -> list[str]:
    """`field: why` for each setting of `run` that `backend`'s jobs cannot carry."""
    return trainjob.unsupported(run) if backend == "trainjob" else []
