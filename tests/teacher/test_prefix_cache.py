"""Scoring from the teacher's own KV cache (`TeacherCache`): the rows whose prefix the
teacher wrote are scored from the cache of that generation, and the scores equal those of
a full forward over every row to float32 rounding."""

from __future__ import annotations

import copy
import random

import pytest
import torch

from tropd.batch import TokenBatch
from tropd.model_names import load_model, load_tokenizer
from tropd.rollout import (
    GuidancePlan,
    HFEngine,
    SamplingParams,
    collect_rollouts,
    teacher_request,
    write_prefixes,
)
from tropd.teacher import score_batch

MAX_NEW = 10
FIELDS = ("teacher_logprobs", "teacher_topk_logprobs", "teacher_entropy")
# Both paths run the same float32 ops on the same values, batched and ordered differently
# (one token per step against the whole sequence; 1 against 2 query rows in the
# attention). Each dot product of k <= 128 terms of size O(1) then differs by at most about
# k * 2^-24 ~ 1e-5 relative to the sum of its |terms|, carried through two layers and the
# log-softmax with gain O(1).
ATOL = 1e-5


@pytest.fixture(scope="module")
def models(tiny_pair):
    teacher_dir, student_dir = tiny_pair
    tokenizer = load_tokenizer(student_dir)
    return (
        load_model(teacher_dir, "float32", "cpu"),
        load_model(student_dir, "float32", "cpu"),
        tokenizer,
    )


PLANS = {
    # tropd's defaults: half the rows guided, a uniform share of the whole teacher response.
    "relative-uniform": GuidancePlan(1.0, "uniform", 0.5, 1.0, True, False),
    # Absolute cap, whole prefixes allowed: prefixes that end in EOS or fill the budget.
    "absolute-full": GuidancePlan(6, "cap", 1.0, 1.5, False, True),
    "relative-cap": GuidancePlan(0.5, "cap", 0.75, 1.0, True, False),
}


PROMPTS = {
    "distinct": ("12+34=", "7+5=", "1=", "908+77=", "3"),
    # A prefix every prompt shares: decoded once for all rows, padding after it.
    "shared": ("1111+2=", "1111+34=", "1111+5=", "1111+67=", "1111+8="),
}


def guided_batch(models, plan: GuidancePlan, seed: int, prompts: str = "distinct") -> TokenBatch:
    teacher, student, tok = models
    prompts = [tok.encode(text) for text in PROMPTS[prompts]]
    torch.manual_seed(seed)
    return collect_rollouts(
        HFEngine(student, tok.pad_token_id, tok.eos_token_id),
        prompts,
        SamplingParams(MAX_NEW),
        4,
        tok.pad_token_id,
        teacher=HFEngine(teacher, tok.pad_token_id, tok.eos_token_id),
        guidance=plan,
        rng=random.Random(seed),
    )


def assert_cached_scores_equal_a_full_forward(teacher, batch: TokenBatch) -> TokenBatch:
    """Scores `batch` from its teacher cache and by a full forward; they agree on every
    response position to `ATOL`, and the cache was read. Returns the cached scores."""
    full = score_batch(teacher, batch.replace(teacher_cache=None), top_k=5, chunk_size=7)
    cached = score_batch(teacher, batch, top_k=5, chunk_size=7)
    assert batch.teacher_cache.used and cached.teacher_cache is None
    response = batch.response_mask
    for name in FIELDS:
        torch.testing.assert_close(
            getattr(cached, name)[response], getattr(full, name)[response], rtol=0, atol=ATOL
        )
    return cached


@pytest.mark.parametrize("prompts", list(PROMPTS))
@pytest.mark.parametrize("plan", list(PLANS))
@pytest.mark.parametrize("seed", [0, 1])
def test_cached_scores_equal_a_full_forward(models, plan: str, seed: int, prompts: str) -> None:
    teacher = models[0]
    batch = guided_batch(models, PLANS[plan], seed, prompts)
    assert batch.teacher_cache is not None
    assert batch.teacher_mask.any()
    cached = assert_cached_scores_equal_a_full_forward(teacher, batch)
    for name in FIELDS:
        assert not getattr(cached, name)[~batch.response_mask].any()


def test_cache_is_read_once(models) -> None:
    """A second scoring of the same batch runs the full forward (the cache was extended in
    place by the first) and still agrees."""
    teacher = models[0]
    batch = guided_batch(models, PLANS["relative-uniform"], 3)
    first = score_batch(teacher, batch, top_k=3)
    second = score_batch(teacher, batch, top_k=3)
    torch.testing.assert_close(second.teacher_logprobs, first.teacher_logprobs, rtol=0, atol=ATOL)


