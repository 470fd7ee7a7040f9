"""The final report: every group on the same eval set, their ensemble, and the churn between them.

The paper's two claims are measured here: codistilled groups reach the ensemble's quality in one
model (compare each group's eval loss with the ensemble's), and they agree with each other far more
than independently trained models (churn: how often and how much two groups' predictions differ).
The maths is in small pure functions over probability tensors so it can be tested on hand-made
numbers; `evaluate` only runs the models and feeds them in. `write_report` is the end of a run:
written by whichever group finishes last (each group writes its `final.json` before looking, so
at least one of them sees all), or on demand by `codistill report RUN`.
"""

from __future__ import annotations

import io
import itertools
from typing import Any

import torch
from matplotlib.figure import Figure
from torch import nn

from codistill import names
from codistill.runfolder import Progress, Report, RunFolder
from codistill.spec import Codistillation

from . import tables
from .exchange import teacher_channel, weights_from_bytes
from .tasks import resolve
from .tasks.base import Batch, Task

# Keys of a progress.json copied into report.json, as a record of how each group's training ended.
TRAINING_KEYS = ("step", "steps", "state", "loss", "evalLoss", "evalAccuracy", "resumedFrom")


def accuracy(probs: torch.Tensor, targets: torch.Tensor) -> float:
    """Fraction of rows whose most probable class is the target."""
    return (probs.argmax(dim=1) == targets).float().mean().item()


def nll(probs: torch.Tensor, targets: torch.Tensor) -> float:
    """Cross-entropy of probabilities (not logits): the ensemble's loss is defined on its mean
    probabilities, so it cannot go through `cross_entropy`. Clamped so a zero gives a large loss
    instead of inf."""
    picked = probs.gather(1, targets.reshape(-1, 1)).clamp_min(1e-12)
    return -picked.log().mean().item()


def ensemble(probs: list[torch.Tensor]) -> torch.Tensor:
    """The ensemble's prediction: the mean of the members' class probabilities."""
    return torch.stack(probs).mean(dim=0)


