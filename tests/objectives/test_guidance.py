"""Off-policy guidance (SPEC §2.2, §2.5): teacher-prefix tokens get beta * NLL, prompt
positions get nothing, and OPD ignores teacher tokens.

One row `[prompt, prompt, teacher, teacher, student, student, padding]`; every position
has its own student logits `theta[t]`, so the gradient at each position is read off
`theta.grad[t]` and compared with the closed form of d log softmax / d logits.
"""

from __future__ import annotations

import pytest
import torch

from tropd.batch import PROMPT, STUDENT, TEACHER, TokenBatch
from tropd.objectives import get_objective

from .enumeration import V, grad_logprob

ORIGIN = [PROMPT, PROMPT, TEACHER, TEACHER, STUDENT, STUDENT, PROMPT]
TOKENS = [1, 4, 2, 0, 3, 1, 0]
T = len(ORIGIN)
TEACHER_POS = [t for t, o in enumerate(ORIGIN) if o == TEACHER]
STUDENT_POS = [t for t, o in enumerate(ORIGIN) if o == STUDENT]
UNTRAINED_POS = [t for t, o in enumerate(ORIGIN) if o == PROMPT]


def guided_row(trust: bool):
    gen = torch.Generator().manual_seed(4)
    theta = torch.randn(T, V, dtype=torch.float64, generator=gen).requires_grad_()
    teacher = 2.0 * torch.randn(T, V, dtype=torch.float64, generator=gen)
    sampler = torch.randn(T, V, dtype=torch.float64, generator=gen)
    tokens = torch.tensor([TOKENS])
    origin = torch.tensor([ORIGIN])
    lp_t = torch.log_softmax(teacher, -1)
    lq = torch.log_softmax(sampler, -1)[torch.arange(T), tokens[0]]
    lq = torch.where(origin[0] == STUDENT, lq, 0.0)  # 0 off student tokens, as documented
    topk_ids = torch.argsort(teacher, -1, descending=True)[:, :3]
    batch = TokenBatch(
        tokens=tokens,
        origin=origin,
        sampler_logprobs=lq[None],
        teacher_logprobs=lp_t[torch.arange(T), tokens[0]][None],
        teacher_topk_ids=topk_ids[None],
        teacher_topk_logprobs=lp_t.gather(-1, topk_ids)[None],
        trust_mask=torch.full((1, T), trust),
    )
    return theta, batch


@pytest.mark.parametrize("beta", [0.001, 0.3, 1.0])
@pytest.mark.parametrize("trust", [True, False])
@pytest.mark.parametrize("gate", ["hard", "soft", "threshold"])
def test_teacher_tokens_get_beta_nll_gradient_and_prompt_gets_none(beta, trust, gate) -> None:
    theta, batch = guided_row(trust)
    objective = get_objective("tropd", beta=beta, trust_gate=gate, loss_agg="seq_sum")
    out = objective(theta[None], batch, generator=torch.Generator().manual_seed(0))
    (grad,) = torch.autograd.grad(out.loss, theta)  # seq_sum of one row = sum of token losses

    lp_s = torch.log_softmax(theta.detach(), -1)
    for t in TEACHER_POS:
        x = TOKENS[t]
        torch.testing.assert_close(grad[t], -beta * grad_logprob(theta[t], x), rtol=1e-5, atol=1e-8)
        expected = beta * (batch.teacher_logprobs[0, t] - lp_s[t, x])
        assert out.token_loss[0, t].item() == pytest.approx(expected.item(), rel=1e-5)
    for t in UNTRAINED_POS:
        assert torch.equal(grad[t], torch.zeros(V, dtype=torch.float64))
        assert out.token_loss[0, t].item() == 0.0
    for t in STUDENT_POS:
        assert grad[t].abs().sum() > 0


def test_joint_norm_counts_guidance_tokens_in_the_token_mean() -> None:
    theta, batch = guided_row(trust=True)
    objective = get_objective("tropd", loss_agg="token_mean", guidance_norm="joint")
    out = objective(theta[None], batch)
    trained = len(TEACHER_POS) + len(STUDENT_POS)
    assert out.loss.item() == pytest.approx(out.token_loss.sum().item() / trained, rel=1e-6)


