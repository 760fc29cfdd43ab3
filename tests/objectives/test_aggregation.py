"""Aggregation (SPEC §2.6): the weight each token gets in the scalar loss, and
micro-batches that add up to the full batch."""

from __future__ import annotations

import pytest
import torch

from tropd.batch import PROMPT, STUDENT, TEACHER, TokenBatch
from tropd.objectives import estimators, get_objective

from .enumeration import V

MODES = ["token_mean", "seq_mean_token_mean", "seq_sum"]

# ragged: 3, 1, 0 and 4 counted tokens, not all contiguous
RAGGED = torch.tensor(
    [
        [0, 1, 1, 0, 1, 0],
        [0, 0, 0, 1, 0, 0],
        [0, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0],
    ],
    dtype=torch.bool,
)


def expected_weights(mask: torch.Tensor, mode: str) -> torch.Tensor:
    """d loss / d token_loss written out from the docstring, row by row."""
    weights = torch.zeros(mask.shape, dtype=torch.float64)
    counts = [int(row.sum()) for row in mask]
    total = sum(counts)
    sequences = sum(1 for c in counts if c > 0)  # rows with nothing to train do not count
    for b, row in enumerate(mask):
        for t, counted in enumerate(row):
            if not counted:
                continue
            if mode == "token_mean":
                weights[b, t] = 1 / total
            elif mode == "seq_mean_token_mean":
                weights[b, t] = 1 / (counts[b] * sequences)
            else:
                weights[b, t] = 1 / sequences
    return weights


@pytest.mark.parametrize("mode", MODES)
def test_per_token_weights(mode: str) -> None:
    token_loss = torch.randn(
        RAGGED.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0)
    )
    token_loss.requires_grad_()
    loss = estimators.aggregate(token_loss, RAGGED, mode)
    (weights,) = torch.autograd.grad(loss, token_loss)
    expected = expected_weights(RAGGED, mode)
    torch.testing.assert_close(weights.double(), expected, rtol=1e-6, atol=1e-9)
    assert loss.item() == pytest.approx(float((expected * token_loss.detach()).sum()), rel=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_empty_mask_gives_zero_not_nan(mode: str) -> None:
    token_loss = torch.randn(2, 3)
    loss = estimators.aggregate(token_loss, torch.zeros(2, 3, dtype=torch.bool), mode)
    assert loss.item() == 0.0


def ragged_batch():
    """Four rows of different prompt / prefix / response lengths, right-padded."""
    origins = [
        [PROMPT, PROMPT, STUDENT, STUDENT, STUDENT, PROMPT],
        [PROMPT, TEACHER, TEACHER, STUDENT, PROMPT, PROMPT],
        [PROMPT, PROMPT, PROMPT, TEACHER, TEACHER, TEACHER],  # fully off-policy
        [PROMPT, STUDENT, PROMPT, PROMPT, PROMPT, PROMPT],
    ]
    origin = torch.tensor(origins)
    rows, width = origin.shape
    gen = torch.Generator().manual_seed(1)
    theta = torch.randn(rows, width, V, dtype=torch.float64, generator=gen).requires_grad_()
    tokens = torch.randint(0, V, (rows, width), generator=gen)
    lp_t = torch.log_softmax(
        2.0 * torch.randn(rows, width, V, dtype=torch.float64, generator=gen), -1
    )
    lq = torch.log_softmax(torch.randn(rows, width, V, dtype=torch.float64, generator=gen), -1)
    pick = tokens.unsqueeze(-1)
    topk_ids = torch.argsort(lp_t, -1, descending=True)[..., :3]
    batch = TokenBatch(
        tokens=tokens,
        origin=origin,
        attention_mask=(torch.arange(width) <= torch.tensor([4, 3, 5, 1])[:, None]).long(),
        sampler_logprobs=torch.where(origin == STUDENT, lq.gather(-1, pick).squeeze(-1), 0.0),
        teacher_logprobs=lp_t.gather(-1, pick).squeeze(-1),
        teacher_topk_ids=topk_ids,
        teacher_topk_logprobs=lp_t.gather(-1, topk_ids),
    )
    return theta, batch


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("tropd", {"trust_gate": "soft", "guidance_norm": "joint"}),
        ("opd", {}),
        ("topk_fkl", {}),
        ("clip_outlier", {"guidance_norm": "joint"}),
    ],
)
def test_objective_loss_uses_the_documented_token_weights(mode, name, options) -> None:
    theta, batch = ragged_batch()
    objective = get_objective(name, loss_agg=mode, **options)
    out = objective(theta, batch)
    counted = batch.response_mask if name != "opd" and name != "topk_fkl" else batch.student_mask
    expected = (expected_weights(counted, mode) * out.token_loss.double()).sum()
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    torch.testing.assert_close(objective.trained_mask(batch), counted)
    assert torch.equal(out.token_loss[~counted], torch.zeros_like(out.token_loss[~counted]))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["tropd", "clip_outlier"])
