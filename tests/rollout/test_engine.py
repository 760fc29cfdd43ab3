"""Rollouts: `collect_rollouts` with the embedded HF engine on tiny random models, and
with fake engines where the test needs exact control over what the teacher writes."""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass, field

import pytest
import torch

from tropd.batch import PROMPT, STUDENT, TEACHER, TokenBatch, align_logits
from tropd.model_names import load_model, load_tokenizer
from tropd.objectives.estimators import token_logprobs
from tropd.rollout import (
    Generation,
    GuidancePlan,
    HFEngine,
    SamplingParams,
    collect_rollouts,
)
from tropd.rollout.engine import sample_tokens

MAX_NEW = 12
SAMPLES = 3


@dataclass
class Tiny:
    student: torch.nn.Module
    teacher: torch.nn.Module
    pad: int
    eos: int
    prompts: list[list[int]]

    def student_engine(self) -> HFEngine:
        return HFEngine(self.student, self.pad, self.eos)

    def teacher_engine(self) -> HFEngine:
        return HFEngine(self.teacher, self.pad, self.eos)


@pytest.fixture(scope="module")
def tiny(tiny_pair) -> Tiny:
    teacher_dir, student_dir = tiny_pair
    tokenizer = load_tokenizer(student_dir)
    prompts = [tokenizer.encode(text) for text in ("12+34=", "7+5=", "1=", "908+77=")]
    return Tiny(
        load_model(student_dir, "float32", "cpu"),
        load_model(teacher_dir, "float32", "cpu"),
        tokenizer.pad_token_id,
        tokenizer.eos_token_id,
        prompts,
    )


@dataclass
class RecordingEngine:
    """Wraps an engine and keeps every request and answer."""

    inner: object
    calls: list[tuple[list[list[int]], object, list[Generation]]] = field(default_factory=list)

    def generate(self, prompts, params):
        out = self.inner.generate(prompts, params)
        self.calls.append(([list(p) for p in prompts], params, out))
        return out


@dataclass
class FakeEngine:
    """Answers every prompt with `reply(prompt, params)`; records the requests."""

    reply: object
    calls: list[tuple[list[int], SamplingParams]] = field(default_factory=list)

    def generate(self, prompts, params):
        per_row = params if isinstance(params, list) else [params] * len(prompts)
        out = []
        for prompt, p in zip(prompts, per_row, strict=True):
            self.calls.append((list(prompt), p))
            out.append(self.reply(prompt, p))
        return out


def fixed_reply(tokens: list[int], eos: int):
    """A deterministic engine reply: `tokens` cut to the budget, finished iff it ends in EOS."""

    def reply(prompt, params):
        kept = tokens[: params.max_new_tokens]
        return Generation(kept, [-0.5] * len(kept), bool(kept) and kept[-1] == eos)

    return reply


@pytest.fixture(scope="module")
def sampled(tiny: Tiny) -> TokenBatch:
    """Unguided rollouts at temperature 1, top_p 1."""
    return rollouts(tiny, seed=3)


@dataclass
class Guided:
    batch: TokenBatch
    teacher: RecordingEngine
    cap: int


@pytest.fixture(scope="module")
def guided(tiny: Tiny) -> Guided:
    """Rollouts whose teacher prefixes are capped at 4 of the 12 tokens."""
    teacher = RecordingEngine(tiny.teacher_engine())
    batch = rollouts(tiny, seed=6, teacher=teacher, guidance=GuidancePlan(cap=4, mode="cap"))
    return Guided(batch, teacher, 4)


def rollouts(tiny: Tiny, seed: int = 0, temperature: float = 1.0, top_p: float = 1.0, **kw):
    torch.manual_seed(seed)
    return collect_rollouts(
        tiny.student_engine(),
        tiny.prompts,
        SamplingParams(MAX_NEW, temperature, top_p),
        SAMPLES,
        tiny.pad,
        **kw,
    )


def aligned_logits(model, batch: TokenBatch) -> torch.Tensor:
    with torch.no_grad():
        logits = model(input_ids=batch.tokens, attention_mask=batch.attention_mask).logits
    return align_logits(logits.float())