def test_separate_norm_adds_the_prefix_mean_to_the_student_mean() -> None:
    theta, batch = guided_row(trust=True)
    out = get_objective("tropd", loss_agg="token_mean")(theta[None], batch)
    student = out.token_loss[0, STUDENT_POS].sum().item() / len(STUDENT_POS)
    prefix = out.token_loss[0, TEACHER_POS].sum().item() / len(TEACHER_POS)
    assert out.loss.item() == pytest.approx(student + prefix, rel=1e-6)


def test_zero_beta_leaves_teacher_tokens_untrained() -> None:
    theta, batch = guided_row(trust=True)
    out = get_objective("tropd", beta=0.0)(theta[None], batch)
    (grad,) = torch.autograd.grad(out.loss, theta)
    for t in TEACHER_POS + UNTRAINED_POS:
        assert torch.equal(grad[t], torch.zeros(V, dtype=torch.float64))


def test_opd_ignores_teacher_tokens() -> None:
    theta, batch = guided_row(trust=True)
    out = get_objective("opd", loss_agg="seq_sum")(theta[None], batch)
    (grad,) = torch.autograd.grad(out.loss, theta)
    for t in TEACHER_POS + UNTRAINED_POS:
        assert torch.equal(grad[t], torch.zeros(V, dtype=torch.float64))
        assert out.token_loss[0, t].item() == 0.0
    lp_s = torch.log_softmax(theta.detach(), -1)
    for t in STUDENT_POS:
        x = TOKENS[t]
        lq, lpt = batch.sampler_logprobs[0, t], batch.teacher_logprobs[0, t]
        ratio = torch.exp(lp_s[t, x] - lq)
        torch.testing.assert_close(
            grad[t], -ratio * (lpt - lq) * grad_logprob(theta[t], x), rtol=1e-5, atol=1e-8
        )
    # the token_mean of OPD counts student tokens only
    mean = get_objective("opd")(theta[None], batch)
    assert mean.loss.item() == pytest.approx(
        out.token_loss.sum().item() / len(STUDENT_POS), rel=1e-6
    )


def test_metrics_on_a_guided_row_describe_student_tokens_only() -> None:
    """reward_mean, student_entropy, teacher_topk_mass average the student tokens; the
    outlier FKL and floor fraction average the outlier tokens among them."""
    theta, batch = guided_row(trust=True)
    trusted, outlier = STUDENT_POS
    mask = torch.zeros(1, T, dtype=torch.bool)
    mask[0, trusted] = True
    out = get_objective("tropd")(theta[None], batch.replace(trust_mask=mask))

    lp_s = torch.log_softmax(theta.detach(), -1)
    reward = batch.teacher_logprobs[0] - batch.sampler_logprobs[0]
    entropy = -(lp_s.exp() * lp_s).sum(-1)
    mass = batch.teacher_topk_logprobs[0].exp().sum(-1)
    for name, values in [
        ("reward_mean", reward),
        ("student_entropy", entropy),
        ("teacher_topk_mass", mass),
    ]:
        expected = values[STUDENT_POS].mean().item()
        assert out.metrics[name] == pytest.approx(expected, rel=1e-5), name

    ids, lp_t = batch.teacher_topk_ids[0, outlier], batch.teacher_topk_logprobs[0, outlier]
    fkl = (lp_t.exp() * (lp_t - lp_s[outlier, ids])).sum()
    assert out.metrics["fkl_outlier"] == pytest.approx(fkl.item(), rel=1e-5)
    assert out.metrics["trust_fraction"] == pytest.approx(0.5)
    assert out.metrics["student_tokens"] == 2.0
    assert out.metrics["teacher_tokens"] == 2.0


def test_padding_filler_in_teacher_top_k_does_not_reach_the_loss() -> None:
    """Positions that are never trained may hold any filler in the teacher fields; a
    scorer that writes log 0 = -inf there must not turn the loss into NaN."""
    theta, batch = guided_row(trust=False)
    filler = batch.teacher_topk_logprobs.clone()
    filler[0, UNTRAINED_POS] = float("-inf")
    out = get_objective("tropd")(theta[None], batch.replace(teacher_topk_logprobs=filler))
    clean = get_objective("tropd")(theta[None], batch)
    assert torch.isfinite(out.loss)
    assert out.loss.item() == pytest.approx(clean.loss.item(), rel=1e-6)
