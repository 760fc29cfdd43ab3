"""Rollouts: prompts -> (teacher prefixes) -> student continuations -> `TokenBatch`."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from tropd.batch import PROMPT, STUDENT, TEACHER, TokenBatch
from tropd.rollout.engine import DecodeState, Engine, Generation, HFEngine, SamplingParams
from tropd.rollout.guidance import guided_rows, prefix_cap, prefix_lengths


@dataclass(frozen=True)
class GuidancePlan:
    """What the teacher writes this step: `cap` tokens at most (a share of each teacher
    response when `relative`), `mode` cap|uniform, for `fraction` of each prompt's
    rollouts, sampled at `temperature`. `full_prefix`: whether a prefix may cover a
    whole teacher response (a fully off-policy rollout); see `prefix_lengths`."""

    cap: float
    mode: str = "cap"
    fraction: float = 1.0
    temperature: float = 1.0
    relative: bool = False
    full_prefix: bool = True


@dataclass
class TeacherCache:
    """The teacher's `DecodeState` from writing the prefixes; its row j is batch row
    `rows[j]`. Read once (`tropd.teacher.score_batch` extends the cache in place and sets
    `used`)."""

    state: DecodeState
    rows: list[int]
    used: bool = False


@dataclass(frozen=True)
class TeacherRequest:
    """What the teacher writes for one step: a response for each rollout in `picked` (batch
    rows, prompt-major), to `prompts` (those rows' prompts), with `params`."""

    picked: list[int]
    prompts: list[list[int]]
    params: SamplingParams


@dataclass
class Written:
    """The teacher's responses to one `TeacherRequest`, in its order, and its `DecodeState`
    over them where it could be kept (None otherwise)."""

    picked: list[int]
    generations: list[Generation]
    state: DecodeState | None


def teacher_request(
    prompts: list[list[int]],
    samples_per_prompt: int,
    params: SamplingParams,
    guidance: GuidancePlan | None,
    rng: random.Random,
) -> TeacherRequest | None:
    """The rollouts that get a prefix this step (`guided_rows`, drawn from `rng`) and the
    budget the teacher writes them with; None where guidance is off or its cap is 0.

    A relative cap needs the whole teacher response (its length sets the cap); one token
    past an absolute cap tells whether the response ends within it."""
    on = guidance is not None and guidance.cap > 0 and (guidance.relative or guidance.cap >= 1)
    if not on:
        return None
    guided = guided_rows(len(prompts), samples_per_prompt, guidance.fraction, rng)
    picked = [i for i, g in enumerate(guided) if g]
    budget = int(guidance.cap) + (not guidance.full_prefix)
    budget = params.max_new_tokens if guidance.relative else budget
    return TeacherRequest(
        picked,
        [prompts[i // samples_per_prompt] for i in picked],
        SamplingParams(min(budget, params.max_new_tokens), guidance.temperature, 1.0),
    )


def write_prefixes(teacher: Engine, requests: list[TeacherRequest]) -> list[Written]:
    """The teacher's responses to several requests (several steps' guided rollouts) from
    one generation call: a decoding loop's cost hardly grows with its rows while it is
    bound by reading the weights, so one loop serves them all. A teacher that can keep its
    state (`HFEngine.generate_keeping_state`) leaves each request its own rows of it."""
    prompts = [p for r in requests for p in r.prompts]
    params = [r.params for r in requests for _ in r.prompts]
    if len({*params}) == 1:
        params = params[0]
    if keeping := getattr(teacher, "generate_keeping_state", None):
        generations, state = keeping(prompts, params)
    else:
        generations, state = teacher.generate(prompts, params), None
    written, begin = [], 0
    for r in requests:
        end = begin + len(r.picked)
        part = state if len(requests) == 1 or state is None else state.select(slice(begin, end))
        written.append(Written(r.picked, generations[begin:end], part))
        begin = end
    return written


def collect_rollouts(
    student: Engine,
    prompts: list[list[int]],
    params: SamplingParams,
    samples_per_prompt: int,
    pad_token_id: int,
    teacher: Engine | None = None,
    guidance: GuidancePlan | None = None,
    rng: random.Random | None = None,
    written: Written | None = None,
) -> TokenBatch:
    """Sample `samples_per_prompt` responses per prompt and pack them right-padded.

    With guidance, the teacher first writes up to `int(guidance.cap)` tokens per guided
    rollout (its whole response when the cap is relative; `teacher_request`); a prefix of
    that is kept (origin TEACHER) and the student continues (origin STUDENT) within the
    remaining budget `params.max_new_tokens - len(prefix)`. A prefix that ends with the
    teacher's EOS makes the rollout fully off-policy (never so without
    `guidance.full_prefix`). `written`: the teacher's responses to this step's request,
    written beforehand (with other steps', `write_prefixes`), instead of calling `teacher`.
    Rows are prompt-major; `group` holds each row's prompt index. A teacher state kept
    with the responses (`HFEngine.generate_keeping_state`) is left on the batch
    (`teacher_cache`) for `tropd.teacher.score_batch`.
    """
    rng = rng or random.Random(0)
    rows = [p for p in prompts for _ in range(samples_per_prompt)]
    prefixes: list[Generation] = [Generation([], [], False) for _ in rows]
    cache = None
    request = teacher_request(prompts, samples_per_prompt, params, guidance, rng)
    if request is not None and (teacher is not None or written is not None):
        if written is None:
            written = write_prefixes(teacher, [request])[0]
        elif written.picked != request.picked:
            raise ValueError(
                f"the teacher's responses written ahead are for rows {written.picked}, but "
                f"this step guides rows {request.picked}: write them for this step's prompts"
            )
        if written.state is not None:
            cache = TeacherCache(written.state, written.picked)
        keep = prefix_lengths(
            [len(g.tokens) for g in written.generations],
            guidance.cap,
            guidance.mode,
            [True] * len(written.picked),
            rng,
            guidance.relative,
            guidance.full_prefix,
        )
        for i, gen, n in zip(written.picked, written.generations, keep, strict=True):
            prefixes[i] = Generation(gen.tokens[:n], [], gen.finished and n == len(gen.tokens))

    open_rows = [
        i
        for i, p in enumerate(prefixes)
        if not p.finished and len(p.tokens) < params.max_new_tokens
    ]
    continuations = student.generate(
        [rows[i] + prefixes[i].tokens for i in open_rows],
        [
            SamplingParams(
                params.max_new_tokens - len(prefixes[i].tokens), params.temperature, params.top_p
            )
            for i in open_rows
        ],
    )
    cont: dict[int, Generation] = dict(zip(open_rows, continuations, strict=True))

    width = max(
        len(r) + len(p.tokens) + len(cont[i].tokens if i in cont else [])
        for i, (r, p) in enumerate(zip(rows, prefixes, strict=True))
    )
    shape = (len(rows), width)
    tokens = torch.full(shape, pad_token_id, dtype=torch.long)
    origin = torch.full(shape, PROMPT, dtype=torch.long)
    attention = torch.zeros(shape, dtype=torch.long)
    sampler_lp = torch.zeros(shape)
    for i, (prompt, prefix) in enumerate(zip(rows, prefixes, strict=True)):
        gen = cont.get(i, Generation([], [], True))
        seq = prompt + prefix.tokens + gen.tokens
        a, b = len(prompt), len(prompt) + len(prefix.tokens)
        tokens[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention[i, : len(seq)] = 1
        origin[i, a:b] = TEACHER
        origin[i, b : len(seq)] = STUDENT
        sampler_lp[i, b : len(seq)] = torch.tensor(gen.logprobs)
    group = torch.arange(len(prompts)).repeat_interleave(samples_per_prompt)
    return TokenBatch(
        tokens=tokens,
        origin=origin,
        attention_mask=attention,
        sampler_logprobs=sampler_lp,
        group=group,
        teacher_cache=cache,
    )


__all__ = [
    "Engine",
    "Generation",
    "GuidancePlan",
    "HFEngine",
    "SamplingParams",
    "TeacherCache",
    "TeacherRequest",
    "Written",
    "collect_rollouts",
    "prefix_cap",
    "teacher_request",
    "write_prefixes",
]
