"""Objectives: `get_objective(name, **options)` and `list_objectives()`.

Each method is declared beside its rule (`methods.py`, `baselines.py`; the registry and
the rule contract: `registry.py`).

An objective is called as `obj(student_logits, batch)` with `student_logits [B, T, V]`
aligned with `batch.tokens` (see `tropd.batch.align_logits`), or, where
`obj.chunked_head`, a `HeadLogits` holding hidden states and the LM head (the training
loop's fast path: no `[B, T, V]` tensor), and returns an
`ObjectiveOutput` with `.loss` (scalar), `.token_loss` (`[B, T]`, zero where not
trained), `.metrics` (`dict[str, float]`) and `.weights` (what each mean in `.metrics`
averages over, so the metrics of several batches combine exactly).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from tropd.batch import TokenBatch

# Importing the rules registers them (`@register` beside each).
from tropd.objectives import baselines, methods  # noqa: F401
from tropd.objectives.estimators import agg_denominator, aggregate, entropy, k1_reward
from tropd.objectives.registry import REGISTRY, Method, OptionError, resolve_options
from tropd.objectives.routers import trust_probability

DIAGNOSTIC_CHUNK = 1024  # positions per chunk for the entropy diagnostic


@dataclass
class ObjectiveOutput:
    loss: torch.Tensor  # scalar
    token_loss: torch.Tensor  # [B, T], zero where not trained
    metrics: dict[str, float]  # means over tokens (or rows), and counts
    # The number of tokens (or rows, for per-sequence metrics) each mean in `metrics` is
    # taken over; metrics without a weight are counts. Means of several batches combine as
    # sum(weight * mean) / sum(weight) and counts add up (`tropd.train.loop.combine_metrics`).
    weights: dict[str, float] = field(default_factory=dict)


class Objective:
    """A method with resolved options; call it on `(student_logits, batch)`."""

    def __init__(self, name: str, method: Method, options: dict[str, Any]):
        self.name, self.method, self.options = name, method, options

    @property
    def wants_guidance(self) -> bool:
        """Whether its rollouts get teacher prefixes unless `guidance.enabled` says."""
        return self.method.guidance is not None

    @property
    def guidance_defaults(self) -> dict[str, Any]:
        """The `guidance.*` settings it runs with where the config leaves them null."""
        return self.method.guidance or {}

    @property
    def needs_reward(self) -> bool:
        return self.method.needs_reward

    @property
    def teacher_topk(self) -> bool:
        """Whether the rule reads the teacher's top-k ids and log-probs."""
        return self.method.teacher_topk(self.options)

    @property
    def teacher_entropy(self) -> bool:
        """Whether the rule reads the teacher's entropy."""
        return self.method.teacher_entropy

    @property
    def chunked_head(self) -> bool:
        """Whether it accepts a `tropd.head.HeadLogits` for the logits."""
        return self.method.chunked_head

    @property
    def blended_rollout(self) -> bool:
        """Whether its rollouts are sampled from the student-teacher blend
        (`tropd.rollout.blend.BlendEngine`, with `options["kl_budget"]` and
        `options["warmup_steps"]`) instead of the student alone."""
        return self.method.rollout == "blend"

    @property
    def separate_prefix(self) -> bool:
        """Whether teacher-prefix tokens are averaged apart from student tokens (TrOPD's
        `guidance_norm: separate`): `loss = mean_student(l_t) + mean_prefix(l_t)`, where
        the rule already weighs prefix losses by beta."""
        return self.options.get("guidance_norm") == "separate"

    def trained_mask(self, batch: TokenBatch) -> torch.Tensor:
        """`[B, T]` bool: the tokens this method's aggregation counts."""
        method = self.method
        return (batch.student_mask & method.trains_student) | (
            batch.teacher_mask & method.trains_prefix
        )

    def denominator(self, batch: TokenBatch) -> float:
        """The batch's count for the loss mean (tokens or sequences, by `loss_agg`); with
        `separate_prefix`, of the student tokens only."""
        mask = self.trained_mask(batch)
        if self.separate_prefix:
            mask = mask & ~batch.teacher_mask
        return agg_denominator(mask, self.options["loss_agg"])

    def prefix_denominator(self, batch: TokenBatch) -> float:
        """With `separate_prefix`, the count for the prefix loss's mean; else 0 (unused)."""
        if not self.separate_prefix:
            return 0.0
        mask = self.trained_mask(batch) & batch.teacher_mask
        return agg_denominator(mask, self.options["loss_agg"])

    def __call__(
        self,
        student_logits: torch.Tensor,
        batch: TokenBatch,
        *,
        denominator: float | None = None,
        prefix_denominator: float | None = None,
        generator: torch.Generator | None = None,
        step: int | None = None,
    ) -> ObjectiveOutput:
        """`denominator` (and `prefix_denominator`, with `separate_prefix`): the global
        counts when `batch` is one micro-batch of a larger batch (sum the micro-batch losses
        to get the global loss).
        `generator`: source of randomness for the hard trust gate.
        `step`: the 1-based optimizer step, for methods whose rule changes over training
        (REOPOLD's two-stage selection); None when unknown. The rule gets the ones it reads."""
        context = {"generator": generator, "step": step}
        token_loss, trained, parts = self.method.rule(
            student_logits, batch, self.options, **{k: context[k] for k in self.method.reads}
        )
        agg = self.options["loss_agg"]
        if self.separate_prefix:
            prefix = trained & batch.teacher_mask
            loss = aggregate(token_loss, trained & ~prefix, agg, denominator) + aggregate(
                token_loss, prefix, agg, prefix_denominator
            )
        else:
            loss = aggregate(token_loss, trained, agg, denominator)
        means = {name: _masked_mean(v, m) for name, (v, m) in parts.items()}
        chunk = self.options.get("chunk_size", DIAGNOSTIC_CHUNK)
        means.update(_diagnostics(student_logits, batch, chunk))
        counts = {"student_tokens": batch.student_mask, "teacher_tokens": batch.teacher_mask}
        metrics = {name: mean for name, (mean, _) in means.items()}
        metrics.update({name: float(mask.sum()) for name, mask in counts.items()})
        weights = {name: weight for name, (_, weight) in means.items()}
        return ObjectiveOutput(loss, token_loss, metrics, weights)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
    """(mean of `values` where `mask`, number of positions in `mask`); the mean of nothing is
    0."""
    count = float(mask.sum())
    if count == 0:
        return 0.0, 0.0
    return float((values.detach().float() * mask).sum() / count), count