def test_prompt_and_prefix_are_not_run_again(models) -> None:
    """The teacher's forward sees the unguided rows whole and, of each guided row, only its
    last prompt/prefix token and its continuation."""
    teacher = models[0]
    batch = guided_batch(models, PLANS["relative-uniform"], 2)
    guided = torch.zeros(len(batch), dtype=torch.bool)
    guided[batch.teacher_cache.rows] = True
    fed = []
    hook = teacher.get_decoder().register_forward_pre_hook(
        lambda _module, args, kwargs: fed.append(tuple(kwargs["input_ids"].shape)),
        with_kwargs=True,
    )
    try:
        score_batch(teacher, batch, top_k=0, entropy=False)
    finally:
        hook.remove()
    plain_width = int(batch.attention_mask[~guided].sum(-1).max())
    continuation = int(batch.student_mask[guided].sum(-1).clamp(min=1).max())
    assert fed == [(int((~guided).sum()), plain_width), (int(guided.sum()), continuation)]
    assert continuation < int(batch.attention_mask[guided].sum(-1).max())


def test_another_models_cache_is_ignored(models) -> None:
    """Scoring with a model other than the one that wrote the prefixes uses no cache."""
    teacher, student = models[0], models[1]
    batch = guided_batch(models, PLANS["relative-uniform"], 4)
    scored = score_batch(student, batch, top_k=0)
    full = score_batch(student, batch.replace(teacher_cache=None), top_k=0)
    assert not batch.teacher_cache.used
    torch.testing.assert_close(scored.teacher_logprobs, full.teacher_logprobs, rtol=0, atol=0)
    assert teacher is not student


def test_a_teacher_that_stops_early_leaves_a_cache_that_matches(models) -> None:
    """Every guided row ends with EOS before the budget, so the generation loop stops early
    (its last step's tokens never enter the cache); scores still equal a full forward."""
    teacher, student, tok = models
    eager = copy.deepcopy(teacher)
    head = torch.nn.Linear(eager.config.hidden_size, eager.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.copy_(eager.get_output_embeddings().weight)
        head.bias.zero_()
        head.bias[tok.eos_token_id] = 4.0  # EOS about every other token
    eager.set_output_embeddings(head)
    batch = guided_batch((eager, student, tok), PLANS["relative-uniform"], 5)
    assert batch.teacher_cache.state.hidden.shape[1] < MAX_NEW
    assert_cached_scores_equal_a_full_forward(eager, batch)


@pytest.mark.parametrize("plan", ["relative-uniform", "absolute-full"])
def test_prefixes_written_ahead_score_like_a_full_forward(models, plan: str) -> None:
    """Three steps' requests written in one teacher loop (`write_prefixes`): each step's
    batch holds its own rows of that loop's state, and its cached scores equal a full
    forward over its rows (also after the steps before it extended their own caches); the
    prefixes are the loop's tokens for that step's rows."""
    teacher, student, tok = models
    pad, eos = tok.pad_token_id, tok.eos_token_id
    steps = [PROMPTS["distinct"][:3], PROMPTS["shared"][:4], PROMPTS["distinct"][2:]]
    steps = [[tok.encode(text) for text in prompts] for prompts in steps]
    guide = PLANS[plan]
    params = SamplingParams(MAX_NEW)
    requests = [teacher_request(p, 2, params, guide, random.Random(s)) for s, p in enumerate(steps)]
    torch.manual_seed(0)
    written = write_prefixes(HFEngine(teacher, pad, eos), requests)
    assert [w.picked for w in written] == [r.picked for r in requests]
    for s, (prompts, part) in enumerate(zip(steps, written, strict=True)):
        batch = collect_rollouts(
            HFEngine(student, pad, eos),
            prompts,
            params,
            2,
            pad,
            guidance=guide,
            rng=random.Random(s),
            written=part,
        )
        assert batch.teacher_cache.state is part.state and batch.teacher_mask.any()
        for row, generation in zip(part.picked, part.generations, strict=True):
            prefix = batch.tokens[row][batch.teacher_mask[row]].tolist()
            assert prefix == generation.tokens[: len(prefix)]
        assert_cached_scores_equal_a_full_forward(teacher, batch)


def test_responses_written_for_other_rows_are_refused(models) -> None:
    teacher, student, tok = models
    pad, eos = tok.pad_token_id, tok.eos_token_id
    prompts = [tok.encode(text) for text in PROMPTS["distinct"]]
    guide = PLANS["relative-uniform"]
    request = teacher_request(prompts, 4, SamplingParams(MAX_NEW), guide, random.Random(0))
    (written,) = write_prefixes(HFEngine(teacher, pad, eos), [request])
    with pytest.raises(ValueError, match="written ahead"):
        collect_rollouts(
            HFEngine(student, pad, eos),
            prompts,
            SamplingParams(MAX_NEW),
            4,
            pad,
            guidance=guide,
            rng=random.Random(1),  # another step's draws: other rows guided
            written=written,
        )
