"""Turn `spec.task` into a Task: a built-in name, or a user's `pkg.module:factory`.

Errors are spec errors: they name `spec.task.name` or `spec.task.args` and what was expected, so a
typo in a manifest fails before any training starts rather than deep inside a pod.

An import path is imported only when allowed: by the caller (a manifest the user gave), or by
`CODISTILL_TASKS` in the environment (the image's, or the job's, which the operator renders from
the Codistillation). The run.json that trainers and `codistill report` read comes from a shared
bucket, and whoever can write there must not be able to import and call anything.
"""

from __future__ import annotations

import importlib
import inspect
import os
from collections.abc import Callable, Collection
from typing import Any

from codistill.names import ENV_TASKS
from codistill.spec import SpecError
from codistill_trainer.tasks.base import Batch, Task, TrainData

BUILTINS = {
    "lm": "codistill_trainer.tasks.lm:LanguageModel",
    "ctr": "codistill_trainer.tasks.ctr:ClickThrough",
}

__all__ = ["BUILTINS", "Batch", "Task", "TrainData", "int_arg", "resolve"]


def allowed(name: str, allow: Collection[str] = ()) -> bool:
    """Whether `name` is built in, allowed by the caller, or listed in $CODISTILL_TASKS."""
    listed = {t.strip() for t in os.environ.get(ENV_TASKS, "").split(",")}
    return name in BUILTINS or name in allow or name in listed


def resolve(name: str, args: dict[str, Any], allow: Collection[str] = ()) -> Task:
    """The Task that `spec.task` names, built with `args` as keyword arguments."""
    if ":" in name and not allowed(name, allow):
        raise SpecError(
            f"spec.task.name: {name!r} is not a built-in task and {ENV_TASKS} does not allow "
            f"it; set {ENV_TASKS}={name} in the trainer's environment (image or pod template) "
            "to import it"
        )
    factory = _factory(BUILTINS.get(name, name))
    try:
        inspect.signature(factory).bind(**args)
    except TypeError as e:
        raise SpecError(f"spec.task.args: do not fit the arguments of {name}: {e}") from None
    except ValueError:  # no introspectable signature (some builtins): let the call decide
        pass
    task = factory(**args)
    if not isinstance(task, Task):
        raise SpecError(
            f"spec.task.name: {name} returned {type(task).__name__}, expected an instance of "
            f"codistill_trainer.tasks.Task"
        )
    return task


def int_arg(name: str, value: Any, minimum: int) -> int:
    """`value` of task argument `name` as an int >= minimum, or a SpecError naming the argument."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise SpecError(f"spec.task.args.{name}: expected an integer >= {minimum}, got {value!r}")
    return value


def _factory(path: str) -> Callable[..., Any]:
    """Import `pkg.module:factory`; every failure names spec.task.name and what was expected."""
    module_name, sep, attr = path.partition(":")
    if not sep:
        raise SpecError(
            f"spec.task.name: expected a built-in task ({', '.join(BUILTINS)}) or an import "
            f"path 'pkg.module:factory', got {path!r}"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise SpecError(
            f"spec.task.name: cannot import module {module_name!r} ({e}); install the package "
            f"that provides it in the trainer image"
        ) from None
    factory = module
    for part in attr.split("."):
        factory = getattr(factory, part, None)
        if factory is None:
            raise SpecError(f"spec.task.name: module {module_name!r} has no attribute {attr!r}")
    if not callable(factory):
        raise SpecError(f"spec.task.name: {path} is not callable; expected a Task factory")
    return factory
