"""The end of a run: once every group has finished, evaluate their final models together.

Written by whichever group finishes last (each group writes its `final.json` before looking, so at
least one of them sees all), or on demand by `codistill report RUN`.
"""

from __future__ import annotations

from torch import nn

from . import layout, report, view
from .exchange import Pointer, teacher_channel, weights_from_bytes
from .spec import Codistillation
from .storage import Bucket
from .tasks import resolve
from .tasks.base import Task


def final_models(bucket: Bucket, run: Codistillation, task: Task) -> dict[int, nn.Module] | None:
    """Each group's final published model (verified), or None while a group is unfinished."""
    models = {}
    for g in range(run.spec.groups):
        final = bucket.get_json(layout.final_file(g))
        if not final or not final.get("teacher"):
            return None
        where = f"{bucket.url}/{layout.final_file(g)}"
        pointer = Pointer.parse(final["teacher"], where)
        weights = weights_from_bytes(teacher_channel(bucket, g).fetch(pointer), pointer.key)
        model = task.model()
        model.load_state_dict(weights)
        models[g] = model.eval()
    return models


def write_report(bucket: Bucket, run: Codistillation) -> bool:
    """Write `report/` if every group has finished; False if some group has not."""
    task = resolve(run.spec.task.name, run.spec.task.args)
    models = final_models(bucket, run, task)
    if models is None:
        return False
    t = run.spec.training
    result = report.evaluate(task, models, task.eval_data(t.batch_size, t.eval_batches))
    report.write(bucket, result, view.load_progress(bucket, run.spec.groups))
    return True
