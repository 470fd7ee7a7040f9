"""Turn `spec.task` into a Task: a built-in name, or a user's `pkg.module:factory`.

Errors are spec errors: they name `spec.task.name` or `spec.task.args` and what was expected, so a
typo in a manifest fails before any training starts rather than deep inside a pod.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any

from codistill.spec import SpecError
from codistill_trainer.tasks.base import Batch, Task, TrainData

BUILTINS = {
    "lm": "codistill_trainer.tasks.lm:LanguageModel",
    "ctr": "codistill_trainer.tasks.ctr:ClickThrough",
}

__all__ = ["BUILTINS", "Batch", "Task", "TrainData", "int_arg", "resolve"]


def resolve(name: str, args: dict[str, Any]) -> Task:
    """The Task that `spec.task` names, built with `args` as keyword arguments."""
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
