"""Generation engines. One interface, `Engine.generate`; the embedded default runs
Hugging Face `generate` (batched, KV cache) on the model in this process."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from tropd.batch import left_pad


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


class HFEngine:
    """`model.generate` on left-padded prompts, recording the sampler's log-probs.

    The recorded log-prob is taken from the processed scores (after temperature and
    top-p), i.e. the distribution the token was drawn from; with temperature 1 and
    top_p 1 that is the student's own log-prob. No extra forward pass is needed.
    """

    def __init__(self, model, pad_token_id: int, eos_token_id: int):
        self.model, self.pad_token_id, self.eos_token_id = model, pad_token_id, eos_token_id

    @torch.no_grad()
    def generate(
        self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]
    ) -> list[Generation]:
        synced = _sharded(self.model)
        if not prompts:
            if not synced:
                return []
            # Each forward of a sharded model is a collective, so a rank with nothing to
            # generate still joins in, with one short dummy generation.
            return self.generate([[self.pad_token_id]], SamplingParams(1))[:0]
        per_row = params if isinstance(params, list) else [params] * len(prompts)
        budget = max(p.max_new_tokens for p in per_row)
        first = per_row[0]
        device = next(self.model.parameters()).device
        input_ids, attention = left_pad(prompts, self.pad_token_id)
        width = input_ids.shape[1]
        sample = first.temperature > 0
        extra = (
            {"temperature": first.temperature, "top_p": first.top_p, "top_k": 0} if sample else {}
        )
        was_training = self.model.training
        self.model.eval()
        out = self.model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention.to(device),
            max_new_tokens=budget,
            do_sample=sample,
            pad_token_id=self.pad_token_id,
            eos_token_id=self.eos_token_id,
            synced_gpus=synced,  # ranks of a sharded model step together until all finish
            output_scores=True,
            return_dict_in_generate=True,
            **extra,
        )
        self.model.train(was_training)
        new = out.sequences[:, width:].cpu()
        logprobs = torch.stack(
            [
                torch.log_softmax(s.float(), -1)
                .gather(-1, new[:, t, None].to(s.device))
                .squeeze(-1)
                .cpu()
                for t, s in enumerate(out.scores)
            ],
            dim=1,
        )
        results = []
        for i, p in enumerate(per_row):
            row = new[i, : p.max_new_tokens].tolist()
            stop = row.index(self.eos_token_id) + 1 if self.eos_token_id in row else len(row)
            results.append(
                Generation(row[:stop], logprobs[i, :stop].tolist(), self.eos_token_id in row[:stop])
            )
        return results


def _sharded(model) -> bool:
    """Whether `model` is sharded over processes (FSDP2), so that all ranks must run each
    of its forward passes together."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)
