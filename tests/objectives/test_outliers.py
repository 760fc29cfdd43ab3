"""Outlier strategies at the static threshold (SPEC §2.3-2.4): `mask` drops tokens with
r_t <= tau, `clip` trains them with the reward replaced by tau (REOPOLD's max(r_t, tau)).
"""

from __future__ import annotations

import math

import pytest
import torch

from tropd.batch import PROMPT, STUDENT, TokenBatch
from tropd.objectives import get_objective

from .enumeration import V, grad_logprob

TAU_DEFAULT = math.log(0.2 / 0.8)
EPS = 1e-3


def rows_with_rewards(rewards: list[float], ratio_shift: float = 0.3):
    """One student token per row with reward `rewards[b]` exactly and ratio != 1.

    Each row has its own student logits `theta[b]` (so gradients separate by row); the
    sampler's log-prob is the student's minus `ratio_shift` (ratio = e^0.3).
    """
    rows = len(rewards)
    gen = torch.Generator().manual_seed(0)
    theta = torch.randn(rows, V, dtype=torch.float64, generator=gen).requires_grad_()
    x = torch.arange(rows) % V
    lp_student = torch.log_softmax(theta.detach(), -1)[torch.arange(rows), x]
    lq = lp_student - ratio_shift
    lpt = lq + torch.tensor(rewards, dtype=torch.float64)
    zero = torch.zeros(rows, dtype=torch.float64)
    batch = TokenBatch(
        tokens=torch.stack([torch.zeros_like(x), x], 1),
        origin=torch.tensor([PROMPT, STUDENT]).expand(rows, 2).clone(),
        sampler_logprobs=torch.stack([zero, lq], 1),
        teacher_logprobs=torch.stack([zero, lpt], 1),
    )
    logits = torch.stack([torch.zeros(rows, V, dtype=torch.float64), theta], 1)
    ratio = torch.exp(lp_student - lq)
    return theta, logits, batch, x, ratio


def per_row_gradient(theta, x, ratio, reward) -> torch.Tensor:
    """d/d theta[b] of -ratio_b * reward_b (constant) * lpS_b: the policy-gradient step."""
    return torch.stack(
        [-ratio[b] * reward[b] * grad_logprob(theta[b], int(x[b])) for b in range(len(x))]
    )


def _objectives(strategy: str, tau: float):
    preset = {"mask": "mask_outlier", "clip": "clip_outlier"}[strategy]
    yield get_objective("tropd", trust_gate="threshold", outlier=strategy, tau=tau)
    yield get_objective(preset, tau=tau)
    if tau == TAU_DEFAULT:
        yield get_objective(preset)


def test_presets_default_to_threshold_gate_and_reopold_tau() -> None:
    for name, outlier in [("mask_outlier", "mask"), ("clip_outlier", "clip")]:
        options = get_objective(name).options
        assert options["trust_gate"] == "threshold"
        assert options["outlier"] == outlier
        assert options["tau"] == pytest.approx(TAU_DEFAULT, abs=1e-12)


@pytest.mark.parametrize("strategy", ["mask", "clip"])
@pytest.mark.parametrize("tau", [TAU_DEFAULT, -0.5])
def test_token_just_above_tau_is_trained_with_its_own_reward(strategy: str, tau: float) -> None:
    for objective in _objectives(strategy, tau):
        rewards = [tau + EPS]
        theta, logits, batch, x, ratio = rows_with_rewards(rewards)
        out = objective(logits, batch)
        assert out.token_loss[0, 1].item() == pytest.approx(
            -(ratio[0] * (tau + EPS)).item(), rel=1e-5
        )
        (grad,) = torch.autograd.grad(out.token_loss.sum(), theta)
        expected = per_row_gradient(theta, x, ratio, torch.tensor(rewards, dtype=torch.float64))
        torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-7)
        assert out.metrics["trust_fraction"] == 1.0


@pytest.mark.parametrize("tau", [TAU_DEFAULT, -0.5])
def test_mask_drops_a_token_just_below_tau(tau: float) -> None:
    for objective in _objectives("mask", tau):
        theta, logits, batch, _, _ = rows_with_rewards([tau - EPS, tau - 3.0])
        out = objective(logits, batch)
        assert torch.equal(out.token_loss, torch.zeros_like(out.token_loss))
        (grad,) = torch.autograd.grad(out.loss, theta)
        assert torch.equal(grad, torch.zeros_like(grad))
        assert out.metrics["outlier_fraction"] == 1.0


@pytest.mark.parametrize("tau", [TAU_DEFAULT, -0.5])
def test_clip_trains_a_token_just_below_tau_with_reward_tau(tau: float) -> None:
    for objective in _objectives("clip", tau):
        theta, logits, batch, x, ratio = rows_with_rewards([tau - EPS, tau - 3.0])
        out = objective(logits, batch)
        torch.testing.assert_close(
            out.token_loss[:, 1].double(), (-ratio * tau).detach(), rtol=1e-5, atol=1e-7
        )
        (grad,) = torch.autograd.grad(out.token_loss.sum(), theta)
        expected = per_row_gradient(theta, x, ratio, torch.full((2,), tau, dtype=torch.float64))
        torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-7)


def test_threshold_clip_is_reopold_reward_floor_over_a_range() -> None:
    """threshold + clip trains every token with reward max(r_t, tau)."""
    rewards = [-6.0, -2.0, TAU_DEFAULT, -1.0, -0.1, 0.0, 0.4, 2.0]
    theta, logits, batch, x, ratio = rows_with_rewards(rewards)
    out = get_objective("clip_outlier")(logits, batch)
    floored = torch.tensor(rewards, dtype=torch.float64).clamp(min=TAU_DEFAULT)
    torch.testing.assert_close(
        out.token_loss[:, 1].double(), (-ratio * floored).detach(), rtol=1e-5, atol=1e-7
    )
    (grad,) = torch.autograd.grad(out.token_loss.sum(), theta)
    torch.testing.assert_close(
        grad, per_row_gradient(theta, x, ratio, floored), rtol=1e-5, atol=1e-7
    )


def test_mask_outlier_keeps_only_tokens_strictly_above_tau() -> None:
    rewards = [-6.0, -2.0, -1.0, -0.1, 0.0, 0.4, 2.0]
    _, logits, batch, _, ratio = rows_with_rewards(rewards)
    out = get_objective("mask_outlier")(logits, batch)
    kept = torch.tensor(rewards, dtype=torch.float64) > TAU_DEFAULT
    expected = torch.where(kept, -ratio * torch.tensor(rewards, dtype=torch.float64), 0.0)
    torch.testing.assert_close(
        out.token_loss[:, 1].double(), expected.detach(), rtol=1e-5, atol=1e-7
    )
    assert out.metrics["trust_fraction"] == pytest.approx(float(kept.double().mean()))
