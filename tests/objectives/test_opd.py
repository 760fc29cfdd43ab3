"""OPD (SPEC §1): the sampled K1 loss is an unbiased estimator of the reverse KL.

Expectations over the sampler are exact sums over the enumerated vocabulary, and the
reference is the reverse KL written from its definition over the full distribution.
"""

from __future__ import annotations

import math

import pytest
import torch

from tropd.objectives import get_objective

from .enumeration import (
    V,
    full_reverse_kl,
    grad_logprob,
    one_position,
    two_positions,
)


def expected_token_loss(token_loss: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """E_{x ~ q}[sum of a row's token losses] over the enumerated rows."""
    return (q * token_loss.double().sum(-1)).sum()


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("kl_coef", [1.0, 0.25])
def test_expected_gradient_is_reverse_kl_gradient(seed: int, kl_coef: float) -> None:
    gen = torch.Generator().manual_seed(seed)
    theta = torch.randn(V, dtype=torch.float64, generator=gen).requires_grad_()
    teacher = 2.0 * torch.randn(V, dtype=torch.float64, generator=gen)
    case = one_position(theta, teacher)

    out = get_objective("opd", kl_coef=kl_coef)(case.logits, case.batch)
    expected_loss = expected_token_loss(out.token_loss, case.q)
    (grad,) = torch.autograd.grad(expected_loss, theta)

    reverse_kl = full_reverse_kl(theta, teacher)
    (reference,) = torch.autograd.grad(reverse_kl, theta)
    torch.testing.assert_close(grad, kl_coef * reference, atol=1e-6, rtol=1e-5)
    # The K1 value is unbiased too: E_q[-r] = KL(pi_S || pi_T) when q = pi_S.
    assert expected_loss.item() == pytest.approx(kl_coef * reverse_kl.item(), abs=1e-6)

    # Closed form, as a second independent reference: p * (c - E_p[c]), c = lpS - lpT.
    p = torch.softmax(theta.detach(), -1)
    c = case.student_logprobs - case.teacher_logprobs
    torch.testing.assert_close(grad, kl_coef * p * (c - (p * c).sum()), atol=1e-6, rtol=1e-5)


def test_gradient_is_not_trivially_zero(random_position) -> None:
    """Guard for the tests above: the teacher disagrees, so the KL gradient is sizeable."""
    (reference,) = torch.autograd.grad(
        full_reverse_kl(random_position.theta, random_position.teacher_logits),
        random_position.theta,
    )
    assert reference.abs().max() > 0.05


def _two_token_case(seed: int):
    gen = torch.Generator().manual_seed(seed)
    theta1 = torch.randn(V, dtype=torch.float64, generator=gen).requires_grad_()
    theta2 = torch.randn(V, V, dtype=torch.float64, generator=gen).requires_grad_()
    teacher1 = 2.0 * torch.randn(V, dtype=torch.float64, generator=gen)
    teacher2 = 2.0 * torch.randn(V, V, dtype=torch.float64, generator=gen)
    return two_positions(theta1, theta2, teacher1, teacher2)


@pytest.mark.parametrize("seed", [0, 1])
def test_per_token_estimator_sums_per_position_kl_at_fixed_prefixes(seed: int) -> None:
    """gamma = 0: E[grad] = grad[ KL_1 + sum_x1 sg(pi_S(x1)) KL_2(.|x1) ]."""
    case = _two_token_case(seed)
    out = get_objective("opd", gamma=0.0)(case.logits, case.batch)
    grads = torch.autograd.grad(
        expected_token_loss(out.token_loss, case.q), [case.theta1, case.theta2]
    )

    prefix_prob = torch.softmax(case.theta1.detach(), -1)
    per_position = (
        full_reverse_kl(case.theta1, case.teacher1)
        + (prefix_prob * full_reverse_kl(case.theta2, case.teacher2)).sum()
    )
    references = torch.autograd.grad(per_position, [case.theta1, case.theta2])
    for grad, reference in zip(grads, references, strict=True):
        torch.testing.assert_close(grad, reference, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("seed", [0, 1])
def test_undiscounted_return_gives_sequence_kl_gradient(seed: int) -> None:
    """gamma = 1: reward-to-go makes the estimator the gradient of the sequence-level
    KL(pi_S(x1, x2) || pi_T(x1, x2)), including the prefix term that gamma = 0 drops."""
    case = _two_token_case(seed)
    out = get_objective("opd", gamma=1.0)(case.logits, case.batch)
    grads = torch.autograd.grad(
        expected_token_loss(out.token_loss, case.q), [case.theta1, case.theta2]
    )

    lp_s = torch.log_softmax(case.theta1, -1)[:, None] + torch.log_softmax(case.theta2, -1)
    lp_t = torch.log_softmax(case.teacher1, -1)[:, None] + torch.log_softmax(case.teacher2, -1)
    sequence_kl = (lp_s.exp() * (lp_s - lp_t)).sum()
    references = torch.autograd.grad(sequence_kl, [case.theta1, case.theta2])
    for grad, reference in zip(grads, references, strict=True):
        torch.testing.assert_close(grad, reference, atol=1e-6, rtol=1e-5)

    per_token = get_objective("opd", gamma=0.0)(case.logits, case.batch)
    (grad_per_token,) = torch.autograd.grad(
        expected_token_loss(per_token.token_loss, case.q), case.theta1
    )
    assert (grad_per_token - grads[0]).abs().max() > 1e-3  # the future term is really there


def _stale_token(ratio: float, reward: float):
    """One student token whose importance ratio and reward are set exactly."""
    theta = torch.zeros(V, dtype=torch.float64).requires_grad_()
    token = 3
    lp_student = -math.log(V)
    lq = lp_student - math.log(ratio)
    case = one_position(theta, torch.zeros(V))
    batch = case.batch.select(slice(token, token + 1))
    batch.sampler_logprobs[0, 1] = lq
    batch.teacher_logprobs[0, 1] = lq + reward
    return theta, case.logits[token : token + 1], batch, token


@pytest.mark.parametrize("name", ["opd", "tropd"])
@pytest.mark.parametrize(
    ("ratio", "reward"),
    [(1.5, 0.7), (0.5, -0.7)],  # ratio beyond 1 + eps with A > 0, below 1 - eps with A < 0
)
def test_ppo_clip_zeroes_gradient_outside_the_trust_interval(name, ratio, reward) -> None:
    theta, logits, batch, _ = _stale_token(ratio, reward)
    if name == "tropd":
        batch = batch.replace(trust_mask=torch.ones_like(batch.tokens, dtype=torch.bool))
    out = get_objective(name, ppo_clip=0.2)(logits, batch)
    (grad,) = torch.autograd.grad(out.loss, theta)
    assert torch.equal(grad, torch.zeros_like(grad))
    clipped_ratio = min(max(ratio, 0.8), 1.2)
    assert out.token_loss[0, 1].item() == pytest.approx(-clipped_ratio * reward, rel=1e-5)


@pytest.mark.parametrize("name", ["opd", "tropd"])
@pytest.mark.parametrize(
    ("ratio", "reward"),
    [(1.1, 0.7), (0.9, -0.7), (1.5, -0.7), (0.5, 0.7)],  # inside, or clip not binding
)
def test_ppo_clip_keeps_gradient_where_it_does_not_bind(name, ratio, reward) -> None:
    theta, logits, batch, token = _stale_token(ratio, reward)
    if name == "tropd":
        batch = batch.replace(trust_mask=torch.ones_like(batch.tokens, dtype=torch.bool))
    out = get_objective(name, ppo_clip=0.2)(logits, batch)
    (grad,) = torch.autograd.grad(out.loss, theta)
    torch.testing.assert_close(
        grad, -ratio * reward * grad_logprob(theta, token), rtol=1e-5, atol=1e-7
    )
