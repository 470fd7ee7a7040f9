"""The codistillation loss, exactly as the paper states it (pure maths, tested alone).

    loss = task_loss + weight * psi(mean_j teacher_j(x), student(x))     after burn-in
    loss = task_loss                                                     before, or with no teacher

With more than two models the paper averages the teachers' *predictions* (not their losses).
Whether a step distills at all (burn-in) is the loop's decision (`loop.distills`): a step that
does not passes no teachers here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def teacher_probs(teacher_logits: Sequence[torch.Tensor], temperature: float) -> torch.Tensor:
    """The teachers' averaged predicted distributions at `temperature`."""
    probs = [F.softmax(z.float() / temperature, dim=-1) for z in teacher_logits]
    return torch.stack(probs).mean(dim=0)


def kl_loss(student: torch.Tensor, teachers: Sequence[torch.Tensor], temperature: float) -> torch.Tensor:
    """KL(mean teacher distribution || student distribution), both tempered, scaled by T^2
    (Hinton et al.) so the gradient's size does not shrink as the temperature grows."""
    target = teacher_probs(teachers, temperature)
    log_student = F.log_softmax(student.float() / temperature, dim=-1)
    kl = F.kl_div(log_student, target, reduction="batchmean")
    return kl * temperature**2


def mse_loss(student: torch.Tensor, teachers: Sequence[torch.Tensor]) -> torch.Tensor:
    """Squared error between the student's logits and the teachers' mean logits (the paper's
    alternative psi)."""
    target = torch.stack([z.float() for z in teachers]).mean(dim=0)
    return F.mse_loss(student.float(), target)


def distill_loss(
    student: torch.Tensor, teachers: Sequence[torch.Tensor], temperature: float, kind: str = "kl"
) -> torch.Tensor:
    if kind == "kl":
        return kl_loss(student, teachers, temperature)
    if kind == "mse":
        return mse_loss(student, teachers)
    raise ValueError(f"distillation.loss: expected 'kl' or 'mse', got {kind!r}")


def codistill_loss(
    task_loss: torch.Tensor,
    student_logits: torch.Tensor,
    teacher_logits: Sequence[torch.Tensor],
    *,
    weight: float,
    temperature: float,
    kind: str = "kl",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(total loss, distillation term or None). No teachers: the task loss alone, which with
    `groups: 1` makes the step plain data-parallel training."""
    if not teacher_logits:
        return task_loss, None
    term = distill_loss(student_logits, teacher_logits, temperature, kind)
    return task_loss + weight * term, term
