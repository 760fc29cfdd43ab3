"""Trust gate (SPEC §2.1): M_t ~ Bernoulli(min(1, pi_T / q)), its soft expectation,
reproducibility from a seed, and a caller-injected mask that overrides sampling.

Probabilities are computed from pi_T and q directly (their ratio), never from the code's
own `exp(clamp(r))`.
"""

from __future__ import annotations

import math

import pytest
import torch

from tropd.batch import PROMPT, STUDENT, TokenBatch
from tropd.objectives import get_objective
from tropd.objectives.routers import trust_weight

from .enumeration import V, full_forward_kl, grad_logprob, one_position

SAMPLER = torch.tensor([1.0, 0.5, 0.0, -0.5, -1.0], dtype=torch.float64)
TEACHER = torch.tensor([-1.0, 0.5, 2.0, -2.0, 0.0], dtype=torch.float64)
STUDENT_NOW = torch.tensor([0.8, 0.7, -0.2, -0.4, -0.9], dtype=torch.float64)  # a step later


def acceptance() -> torch.Tensor:
    """[V] min(1, pi_T(x) / q(x)) for each token x."""
    return (torch.softmax(TEACHER, -1) / torch.softmax(SAMPLER, -1)).clamp(max=1.0)


def stale_case(**fields):
    """Student one step after sampling (ratio != 1), teacher disagreeing both ways."""
    return one_position(STUDENT_NOW.clone().requires_grad_(), TEACHER, SAMPLER, **fields)


def test_fixture_has_both_kinds_of_tokens() -> None:
    p = acceptance()
    assert (p == 1).any() and (p < 0.5).any()


def test_hard_gate_trust_fraction_matches_acceptance_rate() -> None:
    """Sample x ~ q, then the gate: the trust fraction is Binomial(N, E_q[min(1, pT/q)])/N."""
    n = 40_000
    q = torch.softmax(SAMPLER, -1)
    sample_gen = torch.Generator().manual_seed(7)
    x = torch.multinomial(q, n, replacement=True, generator=sample_gen)
    lq = torch.log_softmax(SAMPLER, -1)[x]
    lpt = torch.log_softmax(TEACHER, -1)[x]
    zero = torch.zeros(n, dtype=torch.float64)
    batch = TokenBatch(
        tokens=torch.stack([torch.zeros_like(x), x], 1),
        origin=torch.tensor([PROMPT, STUDENT]).expand(n, 2).clone(),
        sampler_logprobs=torch.stack([zero, lq], 1),
        teacher_logprobs=torch.stack([zero, lpt], 1),
    )
    logits = torch.stack([torch.zeros(V), SAMPLER.float()]).expand(n, 2, V)
    objective = get_objective("tropd", trust_gate="hard", outlier="mask")
    out = objective(logits, batch, generator=torch.Generator().manual_seed(11))

    expected = float((q * acceptance()).sum())
    std = math.sqrt(expected * (1 - expected) / n)
    assert abs(out.metrics["trust_fraction"] - expected) < 5 * std
    assert out.metrics["outlier_fraction"] == pytest.approx(1 - out.metrics["trust_fraction"])


def test_hard_gate_per_token_frequency_is_the_acceptance_probability() -> None:
    draws = 20_000
    reward = (torch.log_softmax(TEACHER, -1) - torch.log_softmax(SAMPLER, -1)).expand(draws, V)
    weight = trust_weight(reward, "hard", tau=-1.0, generator=torch.Generator().manual_seed(3))
    assert set(weight.unique().tolist()) <= {0.0, 1.0}
    frequency = weight.mean(0)
    p = acceptance()
    std = (p * (1 - p) / draws).sqrt()
    assert ((frequency - p).abs() <= 5 * std + 1e-12).all(), (frequency, p)