def check_layout(batch: TokenBatch, prompts: list[list[int]], pad: int, max_new: int) -> None:
    """Prompt-major rows; right padding; origin = prompt, teacher, student, padding."""
    n_rows, width = batch.tokens.shape
    assert n_rows == len(prompts) * SAMPLES
    for name in ("origin", "attention_mask", "sampler_logprobs"):
        assert getattr(batch, name).shape == (n_rows, width)
    assert batch.group.tolist() == [p for p in range(len(prompts)) for _ in range(SAMPLES)]
    assert batch.attention_mask[:, -1].any(), "no column is padding in every row"
    for row in range(n_rows):
        prompt = prompts[int(batch.group[row])]
        mask = batch.attention_mask[row]
        length = int(mask.sum())
        assert mask[:length].eq(1).all() and mask[length:].eq(0).all()
        assert batch.tokens[row, : len(prompt)].tolist() == prompt
        assert batch.tokens[row, length:].eq(pad).all()
        origin = batch.origin[row]
        assert origin[: len(prompt)].eq(PROMPT).all()
        assert origin[length:].eq(PROMPT).all()
        response = origin[len(prompt) : length].tolist()
        assert response == sorted(response), "teacher tokens must precede student tokens"
        assert set(response) <= {TEACHER, STUDENT}
        n_teacher, n_student = response.count(TEACHER), response.count(STUDENT)
        assert n_student <= max_new - n_teacher


# --- layout ------------------------------------------------------------------------


def test_unguided_batch_layout(tiny: Tiny, sampled: TokenBatch) -> None:
    batch = sampled
    check_layout(batch, tiny.prompts, tiny.pad, MAX_NEW)
    assert not batch.teacher_mask.any()
    assert batch.student_mask.sum(-1).gt(0).all(), "every unguided row samples a response"


def test_guided_batch_layout(tiny: Tiny, guided: Guided) -> None:
    batch = guided.batch
    check_layout(batch, tiny.prompts, tiny.pad, MAX_NEW)
    assert batch.teacher_mask.any() and batch.student_mask.any()
    assert batch.teacher_mask.sum(-1).le(guided.cap).all()


# Row layouts: prompt, then a teacher prefix and/or a student part, then padding (if any).
ORIGIN_RUNS = {
    (PROMPT, TEACHER, STUDENT, PROMPT),
    (PROMPT, TEACHER, STUDENT),
    (PROMPT, TEACHER, PROMPT),
    (PROMPT, TEACHER),
    (PROMPT, STUDENT, PROMPT),
    (PROMPT, STUDENT),
}


@pytest.mark.parametrize("kind", ["sampled", "guided"])
def test_origin_runs_are_prompt_teacher_student_padding(kind: str, request) -> None:
    batch = request.getfixturevalue(kind)
    batch = batch if isinstance(batch, TokenBatch) else batch.batch
    for row in range(len(batch)):
        runs = tuple(value for value, _ in itertools.groupby(batch.origin[row].tolist()))
        assert runs in ORIGIN_RUNS


# --- EOS ---------------------------------------------------------------------------


def test_responses_stop_at_eos_and_include_it(tiny: Tiny, sampled: TokenBatch) -> None:
    batch = sampled
    ended, truncated = 0, 0
    for row in range(len(batch)):
        response = batch.tokens[row][batch.student_mask[row]].tolist()
        assert tiny.eos not in response[:-1], "no tokens after EOS"
        if response[-1] == tiny.eos:
            ended += 1
        else:
            assert len(response) == MAX_NEW, "a response without EOS used its whole budget"
            truncated += 1
    assert ended and truncated, "the seed should exercise both endings"


def test_engine_marks_finished_exactly_when_eos_ends_the_generation(tiny: Tiny) -> None:
    torch.manual_seed(3)
    prompts = tiny.prompts * 3
    out = tiny.student_engine().generate(prompts, SamplingParams(MAX_NEW))
    assert len(out) == len(prompts)
    assert any(g.finished for g in out) and not all(g.finished for g in out)
    for gen in out:
        assert len(gen.tokens) == len(gen.logprobs) <= MAX_NEW
        assert gen.finished == (gen.tokens[-1] == tiny.eos)
        assert tiny.eos not in gen.tokens[:-1]


def test_engine_respects_a_budget_per_prompt(tiny: Tiny) -> None:
    torch.manual_seed(4)
    budgets = [1, 3, MAX_NEW, 5]
    out = tiny.student_engine().generate(tiny.prompts, [SamplingParams(b) for b in budgets])
    for gen, budget in zip(out, budgets, strict=True):
        assert 1 <= len(gen.tokens) <= budget
        assert len(gen.logprobs) == len(gen.tokens)
        assert gen.finished or len(gen.tokens) == budget