@torch.no_grad()
def _diagnostics(
    student_logits: torch.Tensor, batch: TokenBatch, chunk_size: int
) -> dict[str, tuple[float, float]]:
    """SPEC §2.7 means every method can report from the batch alone, as `_masked_mean`'s
    (mean, count). The entropy is taken `chunk_size` positions at a time (no `[B * T, V]`
    fp32 temporary)."""
    student = batch.student_mask
    out = {"student_entropy": _masked_mean(entropy(student_logits, chunk_size), student)}
    if batch.teacher_logprobs is not None and batch.sampler_logprobs is not None:
        reward = k1_reward(batch.teacher_logprobs.float(), batch.sampler_logprobs.float())
        out["reward_mean"] = _masked_mean(reward, student)
        # E[min(1, pi_T/q)]: the trust fraction TrOPD's gate expects, for every method.
        out["trust_probability"] = _masked_mean(trust_probability(reward), student)
    if batch.teacher_topk_logprobs is not None:
        mass = batch.teacher_topk_logprobs.float().exp().sum(-1)
        out["teacher_topk_mass"] = _masked_mean(mass, student)
    return out


def list_objectives() -> list[str]:
    return sorted(REGISTRY)


def get_objective(name: str, **options: Any) -> Objective:
    """Build a registered objective; unknown names, options or values raise ValueError."""
    resolved = resolve_options(name, options)
    return Objective(name, REGISTRY[name], resolved)


def describe_objectives() -> list[dict[str, Any]]:
    """Name, summary, paper and default options of every method (for `tropd objectives`)."""
    return [
        {
            "name": n,
            "summary": m.summary,
            "paper": m.paper,
            "guidance": m.guidance,
            "options": m.defaults,
        }
        for n, m in sorted(REGISTRY.items())
    ]


__all__ = [
    "REGISTRY",
    "Objective",
    "ObjectiveOutput",
    "OptionError",
    "describe_objectives",
    "get_objective",
    "list_objectives",
]