def churn(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """How two models' predictions differ on the same examples.

    `flip`: the fraction of examples whose top class differs (prediction churn in the paper).
    `mad`: mean absolute difference of the probabilities over examples and classes; for a binary
    task with columns [1-p, p] both columns differ by |p_a - p_b|, so it equals mean |p_a - p_b|.
    """
    flip = (a.argmax(dim=1) != b.argmax(dim=1)).float().mean().item()
    mad = (a - b).abs().mean().item()
    return {"flip": flip, "mad": mad}


def pairwise_churn(probs: dict[int, torch.Tensor]) -> dict[str, Any]:
    """Churn for every pair of groups and its mean over pairs."""
    pairs = [
        {"a": a, "b": b, **churn(probs[a], probs[b])}
        for a, b in itertools.combinations(sorted(probs), 2)
    ]
    mean = {k: sum(p[k] for p in pairs) / len(pairs) for k in ("flip", "mad")}
    return {"pairs": pairs, "mean": mean}


@torch.no_grad()
def predict(task: Task, model: nn.Module, batches: list[Batch]) -> tuple[float, torch.Tensor]:
    """The model's task loss averaged over `batches` and its class probabilities (N, C) on CPU.

    Runs in eval mode (no dropout) and restores the model's previous mode afterwards.
    """
    was_training = model.training
    model.eval()
    try:
        losses, probs = [], []
        for batch in batches:
            output = task.forward(model, batch)
            losses.append(task.loss(output, batch).item())
            probs.append(task.logits(output).float().softmax(dim=1).cpu())
    finally:
        model.train(was_training)
    return sum(losses) / len(losses), torch.cat(probs)


def evaluate(task: Task, models: dict[int, nn.Module], batches: list[Batch]) -> dict[str, Any]:
    """Per-group loss and accuracy, the ensemble and pairwise churn on the same eval batches.

    The result is plain JSON (lists, not int-keyed maps) in the shape of `runfolder.Report`, so
    `report.json` read back renders the same. With one group, `ensemble` and `churn` are None.
    """
    if not models or not batches:
        raise ValueError("evaluate: need at least one model and one eval batch")
    targets = torch.cat([task.targets(b).cpu() for b in batches])
    probs: dict[int, torch.Tensor] = {}
    groups = []
    for g in sorted(models):
        loss, probs[g] = predict(task, models[g], batches)
        groups.append({"group": g, "loss": loss, "accuracy": accuracy(probs[g], targets)})
    result: dict[str, Any] = {
        "examples": len(targets),
        "groups": groups,
        "ensemble": None,
        "churn": None,
    }
    if len(models) > 1:
        mean = ensemble(list(probs.values()))
        result["ensemble"] = {"loss": nll(mean, targets), "accuracy": accuracy(mean, targets)}
        result["churn"] = pairwise_churn(probs)
    return result


def curves(result: Report, progress: dict[int, Progress | None]) -> bytes:
    """PNG of train and eval loss against step per group, with the ensemble's final eval loss.

    Uses a bare `Figure` (Agg canvas, no pyplot): no global state and no display needed.
    """
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    train_ax, eval_ax = fig.subplots(1, 2, sharey=True)
    for g in sorted(progress):
        history = progress[g].history if progress[g] else []
        train = [(h["step"], h["loss"]) for h in history if h.get("loss") is not None]
        evals = [(h["step"], h["evalLoss"]) for h in history if h.get("evalLoss") is not None]
        if train:
            train_ax.plot(*zip(*train), label=f"group {g}", color=f"C{g % 10}")
        if evals:
            eval_ax.plot(*zip(*evals), marker="o", label=f"group {g}", color=f"C{g % 10}")
    if result.ensemble:
        eval_ax.axhline(result.ensemble.loss, color="black", linestyle="--",
                        label="ensemble (final)")
    for ax, title in ((train_ax, "train loss"), (eval_ax, "eval loss")):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def markdown(result: Report) -> str:
    """The report table (the same rows as the terminal's) as a markdown table."""
    lines = [tables.REPORT_HEADER, ["---"] * len(tables.REPORT_HEADER), *tables.report_rows(result)]
    table = "\n".join("| " + " | ".join(row) + " |" for row in lines)
    return f"# Codistillation report\n\nEval set: {result.examples} examples.\n\n{table}\n"


def write(folder: RunFolder, result: dict[str, Any], progress: dict[int, Progress | None]) -> None:
    """Write report.json, curves.png and summary.md under `report/` in the run folder."""
    training = [
        {"group": g, **{k: v for k, v in (progress[g] or Progress()).dump().items()
                        if k in TRAINING_KEYS}}
        for g in sorted(progress)
    ]
    report = Report.model_validate({**result, "training": training})
    folder.write_report(report, curves(report, progress), markdown(report))


def final_models(folder: RunFolder, run: Codistillation, task: Task) -> dict[int, nn.Module] | None:
    """Each group's final published model (verified), or None while a group is unfinished."""
    models = {}
    for g in range(run.spec.groups):
        final = folder.final(g)
        pointer = final.pointer(folder.where(names.final_file(g))) if final else None
        if pointer is None:
            return None
        weights = weights_from_bytes(teacher_channel(folder.bucket, g).fetch(pointer), pointer.key)
        model = task.model()
        model.load_state_dict(weights)
        models[g] = model.eval()
    return models


def write_report(folder: RunFolder, run: Codistillation) -> bool:
    """Write `report/` if every group has finished; False if some group has not."""
    task = resolve(run.spec.task.name, run.spec.task.args)
    models = final_models(folder, run, task)
    if models is None:
        return False
    t = run.spec.training
    result = evaluate(task, models, task.eval_data(t.batch_size, t.eval_batches))
    write(folder, result, tables.load_progress(folder, run.spec.groups))
    return True