# --- sampler log-probs -------------------------------------------------------------
# The recorded log-probs come from the KV-cached decode, the expected ones from one full
# float32 forward pass: the same arithmetic summed in another order, so they differ by
# rounding only. atol 1e-5 is ~80 float32 ulps of a log-prob of size 1 (eps = 1.2e-7),
# room for the few dozen roundings on each path of these 1-2 layer, 16-32 wide models;
# a wrong context or distribution is off by > 1e-2.


def test_sampler_logprobs_are_the_students_own_at_temperature_one(
    tiny: Tiny, sampled: TokenBatch
) -> None:
    batch = sampled
    expected = token_logprobs(aligned_logits(tiny.student, batch), batch.tokens)
    student = batch.student_mask
    assert student.sum() > 20
    torch.testing.assert_close(
        batch.sampler_logprobs[student], expected[student], rtol=0, atol=1e-5
    )
    assert batch.sampler_logprobs[~student].eq(0).all()


def test_sampler_logprobs_follow_the_tempered_distribution(tiny: Tiny) -> None:
    batch = rollouts(tiny, seed=2, temperature=0.7)
    logits = aligned_logits(tiny.student, batch)
    tempered = token_logprobs(logits / 0.7, batch.tokens)
    plain = token_logprobs(logits, batch.tokens)
    student = batch.student_mask
    torch.testing.assert_close(
        batch.sampler_logprobs[student], tempered[student], rtol=0, atol=1e-5
    )
    assert (tempered[student] - plain[student]).abs().max() > 1e-2, "temperature must matter"
    assert batch.sampler_logprobs[~student].eq(0).all()


def test_sampler_logprobs_are_renormalised_over_the_top_p_nucleus(tiny: Tiny) -> None:
    top_p = 0.6
    batch = rollouts(tiny, seed=5, top_p=top_p)
    logprobs = torch.log_softmax(aligned_logits(tiny.student, batch), dim=-1)
    rows, cols = batch.student_mask.nonzero(as_tuple=True)
    for r, c in zip(rows.tolist(), cols.tolist(), strict=True):
        lp = logprobs[r, c]
        probs = lp.exp()
        order = probs.argsort(descending=True)
        # The nucleus: the most likely tokens until their mass reaches top_p.
        before = probs[order].cumsum(0) - probs[order]
        nucleus = order[before < top_p]
        token = int(batch.tokens[r, c])
        assert token in nucleus.tolist()
        expected = lp[token] - torch.logsumexp(lp[nucleus], 0)
        assert float(batch.sampler_logprobs[r, c]) == pytest.approx(float(expected), abs=1e-5)


def test_greedy_picks_the_argmax_and_records_plain_logprobs(tiny: Tiny) -> None:
    batch = rollouts(tiny, temperature=0.0)
    logits = aligned_logits(tiny.student, batch)
    student = batch.student_mask
    assert torch.equal(batch.tokens[student], logits.argmax(-1)[student])
    expected = token_logprobs(logits, batch.tokens)
    torch.testing.assert_close(
        batch.sampler_logprobs[student], expected[student], rtol=0, atol=1e-5
    )
    # Greedy rollouts of one prompt are identical.
    for p in range(len(tiny.prompts)):
        rows = batch.tokens[batch.group == p]
        assert (rows == rows[0]).all()


def test_sampling_is_reproducible_under_manual_seed(tiny: Tiny) -> None:
    kw = {"teacher": tiny.teacher_engine(), "guidance": GuidancePlan(cap=5, mode="uniform")}
    first = rollouts(tiny, seed=11, **kw)
    again = rollouts(tiny, seed=11, **kw)
    other = rollouts(tiny, seed=12, **kw)
    for name in ("tokens", "origin", "attention_mask", "sampler_logprobs", "group"):
        assert torch.equal(getattr(first, name), getattr(again, name)), name
    assert not torch.equal(first.tokens, other.tokens)


# --- teacher prefixes --------------------------------------------------------------


