"""Top-k forward KL (SPEC §2.2 outliers, and the standalone `topk_fkl` negative control).

References are written from the definition `sum_v pi_T(v) (log pi_T(v) - log pi_S(v))`
over the whole vocabulary, or over the teacher's k most likely tokens picked by sorting.
"""

from __future__ import annotations

import pytest
import torch

from tropd.objectives import estimators, get_objective

from .enumeration import V, full_forward_kl, one_position


def _topk(teacher_logits: torch.Tensor, k: int) -> list[int]:
    probs = torch.softmax(teacher_logits.double(), -1).tolist()
    return sorted(range(len(probs)), key=lambda v: -probs[v])[:k]


def _partial_forward_kl(theta, teacher_logits, ids) -> torch.Tensor:
    """sum over `ids` of pi_T(v) (lpT_v - lpS_v), full-vocabulary log-probs (no renorm)."""
    lp_s = torch.log_softmax(theta.double(), -1)
    lp_t = torch.log_softmax(teacher_logits.double(), -1)
    return sum(lp_t[v].exp() * (lp_t[v] - lp_s[v]) for v in ids)


@pytest.fixture
def student_teacher(seeded):
    theta = torch.randn(V, dtype=torch.float64, generator=seeded).requires_grad_()
    teacher = 2.0 * torch.randn(V, dtype=torch.float64, generator=seeded)
    return theta, teacher


def _estimator(theta, teacher, ids, floor=-30.0):
    """Call `estimators.topk_forward_kl` on one position `[1, 1, V]`."""
    lp_t = torch.log_softmax(teacher.double(), -1)
    ids_t = torch.tensor(ids).view(1, 1, -1)
    return estimators.topk_forward_kl(theta.view(1, 1, -1), ids_t, lp_t[ids_t], floor)


def test_full_k_is_the_forward_kl(student_teacher) -> None:
    theta, teacher = student_teacher
    kl, floor_hits = _estimator(theta, teacher, _topk(teacher, V))
    reference = full_forward_kl(theta, teacher)
    assert kl.item() == pytest.approx(reference.item(), rel=1e-5, abs=1e-7)
    assert floor_hits.item() == 0.0

    (grad,) = torch.autograd.grad(kl.sum(), theta)
    (grad_reference,) = torch.autograd.grad(reference, theta)
    torch.testing.assert_close(grad, grad_reference, atol=1e-6, rtol=1e-5)
    # closed form: d KL(pi_T || pi_S) / d theta = pi_S - pi_T
    closed = torch.softmax(theta.detach(), -1) - torch.softmax(teacher, -1)
    torch.testing.assert_close(grad, closed, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_partial_k_sums_over_the_teacher_top_k(student_teacher, k: int) -> None:
    theta, teacher = student_teacher
    ids = _topk(teacher, k)
    kl, _ = _estimator(theta, teacher, ids)
    reference = _partial_forward_kl(theta, teacher, ids)
    assert kl.item() == pytest.approx(reference.item(), rel=1e-5, abs=1e-7)
    (grad,) = torch.autograd.grad(kl.sum(), theta)
    (grad_reference,) = torch.autograd.grad(reference, theta)
    torch.testing.assert_close(grad, grad_reference, atol=1e-6, rtol=1e-5)
    # the order of the ids within the top-k does not matter
    kl_reversed, _ = _estimator(theta, teacher, ids[::-1])
    assert kl_reversed.item() == pytest.approx(kl.item(), rel=1e-6)


def test_floor_clamps_value_and_blocks_gradient() -> None:
    floor = -30.0
    theta = torch.tensor([2.0, 1.0, 0.0, -60.0, -1.0], dtype=torch.float64).requires_grad_()
    teacher = torch.tensor([1.0, 0.5, 0.0, 0.8, -3.0], dtype=torch.float64)
    ids = _topk(teacher, 3)
    floored_token = 3
    assert floored_token in ids
    lp_s = torch.log_softmax(theta.detach(), -1)
    assert lp_s[floored_token] < floor

    kl, floor_hits = _estimator(theta, teacher, ids, floor)
    lp_t = torch.log_softmax(teacher, -1)
    free = [v for v in ids if v != floored_token]
    expected = _partial_forward_kl(theta, teacher, free) + lp_t[floored_token].exp() * (
        lp_t[floored_token] - floor
    )
    assert kl.item() == pytest.approx(expected.item(), rel=1e-5)
    assert floor_hits.item() == pytest.approx(1 / 3)

    (grad,) = torch.autograd.grad(kl.sum(), theta)
    (grad_reference,) = torch.autograd.grad(_partial_forward_kl(theta, teacher, free), theta)
    torch.testing.assert_close(grad, grad_reference, atol=1e-6, rtol=1e-5)


def test_zero_mass_teacher_entry_contributes_nothing(student_teacher) -> None:
    """A top-k entry the teacher gives probability 0 (log-prob -inf, e.g. a masked
    vocabulary id) adds 0 * log 0 = 0 to the forward KL, not NaN."""
    theta, teacher = student_teacher
    ids = torch.tensor(_topk(teacher, V)).view(1, 1, -1)
    lp_t = torch.log_softmax(teacher, -1)[ids].clone()
    lp_t[..., -1] = float("-inf")
    kl, _ = estimators.topk_forward_kl(theta.view(1, 1, -1), ids, lp_t, -30.0)
    reference = _partial_forward_kl(theta, teacher, ids[0, 0, :-1].tolist())
    assert torch.isfinite(kl).all()
    assert kl.item() == pytest.approx(reference.item(), rel=1e-5)
    (grad,) = torch.autograd.grad(kl.sum(), theta)
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("k", [V, 2])
def test_topk_fkl_method_trains_every_student_token(student_teacher, k: int) -> None:
    theta, teacher = student_teacher
    case = one_position(theta, teacher, k=k)
    out = get_objective("topk_fkl")(case.logits, case.batch)
    reference = _partial_forward_kl(theta, teacher, _topk(teacher, k))
    # Every row is a student token at position 1 with the same top-k: same value everywhere.
    torch.testing.assert_close(
        out.token_loss[:, 1].double(), reference.detach().expand(V), rtol=1e-5, atol=1e-7
    )
    assert torch.equal(out.token_loss[:, 0], torch.zeros(V))  # prompt position
    assert out.loss.item() == pytest.approx(reference.item(), rel=1e-5)  # token_mean of equals
    (grad,) = torch.autograd.grad(out.loss, theta)
    (grad_reference,) = torch.autograd.grad(reference, theta)
    torch.testing.assert_close(grad, grad_reference, atol=1e-6, rtol=1e-5)
    assert out.metrics["floor_fraction"] == 0.0


def test_topk_fkl_method_reports_floor_fraction() -> None:
    theta = torch.tensor([2.0, 1.0, 0.0, -60.0, -1.0], dtype=torch.float64).requires_grad_()
    teacher = torch.tensor([1.0, 0.5, 0.0, 0.8, -3.0], dtype=torch.float64)
    case = one_position(theta, teacher)  # k = V = 5, token 3 below the floor
    out = get_objective("topk_fkl", logprob_floor=-30.0)(case.logits, case.batch)
    assert out.metrics["floor_fraction"] == pytest.approx(1 / V)
    # with a floor below every student log-prob nothing binds
    loose = get_objective("topk_fkl", logprob_floor=-1000.0)(case.logits, case.batch)
    assert loose.metrics["floor_fraction"] == 0.0
    reference = full_forward_kl(theta, teacher)
    assert loose.loss.item() == pytest.approx(reference.item(), rel=1e-5)
