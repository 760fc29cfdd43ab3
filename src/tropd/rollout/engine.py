"""Generation engines. One interface, `Engine.generate`; the embedded default samples
from a Hugging Face causal LM in this process (batched, KV cache, `decode`)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from tropd.batch import left_pad
from tropd.head import cache_argument, chunked_head_supported, decoding_logits, hidden_only
from tropd.kernels import decoding
from tropd.rollout.lean import LeanStepper, lean_supported, pad_after_prefix, shared_prefix


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0


@dataclass
class Generation:
    tokens: list[int]  # generated tokens, EOS included when the model stopped
    logprobs: list[float]  # log q(token) under the distribution actually sampled from
    finished: bool  # ended with EOS (False: hit the token budget)


class Engine(Protocol):
    def generate(
        self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]
    ) -> list[Generation]:
        """One generation per prompt (token-id lists). A list of params gives each prompt
        its own budget; temperature and top_p must then agree."""
        ...


def per_prompt(params: SamplingParams | list[SamplingParams], n: int) -> list[SamplingParams]:
    """`Engine.generate`'s params as one `SamplingParams` per prompt."""
    return params if isinstance(params, list) else [params] * n


@dataclass
class DecodeState:
    """What a model's `decode` loop leaves behind, for scoring its own tokens without
    recomputing them (`tropd.teacher.score_batch`).

    Rows are the prompts' order. `cache`: the model's KV cache; `attention [N, C]`: 1 where
    cache column c holds a real token (prompts padded to `prompt_width`, on the left or
    after a prefix all rows share (`tropd.rollout.lean.pad_after_prefix`), generated token
    k in column `prompt_width + k`; the last sampled token is not in it);
    `hidden [N, S, H]`: the final hidden state of each of the S steps (step k's predicts
    generated token k), to which the LM head is applied as the model would."""

    model: Any
    cache: Any
    attention: torch.Tensor
    hidden: torch.Tensor
    prompt_width: int

    def select(self, part: slice) -> DecodeState | None:
        """The state of the rows `part` alone, as views of this one (which must then stay as
        it is; scoring extends a cache by new tensors, not in place); None for a cache
        without per-layer keys and values."""
        cache = copy.copy(self.cache)
        try:  # a transformers `Cache`: one copied layer object per layer, its tensors sliced
            cache.layers = [copy.copy(layer) for layer in self.cache.layers]
            for layer in cache.layers:
                layer.keys, layer.values = layer.keys[part], layer.values[part]
        except (AttributeError, TypeError):
            return None
        return DecodeState(
            self.model, cache, self.attention[part], self.hidden[part], self.prompt_width
        )


class HFEngine:
    """Batched sampling from a Hugging Face causal LM with its KV cache, recording the
    sampler's log-probs.

    The recorded log-prob is that of the distribution the token was drawn from (after
    temperature and top-p), i.e. with temperature 1 and top_p 1 the model's own log-prob;
    no extra forward pass is needed. Tokens are drawn by inverting the CDF of the
    unnormalised weights (`sample_tokens`): one exp, one cumsum and a binary search per
    step, a fraction of the cost of `torch.multinomial` over a large vocabulary on CPU.
    """

    def __init__(self, model, pad_token_id: int, eos_token_id: int):
        self.model, self.pad_token_id, self.eos_token_id = model, pad_token_id, eos_token_id

    @torch.no_grad()
    def generate(
        self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]
    ) -> list[Generation]:
        return decode(
            [self.model], prompts, params, self.pad_token_id, self.eos_token_id, _sample_one
        )

    @torch.no_grad()
    def generate_keeping_state(
        self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]
    ) -> tuple[list[Generation], DecodeState | None]:
        """`generate`, plus the model's `DecodeState` where its head can be applied apart
        from its forward (`chunked_head_supported`; None otherwise, or without prompts)."""
        return _decode(
            [self.model],
            prompts,
            params,
            self.pad_token_id,
            self.eos_token_id,
            _sample_one,
            keep=True,
        )