def test_full_cap_rows_are_the_teachers_generations(tiny: Tiny) -> None:
    teacher = RecordingEngine(tiny.teacher_engine())
    batch = rollouts(tiny, teacher=teacher, guidance=GuidancePlan(cap=MAX_NEW, mode="cap"))
    assert len(teacher.calls) == 1
    asked, params, written = teacher.calls[0]
    assert params.max_new_tokens == MAX_NEW
    assert len(asked) == len(batch)  # fraction 1.0: every rollout is guided
    for row, (prompt, gen) in enumerate(zip(asked, written, strict=True)):
        assert prompt == tiny.prompts[int(batch.group[row])]
        assert batch.tokens[row][batch.teacher_mask[row]].tolist() == gen.tokens
    # The teacher either ended with EOS or used the whole budget: nothing left to sample.
    assert not batch.student_mask.any()
    assert batch.sampler_logprobs.eq(0).all()


def test_greedy_teacher_prefix_is_the_teachers_argmax(tiny: Tiny) -> None:
    plan = GuidancePlan(cap=MAX_NEW, mode="cap", temperature=0.0)
    batch = rollouts(tiny, teacher=tiny.teacher_engine(), guidance=plan)
    teacher_logits = aligned_logits(tiny.teacher, batch)
    prefix = batch.teacher_mask
    assert prefix.sum() >= len(batch)
    assert torch.equal(batch.tokens[prefix], teacher_logits.argmax(-1)[prefix])


def test_student_continues_from_the_kept_teacher_prefix(tiny: Tiny, guided: Guided) -> None:
    batch, cap = guided.batch, guided.cap
    assert len(guided.teacher.calls) == 1
    (asked, params, written) = guided.teacher.calls[0]
    assert asked == [tiny.prompts[int(g)] for g in batch.group]
    assert params.max_new_tokens == cap  # the teacher writes no more than the cap
    for row, gen in enumerate(written):
        kept = batch.tokens[row][batch.teacher_mask[row]].tolist()
        assert kept == gen.tokens[: min(len(gen.tokens), cap)]
        n_student = int(batch.student_mask[row].sum())
        if kept and kept[-1] == tiny.eos:
            assert n_student == 0
        else:
            assert 1 <= n_student <= MAX_NEW - len(kept)
    # The continuation was sampled given prompt + prefix: its recorded log-probs are the
    # student's on exactly that context.
    expected = token_logprobs(aligned_logits(tiny.student, batch), batch.tokens)
    student = batch.student_mask
    assert student.sum() > 20
    torch.testing.assert_close(
        batch.sampler_logprobs[student], expected[student], rtol=0, atol=1e-5
    )


def test_uniform_prefixes_stay_below_the_cap(tiny: Tiny) -> None:
    cap = 6
    teacher = RecordingEngine(tiny.teacher_engine())
    plan = GuidancePlan(cap=cap, mode="uniform")
    batch = rollouts(tiny, teacher=teacher, guidance=plan, rng=random.Random(1))
    (_, _, written) = teacher.calls[0]
    kept_lengths = batch.teacher_mask.sum(-1).tolist()
    for row, (kept, gen) in enumerate(zip(kept_lengths, written, strict=True)):
        assert 0 <= kept <= min(len(gen.tokens), cap)
        assert batch.tokens[row][batch.teacher_mask[row]].tolist() == gen.tokens[:kept]
    assert len(set(kept_lengths)) > 1, "uniform lengths should vary"


def test_zero_cap_writes_no_teacher_tokens(tiny: Tiny) -> None:
    teacher = FakeEngine(fixed_reply([5, 6, 7], tiny.eos))
    batch = rollouts(tiny, teacher=teacher, guidance=GuidancePlan(cap=0.0))
    assert not batch.teacher_mask.any()
    assert teacher.calls == [], "the teacher is not asked when the cap is 0"
    assert batch.student_mask.sum(-1).gt(0).all()


def test_no_teacher_means_no_prefix_even_with_a_plan(tiny: Tiny) -> None:
    batch = rollouts(tiny, guidance=GuidancePlan(cap=MAX_NEW))
    assert not batch.teacher_mask.any()


# --- fake engines: exact control over the prefix -------------------------------------

PROMPTS = [[4, 5, 6], [7, 8]]
EOS = 2
PAD = 0


def fake_rollouts(teacher_tokens: list[int], plan: GuidancePlan, samples: int = SAMPLES):
    student = FakeEngine(fixed_reply([9, 10, 11, EOS], EOS))
    teacher = FakeEngine(fixed_reply(teacher_tokens, EOS))
    batch = collect_rollouts(
        student,
        PROMPTS,
        SamplingParams(MAX_NEW),
        samples,
        PAD,
        teacher=teacher,
        guidance=plan,
        rng=random.Random(0),
    )
    return batch, student, teacher