def test_tokens_the_teacher_likes_at_least_as_much_are_always_trusted() -> None:
    reward = torch.tensor([0.0, 1e-9, 0.3, 5.0, 40.0], dtype=torch.float64).expand(10_000, 5)
    weight = trust_weight(reward, "hard", tau=-1.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(weight, torch.ones_like(weight))


def test_hard_gate_trains_nonnegative_reward_tokens_with_opd_for_every_seed() -> None:
    case = stale_case()
    lpt, lq = case.batch.teacher_logprobs[:, 1], case.batch.sampler_logprobs[:, 1]
    liked = lpt >= lq
    assert liked.any() and not liked.all()
    ratio = torch.exp(case.student_logprobs - lq)
    opd_loss = -ratio * (lpt - lq)
    objective = get_objective("tropd", trust_gate="hard")
    for seed in range(20):
        out = objective(case.logits, case.batch, generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(
            out.token_loss[liked, 1].double(), opd_loss[liked].detach(), rtol=1e-5, atol=1e-7
        )


def test_draws_are_reproducible_from_the_generator_seed() -> None:
    case = stale_case()
    many = torch.arange(V).repeat(200)
    logits, batch = case.logits[many], case.batch.select(many)
    objective = get_objective("tropd", trust_gate="hard")

    def run(seed: int):
        return objective(logits, batch, generator=torch.Generator().manual_seed(seed))

    first, again, other = run(5), run(5), run(6)
    assert torch.equal(first.token_loss, again.token_loss)
    assert first.metrics == again.metrics
    assert not torch.equal(first.token_loss, other.token_loss)

    # without a generator the draw follows the global seed
    torch.manual_seed(9)
    global_a = objective(logits, batch)
    torch.manual_seed(9)
    global_b = objective(logits, batch)
    assert torch.equal(global_a.token_loss, global_b.token_loss)


@pytest.mark.parametrize("gate", ["hard", "soft", "threshold"])
def test_injected_mask_overrides_the_gate_exactly(gate: str) -> None:
    mask = torch.tensor(
        [[False, True], [False, False], [False, True], [True, False], [False, True]]
    )
    case = stale_case(trust_mask=mask)
    objective = get_objective("tropd", trust_gate=gate, outlier="fkl")
    out = objective(case.logits, case.batch, generator=torch.Generator().manual_seed(0))
    again = objective(case.logits, case.batch, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out.token_loss, again.token_loss)

    lpt, lq = case.batch.teacher_logprobs[:, 1], case.batch.sampler_logprobs[:, 1]
    opd_loss = -torch.exp(case.student_logprobs - lq) * (lpt - lq)
    fkl = full_forward_kl(case.theta.detach(), TEACHER).expand(V)
    expected = torch.where(mask[:, 1], opd_loss, fkl)
    torch.testing.assert_close(out.token_loss[:, 1].double(), expected, rtol=1e-5, atol=1e-7)
    assert out.metrics["trust_fraction"] == pytest.approx(3 / 5)
    assert out.metrics["outlier_fraction"] == pytest.approx(2 / 5)

    # gradient, token by token: d/d theta of the summed token losses
    (grad,) = torch.autograd.grad(out.token_loss.sum(), case.theta)
    (fkl_grad,) = torch.autograd.grad(full_forward_kl(case.theta, TEACHER), case.theta)
    expected_grad = sum(
        -torch.exp(case.student_logprobs[x] - lq[x])
        * (lpt[x] - lq[x])
        * grad_logprob(case.theta, x)
        if mask[x, 1]
        else fkl_grad
        for x in range(V)
    )
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-6)


def _all(value: bool) -> torch.Tensor:
    return torch.full((V, 2), value)


@pytest.mark.parametrize("outlier", ["fkl", "clip", "mask"])
def test_soft_gate_is_the_exact_expectation_over_mask_outcomes(outlier: str) -> None:
    """Per token, E[loss] = P * (loss if trusted) + (1 - P) * (loss if outlier)."""
    p = acceptance()
    objective = get_objective("tropd", trust_gate="soft", outlier=outlier)
    soft_case = stale_case()
    soft = objective(soft_case.logits, soft_case.batch)
    (soft_grad,) = torch.autograd.grad(soft.loss, soft_case.theta)

    trusted_case, outlier_case = (
        stale_case(trust_mask=_all(True)),
        stale_case(trust_mask=_all(False)),
    )
    trusted = objective(trusted_case.logits, trusted_case.batch)
    outlying = objective(outlier_case.logits, outlier_case.batch)
    expected = p * trusted.token_loss[:, 1].double() + (1 - p) * outlying.token_loss[:, 1].double()
    torch.testing.assert_close(
        soft.token_loss[:, 1].double(), expected.detach(), rtol=1e-5, atol=1e-7
    )

    # the token_mean denominator does not depend on the mask, so the loss is linear too
    mix = (p * trusted.token_loss[:, 1] + (1 - p) * outlying.token_loss[:, 1]).sum() / V
    grads = torch.autograd.grad(mix, [trusted_case.theta, outlier_case.theta])
    torch.testing.assert_close(soft_grad, grads[0] + grads[1], rtol=1e-5, atol=1e-7)
    assert soft.metrics["trust_fraction"] == pytest.approx(float(p.mean()), rel=1e-6)


def test_soft_gate_is_the_mean_of_many_hard_draws() -> None:
    """Average the hard gate over R independent masks (R copies of the vocabulary in one
    batch, token_mean) and compare with the soft gate; tolerance from the exact variance."""
    copies = 4000
    p = acceptance()

    # per-token losses and gradients in each region, by injecting the mask
    per_token = {}
    for trusted in (True, False):
        case = stale_case(trust_mask=_all(trusted))
        out = get_objective("tropd", trust_gate="hard")(case.logits, case.batch)
        grads = [
            torch.autograd.grad(out.token_loss[x, 1], case.theta, retain_graph=True)[0]
            for x in range(V)
        ]
        per_token[trusted] = (out.token_loss[:, 1].detach().double(), torch.stack(grads))
    loss_gap = per_token[True][0] - per_token[False][0]
    grad_gap = per_token[True][1] - per_token[False][1]
    loss_std = math.sqrt(float((p * (1 - p) * loss_gap**2).sum()) / copies) / V
    grad_std = ((p * (1 - p))[:, None] * grad_gap**2).sum(0).sqrt() / math.sqrt(copies) / V

    soft_case = stale_case()
    soft = get_objective("tropd", trust_gate="soft")(soft_case.logits, soft_case.batch)
    (soft_grad,) = torch.autograd.grad(soft.loss, soft_case.theta)

    hard_case = stale_case()
    many = torch.arange(V).repeat(copies)
    hard = get_objective("tropd", trust_gate="hard")(
        hard_case.logits[many],
        hard_case.batch.select(many),
        generator=torch.Generator().manual_seed(2),
    )
    (hard_grad,) = torch.autograd.grad(hard.loss, hard_case.theta)

    assert abs(hard.loss.item() - soft.loss.item()) < 5 * loss_std
    assert ((hard_grad - soft_grad).abs() <= 5 * grad_std + 1e-7).all(), (
        hard_grad,
        soft_grad,
        grad_std,
    )
    assert loss_std > 0 and (grad_std > 0).all()