def _sample_one(logits: list[torch.Tensor], params: SamplingParams):
    """The `Picker` of a single model: `sample_tokens` from its logits."""
    return sample_tokens(logits[0], params.temperature, params.top_p)


Picker = Callable[[list[torch.Tensor], SamplingParams], tuple[torch.Tensor, torch.Tensor]]


def decode(
    models: list,
    prompts: list[list[int]],
    params: SamplingParams | list[SamplingParams],
    pad_token_id: int,
    eos_token_id: int,
    pick: Picker,
) -> list[Generation]:
    """The token-by-token loop every local engine shares: left-padded prompts run
    through each model with its own KV cache (positions counted from each prompt's first
    real token), `pick(last_logits, params)` turns the models' fp32 next-token logits
    `[N, V]` into `(tokens [N], recorded log-probs [N])`, and each row is cut after its
    EOS or its own budget. The loop stops when every row has finished; ranks of a sharded
    model instead run the same number of steps (each forward is a collective), and a rank
    without prompts joins with one dummy row."""
    return _decode(models, prompts, params, pad_token_id, eos_token_id, pick)[0]


def _decode(
    models: list,
    prompts: list[list[int]],
    params: SamplingParams | list[SamplingParams],
    pad_token_id: int,
    eos_token_id: int,
    pick: Picker,
    keep: bool = False,
) -> tuple[list[Generation], DecodeState | None]:
    """`decode`, and with `keep` the first model's `DecodeState` (None where it cannot be
    kept: no prompts, a sharded model, or a head applied inside the model's forward)."""
    synced = any(is_sharded(m) for m in models)
    if not prompts and not synced:
        return [], None
    per_row = per_prompt(params, len(prompts))
    budget = max((p.max_new_tokens for p in per_row), default=0)
    if synced:
        budget = _max_over_ranks(budget, models[0])
    first = per_row[0] if per_row else SamplingParams(budget)
    device = next(models[0].parameters()).device
    inputs, attention = left_pad(prompts or [[pad_token_id]], pad_token_id)
    inputs, attention = inputs.to(device), attention.to(device)
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    width = inputs.shape[1]
    steppers = [_stepper(m, not synced, len(inputs), width + budget) for m in models]
    if all(isinstance(s, LeanStepper) for s in steppers) and (shared := shared_prefix(prompts)):
        # Prompts sharing their first tokens: padding after those, run once (`LeanStepper`)
        inputs, attention = pad_after_prefix(prompts, shared, pad_token_id)
        inputs, attention = inputs.to(device), attention.to(device)
        for s in steppers:
            s.shared = shared
    keep = keep and bool(prompts) and steppers[0].head is not None
    if keep:
        steppers[0].hidden = []
    finished = torch.zeros(len(inputs), dtype=torch.bool, device=device)
    tokens, logprobs = [], []
    with decoding():
        for _ in range(budget):
            positions = (attention.cumsum(-1) - 1).clamp(min=0)[:, -inputs.shape[1] :]
            logits = [stepper(inputs, attention, positions) for stepper in steppers]
            cached = attention  # the columns the caches now hold
            token, logprob = pick(logits, first)
            tokens.append(token)
            logprobs.append(logprob)
            finished |= token == eos_token_id
            if finished.all() and not synced:
                break
            inputs = token[:, None]
            attention = torch.cat([attention, torch.ones_like(attention[:, :1])], dim=1)
    for m, mode in zip(models, modes, strict=True):
        m.train(mode)
    if not prompts:
        return [], None
    if not tokens:  # a budget of 0 tokens
        return [Generation([], [], False) for _ in prompts], None
    state = None
    if keep:
        hidden = torch.stack(steppers[0].hidden, 1)
        state = DecodeState(models[0], steppers[0].cache, cached, hidden, width)
    new = torch.stack(tokens, 1).cpu()
    recorded = torch.stack(logprobs, 1).float().cpu()
    results = []
    for i, p in enumerate(per_row):
        row = new[i, : p.max_new_tokens].tolist()
        stop = row.index(eos_token_id) + 1 if eos_token_id in row else len(row)
        results.append(
            Generation(row[:stop], recorded[i, :stop].tolist(), eos_token_id in row[:stop])
        )
    return results, state