def test_prefix_ending_with_eos_makes_the_row_fully_off_policy() -> None:
    batch, student, teacher = fake_rollouts([12, EOS], GuidancePlan(cap=4))
    assert student.calls == [], "no row is left for the student"
    assert not batch.student_mask.any()
    for row in range(len(batch)):
        prompt = PROMPTS[int(batch.group[row])]
        assert batch.tokens[row][batch.response_mask[row]].tolist() == [12, EOS]
        assert batch.origin[row, len(prompt) : len(prompt) + 2].eq(TEACHER).all()
    assert [p for p, _ in teacher.calls] == [p for p in PROMPTS for _ in range(SAMPLES)]
    assert all(params.max_new_tokens == 4 for _, params in teacher.calls)


def test_prefix_cut_before_the_teachers_eos_is_continued_by_the_student() -> None:
    batch, student, _ = fake_rollouts([12, 13, EOS], GuidancePlan(cap=2))
    # The teacher's reply is cut to the cap of 2 tokens, before its EOS.
    assert len(student.calls) == len(batch)
    for (context, params), row in zip(student.calls, range(len(batch)), strict=True):
        prompt = PROMPTS[int(batch.group[row])]
        assert context == [*prompt, 12, 13]
        assert params.max_new_tokens == MAX_NEW - 2
        assert batch.tokens[row][batch.teacher_mask[row]].tolist() == [12, 13]
        assert batch.tokens[row][batch.student_mask[row]].tolist() == [9, 10, 11, EOS]
        assert batch.sampler_logprobs[row][batch.student_mask[row]].eq(-0.5).all()
        assert batch.sampler_logprobs[row][~batch.student_mask[row]].eq(0).all()


def test_uniform_draw_of_full_eos_prefix_is_off_policy_only_when_eos_is_kept() -> None:
    plan = GuidancePlan(cap=MAX_NEW, mode="uniform")
    batch, student, _ = fake_rollouts([12, 13, EOS], plan, samples=40)
    kept = batch.teacher_mask.sum(-1)
    n_student = batch.student_mask.sum(-1)
    assert set(kept.tolist()) == {0, 1, 2, 3}
    for row in range(len(batch)):
        prefix = batch.tokens[row][batch.teacher_mask[row]].tolist()
        assert prefix == [12, 13, EOS][: int(kept[row])], "a prefix is the start of the reply"
    assert (n_student[kept == 3] == 0).all()
    assert (n_student[kept < 3] == 4).all()
    assert len(student.calls) == int((kept < 3).sum())


def test_prefix_that_fills_the_budget_leaves_no_student_tokens() -> None:
    long_reply = list(range(4, 4 + MAX_NEW + 3))  # no EOS, longer than the budget
    batch, student, teacher = fake_rollouts(long_reply, GuidancePlan(cap=MAX_NEW + 5))
    assert all(params.max_new_tokens == MAX_NEW for _, params in teacher.calls)
    assert student.calls == []
    assert batch.teacher_mask.sum(-1).eq(MAX_NEW).all()


def test_without_full_prefix_the_student_writes_part_of_every_rollout() -> None:
    plan = GuidancePlan(cap=4, full_prefix=False)
    batch, student, teacher = fake_rollouts([12, 13, EOS], plan)
    # The teacher is asked for one token past the cap, to see whether its reply ends
    # within it; the prefix stops one token short of the reply.
    assert all(params.max_new_tokens == 5 for _, params in teacher.calls)
    assert len(student.calls) == len(batch)
    for row in range(len(batch)):
        assert batch.tokens[row][batch.teacher_mask[row]].tolist() == [12, 13]
        assert batch.tokens[row][batch.student_mask[row]].tolist() == [9, 10, 11, EOS]


def test_without_full_prefix_a_reply_filling_the_budget_leaves_one_student_token() -> None:
    long_reply = list(range(4, 4 + MAX_NEW + 3))
    plan = GuidancePlan(cap=MAX_NEW + 5, full_prefix=False)
    batch, _, _ = fake_rollouts(long_reply, plan)
    assert batch.teacher_mask.sum(-1).eq(MAX_NEW - 1).all()
    assert batch.student_mask.sum(-1).eq(1).all()


