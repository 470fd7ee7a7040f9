"""The codistillation loss as the paper states it."""

import pytest
import torch
import torch.nn.functional as F

from codistill.spec import Distillation
from codistill_trainer.distill import codistill_loss, distill_loss, teacher_probs
from codistill_trainer.loop import distills


def test_teacher_predictions_are_averaged_not_their_losses():
    a, b = torch.tensor([[4.0, 0.0]]), torch.tensor([[0.0, 4.0]])
    probs = teacher_probs([a, b], temperature=1.0)
    assert torch.allclose(probs, torch.tensor([[0.5, 0.5]]))
    student = torch.tensor([[0.0, 0.0]])  # predicts exactly the averaged distribution
    assert distill_loss(student, [a, b], 1.0).item() < 1e-7
    # averaging the divergences instead would not be zero here
    assert (distill_loss(student, [a], 1.0) + distill_loss(student, [b], 1.0)).item() > 0.1


def test_kl_equals_cross_entropy_minus_teacher_entropy_scaled_by_t_squared():
    torch.manual_seed(0)
    s, t, T = torch.randn(5, 7), torch.randn(5, 7), 3.0
    p = F.softmax(t / T, -1)
    ce = -(p * F.log_softmax(s / T, -1)).sum(-1).mean()
    ent = -(p * p.log()).sum(-1).mean()
    assert torch.allclose(distill_loss(s, [t], T), (ce - ent) * T**2, atol=1e-5)


def test_temperature_softens_the_target():
    t = torch.tensor([[5.0, 0.0, 0.0]])
    assert teacher_probs([t], 10.0).max() < teacher_probs([t], 1.0).max()


def test_mse_on_logits_uses_mean_teacher_logits():
    s = torch.zeros(1, 2)
    loss = distill_loss(s, [torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 2.0]])], 1.0, "mse")
    assert torch.isclose(loss, torch.tensor(1.0))


def _args(**kw):
    base = dict(weight=0.5, temperature=1.0)
    return {**base, **kw}


def test_burn_in_and_no_teachers_give_plain_task_loss():
    rules = Distillation(burn_in_steps=5, weight=0.5)
    assert not distills(4, rules)  # burning in: the loop runs no teacher, so passes none
    assert not distills(10, Distillation(weight=0))
    task, s = torch.tensor(2.0), torch.randn(3, 4)
    total, term = codistill_loss(task, s, [], **_args())  # groups: 1 == plain training
    assert term is None and total is task


def test_after_burn_in_adds_weighted_term():
    assert distills(5, Distillation(burn_in_steps=5, weight=0.5))
    task, s, t = torch.tensor(2.0), torch.randn(3, 4), [torch.randn(3, 4)]
    total, term = codistill_loss(task, s, t, **_args())
    assert term is not None and term.item() > 0
    assert torch.isclose(total, task + 0.5 * term)


def test_gradient_flows_to_student_only():
    s = torch.randn(3, 4, requires_grad=True)
    t = torch.randn(3, 4, requires_grad=True)
    total, _ = codistill_loss(torch.tensor(0.0), s, [t.detach()], **_args())
    total.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0 and t.grad is None


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
@pytest.mark.parametrize("shape", [(4, 7), (3, 5, 11)])
def test_the_kl_terms_closed_form_gradient_is_autograds(temperature, shape):
    """The term's own backward against autograd through kl_div and log_softmax (the textbook
    formula), on a batch of sequences too, with one and with two teachers."""
    g = torch.Generator().manual_seed(0)
    for n_teachers in (1, 2):
        teachers = [torch.randn(shape, generator=g) * 3 for _ in range(n_teachers)]
        s = (torch.randn(shape, generator=g) * 3).requires_grad_()
        ours = distill_loss(s, teachers, temperature)
        (grad,) = torch.autograd.grad(ours, s)
        s_ref = s.detach().clone().requires_grad_()
        target = torch.stack([F.softmax(t / temperature, -1) for t in teachers]).mean(0)
        ref = F.kl_div(F.log_softmax(s_ref / temperature, -1), target,
                       reduction="batchmean") * temperature**2
        (grad_ref,) = torch.autograd.grad(ref, s_ref)
        assert torch.allclose(ours, ref, atol=1e-5) and torch.allclose(grad, grad_ref, atol=1e-6)
