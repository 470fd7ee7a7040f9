"""The codistillation loss, exactly as the paper states it (pure maths, tested alone).

    loss = task_loss + weight * psi(mean_j teacher_j(x), student(x))     after burn-in
    loss = task_loss                                                     before, or with no teacher

With more than two models the paper averages the teachers' *predictions* (not their losses).
Whether a step distills at all (burn-in) is the loop's decision (`loop.distills`): a step that
does not passes no teachers here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F


def tempered(z: torch.Tensor, temperature: float) -> torch.Tensor:
    z = z.float()
    return z if temperature == 1.0 else z / temperature


def target(teacher_logits: Sequence[torch.Tensor], temperature: float
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """The teachers' averaged predicted distribution at `temperature`, and its log. (From
    log_softmax for one teacher; for several, the log of the mean with zeros floored, whose
    terms p log p are then 0 as they should be. torch.xlogy would do it in one op, at 5x the
    cost of log_softmax on a CPU: a third of the term's time.)"""
    if len(teacher_logits) == 1:
        log_p = F.log_softmax(tempered(teacher_logits[0], temperature), dim=-1)
        return log_p.exp(), log_p
    p = torch.stack([F.softmax(tempered(z, temperature), dim=-1) for z in teacher_logits]).mean(0)
    return p, p.clamp_min(torch.finfo(p.dtype).tiny).log()


def teacher_probs(teacher_logits: Sequence[torch.Tensor], temperature: float) -> torch.Tensor:
    """The teachers' averaged predicted distributions at `temperature`."""
    return target(teacher_logits, temperature)[0]


class _TemperedKL(torch.autograd.Function):
    """T^2 KL(p || softmax(s / T)) summed and divided by s.shape[0] (kl_div's "batchmean"), for
    a fixed target p. Its gradient has a closed form, T (softmax(s / T) - p) / n, so the backward
    is one pass over the logits where autograd would go back through kl_div and log_softmax."""

    @staticmethod
    def forward(ctx: Any, student: torch.Tensor, p: torch.Tensor, log_p: torch.Tensor,
                temperature: float) -> torch.Tensor:
        log_q = F.log_softmax(tempered(student, temperature), dim=-1)
        n = student.shape[0]
        kl = (p * (log_p - log_q)).sum() * (temperature**2 / n)
        ctx.save_for_backward(log_q, p)
        ctx.scale, ctx.dtype = temperature / n, student.dtype
        return kl

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        log_q, p = ctx.saved_tensors
        return ((log_q.exp() - p) * (grad * ctx.scale)).to(ctx.dtype), None, None, None


def kl_loss(student: torch.Tensor, teachers: Sequence[torch.Tensor], temperature: float) -> torch.Tensor:
    """KL(mean teacher distribution || student distribution), both tempered, scaled by T^2
    (Hinton et al.) so the gradient's size does not shrink as the temperature grows."""
    p, log_p = (t.detach() for t in target(teachers, temperature))
    return _TemperedKL.apply(student, p, log_p, temperature)


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