@pytest.mark.parametrize(("share", "kept"), [(1.0, 4), (0.5, 2), (0.3, 1), (0.2, 0)])
def test_relative_cap_keeps_a_share_of_each_teacher_reply(share: float, kept: int) -> None:
    plan = GuidancePlan(cap=share, relative=True)
    batch, _, teacher = fake_rollouts([12, 13, 14, EOS], plan)
    # The whole reply is needed to know its length: the teacher gets the full budget.
    assert all(params.max_new_tokens == MAX_NEW for _, params in teacher.calls)
    assert batch.teacher_mask.sum(-1).eq(kept).all()  # floor(share * 4)


@pytest.mark.parametrize(("fraction", "guided_per_prompt"), [(0.5, 2), (0.25, 1), (1.0, 4)])
def test_guided_fraction_sets_how_many_rollouts_get_a_prefix(
    fraction: float, guided_per_prompt: int
) -> None:
    plan = GuidancePlan(cap=2, fraction=fraction)
    batch, _, teacher = fake_rollouts([12, 13, 14], plan, samples=4)
    assert len(teacher.calls) == guided_per_prompt * len(PROMPTS)
    has_prefix = batch.teacher_mask.any(-1)
    for p in range(len(PROMPTS)):
        assert int(has_prefix[batch.group == p].sum()) == guided_per_prompt
    assert batch.student_mask.any(-1).all()


@pytest.mark.parametrize(("temperature", "top_p"), [(1.0, 1.0), (0.7, 1.0), (1.3, 0.8)])
def test_cdf_sampler_draws_from_the_recorded_distribution(temperature: float, top_p: float) -> None:
    """`sample_tokens` draws each token with the probability it records: empirical
    frequencies over 200k draws match exp(recorded log-prob) within 5 standard errors,
    tokens outside the nucleus are never drawn, and zero-weight tokens never appear."""
    torch.manual_seed(0)
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0, float("-inf")])
    draws = 200_000
    tokens, recorded = sample_tokens(logits.expand(draws, -1).clone(), temperature, top_p)
    expected = torch.zeros_like(logits)
    expected[tokens] = recorded.exp()  # every draw of a token records the same value
    kept = torch.softmax(logits / temperature, -1)
    if top_p < 1:
        ordered, order = kept.sort(descending=True)
        keep = (ordered.cumsum(0) - ordered < top_p)[order.argsort()]
        kept = torch.where(keep, kept, 0.0) / kept[keep].sum()
    torch.testing.assert_close(expected, kept, rtol=1e-5, atol=1e-7)
    frequency = torch.bincount(tokens, minlength=len(logits)).double() / draws
    stderr = (kept.double() * (1 - kept.double()) / draws).sqrt()
    assert bool(((frequency - kept.double()).abs() <= 5 * stderr + 1e-12).all()), frequency
    assert frequency[kept == 0].sum() == 0


def test_cdf_sampler_greedy_and_large_vocabulary_logprobs() -> None:
    """Temperature 0 is the argmax; on a 50k vocabulary the recorded log-prob is the exact
    (float64) log-softmax at the drawn token, to float32 rounding."""
    torch.manual_seed(1)
    vocab = 50_000
    logits = torch.randn(6, vocab) * 4
    exact = torch.log_softmax(logits.double(), -1)
    lse = logits.double().logsumexp(-1)
    # lp = logit - logsumexp in float32: the logsumexp sums V terms exp(x - max) <= 1 (cascade
    # summation: relative error <= log2(V) eps, that much absolute after the log), rounds
    # the log (<= ln(V) eps) and adds the max (eps |lse|); the subtraction rounds eps |lp|.
    # Compared with float32 log_softmax instead, that one's own rounding (7e-6 here) counts.
    eps = torch.finfo(torch.float32).eps
    for temperature in (0.0, 1.0):
        token, lp = sample_tokens(logits, temperature)
        if temperature == 0:
            assert torch.equal(token, logits.argmax(-1))
        expected = exact.gather(-1, token[:, None])[:, 0]
        bound = eps * (lse.abs() + expected.abs() + math.log2(vocab) + math.log(vocab) + 1)
        assert ((lp.double() - expected).abs() <= bound).all(), (lp.double() - expected, bound)


def test_a_zero_token_budget_generates_nothing(tiny: Tiny) -> None:
    engine = HFEngine(tiny.student, tiny.pad, tiny.eos)
    out = engine.generate(tiny.prompts[:2], SamplingParams(0))
    assert [(g.tokens, g.logprobs, g.finished) for g in out] == [([], [], False)] * 2