def test_separate_guidance_norm_averages_prefix_and_student_tokens_apart(mode, name) -> None:
    # loss = mean over student tokens + mean over prefix tokens (the rule weighs the prefix
    # loss by beta), each mean as loss_agg says, so beta is relative to the on-policy term.
    theta, batch = ragged_batch()
    objective = get_objective(name, loss_agg=mode, guidance_norm="separate", trust_gate="soft")
    out = objective(theta, batch)
    weights = expected_weights(batch.student_mask, mode) + expected_weights(
        batch.teacher_mask, mode
    )
    expected = (weights * out.token_loss.double()).sum()
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_separate_guidance_norm_on_a_hand_computed_batch() -> None:
    # One row: two prefix tokens, then two student tokens sampled by the (uniform) student
    # itself, so lq = lpS and the PG ratio is 1. The rule computes in float32: rel 1e-6.
    origin = torch.tensor([[PROMPT, TEACHER, TEACHER, STUDENT, STUDENT]])
    tokens = torch.tensor([[0, 1, 2, 3, 0]])
    logits = torch.zeros(1, 5, V, dtype=torch.float64)  # uniform student: lpS = -log V
    lp_s = -torch.log(torch.tensor(float(V), dtype=torch.float64))
    lp_t = torch.tensor([[0.0, -1.0, -3.0, -2.0, -2.0]], dtype=torch.float64)
    batch = TokenBatch(
        tokens=tokens,
        origin=origin,
        attention_mask=torch.ones(1, 5, dtype=torch.long),
        sampler_logprobs=torch.tensor([[0.0, 0.0, 0.0, lp_s.item(), lp_s.item()]]),
        teacher_logprobs=lp_t,
        teacher_topk_ids=torch.zeros(1, 5, 1, dtype=torch.long),
        teacher_topk_logprobs=torch.zeros(1, 5, 1, dtype=torch.float64),
    )
    beta = 0.5
    objective = get_objective("tropd", trust_gate="soft", outlier="mask", beta=beta)
    out = objective(logits, batch)
    # student tokens: r = lpT - lq, w = min(1, e^r), loss_t = w * (-exp(0) * r); mask outliers
    r = lp_t[0, 3:] - lp_s
    student = (torch.clamp(r.exp(), max=1.0) * -r).mean()
    # prefix tokens: beta * (lpT - lpS), averaged over the two prefix tokens
    prefix = beta * (lp_t[0, 1:3] - lp_s).mean()
    assert out.loss.item() == pytest.approx((student + prefix).item(), rel=1e-6)
    joint = get_objective(
        "tropd", trust_gate="soft", outlier="mask", beta=beta, guidance_norm="joint"
    )
    everything = torch.cat([torch.clamp(r.exp(), max=1.0) * -r, beta * (lp_t[0, 1:3] - lp_s)])
    assert joint(logits, batch).loss.item() == pytest.approx(everything.mean().item(), rel=1e-6)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("tropd", {"trust_gate": "soft"}),
        ("tropd", {"trust_gate": "soft", "guidance_norm": "joint"}),
        ("tropd", {"trust_gate": "threshold"}),
        ("opd", {}),
    ],
)
def test_micro_batches_add_up_to_the_full_batch(mode, name, options) -> None:
    theta, batch = ragged_batch()
    objective = get_objective(name, loss_agg=mode, **options)
    full = objective(theta, batch)
    (full_grad,) = torch.autograd.grad(full.loss, theta)

    counts = {
        "denominator": objective.denominator(batch),
        "prefix_denominator": objective.prefix_denominator(batch),
    }
    slices = [slice(0, 1), slice(1, 3), slice(3, 4)]
    parts = [objective(theta[s], batch.select(s), **counts).loss for s in slices]
    total = sum(parts)
    (micro_grad,) = torch.autograd.grad(total, theta)
    assert total.item() == pytest.approx(full.loss.item(), rel=1e-6, abs=1e-9)
    torch.testing.assert_close(micro_grad, full_grad, rtol=1e-6, atol=1e-9)
    # without the global denominator the micro-batch losses would not add up
    naive = sum(objective(theta[s], batch.select(s)).loss for s in slices)
    assert naive.item() != pytest.approx(full.loss.item(), rel=1e-3)
