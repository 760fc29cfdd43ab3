"""TRB behaviour blending: the bisection for the mixture exponent, the annealed budget,
and `BlendEngine` on tiny models, checked against full forward passes of both models."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest
import torch

from tropd.batch import TokenBatch, align_logits
from tropd.model_names import load_model, load_tokenizer
from tropd.rollout import HFEngine, SamplingParams, collect_rollouts
from tropd.rollout.blend import (
    BlendEngine,
    blend_budget,
    blend_logprobs,
    blend_weight,
    kl_from_student,
)

VOCAB = 7


def distributions(seed: int, rows: int = 64, sharpness: float = 3.0):
    gen = torch.Generator().manual_seed(seed)
    student = torch.log_softmax(torch.randn(rows, VOCAB, generator=gen, dtype=torch.float64), -1)
    teacher = torch.randn(rows, VOCAB, generator=gen, dtype=torch.float64) * sharpness
    return student, torch.log_softmax(teacher, -1)


def kl_at(student, teacher, weight) -> torch.Tensor:
    return kl_from_student(blend_logprobs(student, teacher, weight), student)


def test_kl_from_student_is_the_kl_by_definition() -> None:
    student, teacher = distributions(0, rows=4)
    p, q = teacher.exp(), student.exp()
    expected = torch.stack(
        [sum(p[r, v] * (p[r, v] / q[r, v]).log() for v in range(VOCAB)) for r in range(4)]
    )
    torch.testing.assert_close(kl_from_student(teacher, student), expected, rtol=1e-12, atol=0)


def test_mixture_endpoints_are_student_and_teacher() -> None:
    student, teacher = distributions(1)
    rows = student.shape[0]
    torch.testing.assert_close(
        blend_logprobs(student, teacher, torch.zeros(rows, dtype=torch.float64)), student
    )
    torch.testing.assert_close(
        blend_logprobs(student, teacher, torch.ones(rows, dtype=torch.float64)), teacher
    )
    # geometric: log mu_b - ((1 - b) lpS + b lpT) is constant over the vocabulary
    b = torch.full((rows,), 0.3, dtype=torch.float64)
    gap = blend_logprobs(student, teacher, b) - (0.7 * student + 0.3 * teacher)
    torch.testing.assert_close(gap, gap[:, :1].expand_as(gap))


def test_kl_grows_with_the_mixture_weight() -> None:
    student, teacher = distributions(2)
    grid = [
        kl_at(student, teacher, torch.full((64,), b, dtype=torch.float64))
        for b in torch.linspace(0, 1, 21).tolist()
    ]
    for lower, higher in itertools.pairwise(grid):
        assert (higher >= lower - 1e-15).all()


@pytest.mark.parametrize("budget", [1e-4, 0.01, 0.1, 0.5])
@pytest.mark.parametrize("seed", [0, 1])
def test_bisection_returns_the_largest_weight_within_budget(budget: float, seed: int) -> None:
    student, teacher = distributions(seed)
    weight = blend_weight(student, teacher, budget)
    assert ((weight >= 0) & (weight <= 1)).all()
    assert (kl_at(student, teacher, weight) <= budget).all()  # always feasible
    inside = weight < 1
    assert inside.any()
    nudged = (weight + 1e-8).clamp(max=1.0)  # a hair more teacher breaks the budget
    assert (kl_at(student, teacher, nudged)[inside] > budget).all()


def test_weight_is_one_when_the_teacher_is_within_budget() -> None:
    student, teacher = distributions(3)
    teacher_kl = kl_from_student(teacher, student)
    rows = student.shape[0]
    budget = float(teacher_kl.median())
    weight = blend_weight(student, teacher, budget)
    fits = teacher_kl <= budget
    assert fits.any() and (~fits).any()
    assert torch.equal(weight[fits], torch.ones(int(fits.sum()), dtype=torch.float64))
    assert (weight[~fits] < 1).all()
    assert torch.equal(blend_weight(student, student, 1e-9), torch.ones(rows, dtype=torch.float64))


def test_zero_budget_blends_nothing() -> None:
    student, teacher = distributions(4)
    weight = blend_weight(student, teacher, 0.0)
    assert torch.equal(weight, torch.zeros_like(weight))


def test_budget_anneals_linearly_to_zero_at_step_k() -> None:
    assert blend_budget(0, 0.2, 10) == 0.2
    assert blend_budget(5, 0.2, 10) == pytest.approx(0.1)
    assert blend_budget(9, 0.2, 10) == pytest.approx(0.02)
    for step in (10, 11, 100):
        assert blend_budget(step, 0.2, 10) == 0.0
    budgets = [blend_budget(k, 0.2, 10) for k in range(12)]
    assert budgets == sorted(budgets, reverse=True)


# --- BlendEngine on tiny models -----------------------------------------------------------

MAX_NEW = 10


@dataclass
class Tiny:
    student: torch.nn.Module
    teacher: torch.nn.Module
    pad: int
    eos: int
    prompts: list[list[int]]


@pytest.fixture(scope="module")
def tiny(tiny_pair) -> Tiny:
    """The shared tiny pair, with a sharpened teacher so it is far from the student."""
    teacher_dir, student_dir = tiny_pair
    tokenizer = load_tokenizer(student_dir)
    teacher = load_model(teacher_dir, "float32", "cpu")
    with torch.no_grad():
        teacher.get_output_embeddings().weight.mul_(8.0)
    prompts = [tokenizer.encode(text) for text in ("12+34=", "7+5=", "1=", "908+77=")]
    return Tiny(
        load_model(student_dir, "float32", "cpu"),
        teacher,
        tokenizer.pad_token_id,
        tokenizer.eos_token_id,
        prompts,
    )


def blend_rollouts(tiny: Tiny, budget: float, seed: int = 0, **params) -> TokenBatch:
    torch.manual_seed(seed)
    engine = BlendEngine(tiny.student, tiny.teacher, budget, tiny.pad, tiny.eos)
    return collect_rollouts(engine, tiny.prompts, SamplingParams(MAX_NEW, **params), 3, tiny.pad)


@torch.no_grad()
def full_logprobs(model, batch: TokenBatch, temperature: float = 1.0) -> torch.Tensor:
    logits = model(input_ids=batch.tokens, attention_mask=batch.attention_mask).logits
    return torch.log_softmax(align_logits(logits.float()) / temperature, -1)


@pytest.mark.parametrize("budget", [0.01, 0.2])
def test_recorded_logprob_is_the_blend_of_the_full_forward_passes(tiny: Tiny, budget: float):
    """KV-cached, left-padded generation sees what a full forward pass sees: log mu
    recomputed from both models' full-sequence logits matches the recorded value, and
    every position stays within the KL budget."""
    batch = blend_rollouts(tiny, budget)
    student = batch.student_mask
    assert student.sum() > 40
    lp_s = full_logprobs(tiny.student, batch)[student]
    lp_t = full_logprobs(tiny.teacher, batch)[student]
    weight = blend_weight(lp_s, lp_t, budget)
    blend = blend_logprobs(lp_s, lp_t, weight)
    recorded = batch.sampler_logprobs[student]
    expected = blend.gather(-1, batch.tokens[student][:, None]).squeeze(-1)
    # Two models' KV-cached log-probs, each within test_engine's 1e-5 of its full forward
    # pass, mixed by a convex blend: the errors add, 2e-5.
    torch.testing.assert_close(recorded, expected, rtol=0, atol=2e-5)
    assert (kl_from_student(blend, lp_s) <= budget * (1 + 1e-4)).all()
    assert ((weight > 0) & (weight < 1)).float().mean() > 0.5  # really blended


def test_unbounded_budget_samples_the_teacher(tiny: Tiny) -> None:
    batch = blend_rollouts(tiny, 1e9)
    student = batch.student_mask
    teacher_lp = full_logprobs(tiny.teacher, batch)
    expected = teacher_lp.gather(-1, batch.tokens[..., None]).squeeze(-1)[student]
    torch.testing.assert_close(batch.sampler_logprobs[student], expected, rtol=0, atol=2e-5)


def test_zero_budget_is_plain_student_sampling(tiny: Tiny) -> None:
    blended = blend_rollouts(tiny, 0.0, seed=5)
    torch.manual_seed(5)
    plain = collect_rollouts(
        HFEngine(tiny.student, tiny.pad, tiny.eos),
        tiny.prompts,
        SamplingParams(MAX_NEW),
        3,
        tiny.pad,
    )
    assert torch.equal(blended.tokens, plain.tokens)
    assert torch.equal(blended.sampler_logprobs, plain.sampler_logprobs)


def test_temperature_and_greedy(tiny: Tiny) -> None:
    budget = 0.05
    batch = blend_rollouts(tiny, budget, temperature=0.7)
    student = batch.student_mask
    lp_s = full_logprobs(tiny.student, batch, 0.7)[student]
    lp_t = full_logprobs(tiny.teacher, batch, 0.7)[student]
    blend = blend_logprobs(lp_s, lp_t, blend_weight(lp_s, lp_t, budget))
    expected = blend.gather(-1, batch.tokens[student][:, None]).squeeze(-1)
    torch.testing.assert_close(batch.sampler_logprobs[student], expected, rtol=0, atol=2e-5)

    greedy = blend_rollouts(tiny, budget, temperature=0.0)
    student = greedy.student_mask
    lp_s = full_logprobs(tiny.student, greedy)[student]
    lp_t = full_logprobs(tiny.teacher, greedy)[student]
    blend = blend_logprobs(lp_s, lp_t, blend_weight(lp_s, lp_t, budget))
    assert torch.equal(greedy.tokens[student], blend.argmax(-1))


def test_top_p_truncates_the_blend(tiny: Tiny) -> None:
    batch = blend_rollouts(tiny, 0.05, top_p=0.5)
    student = batch.student_mask
    lp_s = full_logprobs(tiny.student, batch)[student]
    lp_t = full_logprobs(tiny.teacher, batch)[student]
    blend = blend_logprobs(lp_s, lp_t, blend_weight(lp_s, lp_t, 0.05))
    full = blend.gather(-1, batch.tokens[student][:, None]).squeeze(-1)
    recorded = batch.sampler_logprobs[student]
    assert (recorded >= full - 1e-5).all()  # renormalised over the nucleus
    assert (recorded > full + 1e-3).any()