def _stepper(model, local: bool, rows: int, columns: int):
    """`LeanStepper` where it computes the model's forward (`lean_supported`), else the
    model's own forward (`_Stepper`)."""
    if local and lean_supported(model):
        return LeanStepper(model, rows, columns)
    return _Stepper(model, local)


class _Stepper:
    """One model in the `decode` loop, with its own KV cache: next-token fp32 logits
    `[N, V]` from the tokens appended since the last call. Where the model allows
    (`chunked_head_supported`), the head is applied here in its fast orientation
    (`decoding_logits`) instead of inside the model's forward."""

    def __init__(self, model, local: bool):
        self.model, self.cache = model, None
        self.hidden: list[torch.Tensor] | None = None  # final hidden states, when kept
        self.cache_name = cache_argument(model)
        self.head = (
            model.get_output_embeddings() if local and chunked_head_supported(model) else None
        )

    def __call__(self, inputs, attention, positions) -> torch.Tensor:
        step = {
            "input_ids": inputs,
            "attention_mask": attention,
            "position_ids": positions,
            self.cache_name: self.cache,
            "use_cache": True,
        }
        if self.head is None:
            out = self.model(**step, logits_to_keep=1)
            self.cache = out[self.cache_name]
            return out.logits[:, -1].float()
        out = hidden_only(self.model, **step)
        self.cache = out[self.cache_name]
        last = out.hidden_states[-1][:, -1]
        if self.hidden is not None:
            self.hidden.append(last)
        return decoding_logits(self.head, last)


def sample_tokens(
    logits: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row of fp32 `logits [N, V]` and its log-prob under the distribution
    it was drawn from: softmax(logits / temperature), truncated to the top-p nucleus and
    renormalised. Temperature 0 takes the argmax and records the untempered log-prob.

    Sampling inverts the CDF: `u ~ U(0, total)` against the running sum of
    `exp(logits - max)`, found by binary search; a token of weight 0 is never drawn. The
    recorded log-prob is normalised with a log-sum-exp of the same weights (a pairwise
    sum, exact to float32 rounding), not with that running float32 sum (whose rounding
    grows with the vocabulary)."""
    if temperature == 0:
        token = logits.argmax(-1)
        return token, logits.gather(-1, token[:, None]).squeeze(-1) - logits.logsumexp(-1)
    if temperature != 1:
        logits = logits / temperature
    if top_p < 1:
        logits = top_p_logits(logits, top_p)
    peak = logits.amax(-1, keepdim=True)
    weights = (logits - peak).exp_()
    cdf = weights.cumsum(-1)
    total = cdf[:, -1:]
    draw = torch.rand(cdf.shape[0], 1, device=cdf.device, dtype=cdf.dtype) * total
    # Strictly below the total, so the first CDF entry above the draw exists and is a
    # step up: a token of positive weight.
    draw = torch.minimum(draw, torch.nextafter(total, torch.zeros_like(total)))
    token = torch.searchsorted(cdf, draw, right=True)
    # log-sum-exp from the same weights: peak + log(sum), the sum a pairwise reduction
    lse = peak + weights.sum(-1, keepdim=True).log_()
    logprob = logits.gather(-1, token) - lse
    return token.squeeze(-1), logprob.squeeze(-1)


def top_p_logits(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus truncation of `[N, V]` logits (or log-probs): keep the most likely tokens
    until their mass reaches `top_p` (at least one); the rest become -inf."""
    ordered, order = logits.sort(dim=-1, descending=True)
    probs = ordered.softmax(-1)
    drop_sorted = probs.cumsum(-1) - probs >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def _max_over_ranks(value: int, model) -> int:
    total = torch.tensor([value], device=next(model.parameters()).device)
    torch.distributed.all_reduce(total, op=torch.distributed.ReduceOp.MAX)
    return int(total)


def is_sharded(model) -> bool:
    """Whether `model` is sharded over processes (FSDP2), so that all ranks must run each
    of its forward passes together."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)
