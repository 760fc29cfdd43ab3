"""The objective registry: `get_objective(name, **options)` and `list_objectives()`.

An objective is called as `obj(student_logits, batch)` with `student_logits [B, T, V]`
aligned with `batch.tokens` (see `tropd.batch.align_logits`) and returns an
`ObjectiveOutput` with `.loss` (scalar), `.token_loss` (`[B, T]`, zero where not
trained) and `.metrics` (`dict[str, float]`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from tropd.batch import TokenBatch
from tropd.objectives import methods
from tropd.objectives.estimators import agg_denominator, aggregate, entropy, k1_reward
from tropd.objectives.routers import TRUST_GATES

LOSS_AGGS = ("token_mean", "seq_mean_token_mean", "seq_sum")
OUTLIERS = ("fkl", "mask", "clip")
DEFAULT_TAU = -1.3862943611198906  # log(0.2 / 0.8), REOPOLD's lambda = 0.2


@dataclass(frozen=True)
class Method:
    """A registry entry: the rule, its options with defaults, and what it needs."""

    fn: Callable
    defaults: dict[str, Any]
    summary: str
    paper: str
    guidance: bool = False  # whether rollouts get teacher prefixes by default
    trains_prefix: bool = False  # whether teacher-prefix tokens are trained (and counted)
    needs_reward: bool = False  # whether the loop must fill `batch.reward` with the verifier
    choices: dict[str, tuple] = field(default_factory=dict)


_COMMON = {"loss_agg": "token_mean"}
_TROPD = {
    "trust_gate": "hard",
    "outlier": "fkl",
    "tau": DEFAULT_TAU,
    "beta": 0.001,
    "logprob_floor": -30.0,
    "ppo_clip": None,
    **_COMMON,
}
_TROPD_CHOICES = {"trust_gate": TRUST_GATES, "outlier": OUTLIERS, "loss_agg": LOSS_AGGS}
_TROPD_PAPER = "Xing et al. 2026, arXiv 2606.01249"

REGISTRY: dict[str, Method] = {
    "opd": Method(
        methods.opd,
        {"kl_coef": 1.0, "ppo_clip": None, "gamma": 0.0, **_COMMON},
        "-exp(lpS-lq)·r_t, r_t = lpT-lq, on student tokens",
        "Thinking Machines, On-Policy Distillation (2025)",
        choices={"loss_agg": LOSS_AGGS},
    ),
    "tropd": Method(
        methods.tropd,
        _TROPD,
        "trust gate min(1,e^r): OPD in region, top-k FKL on outliers, β·NLL on teacher prefix",
        _TROPD_PAPER,
        guidance=True,
        trains_prefix=True,
        choices=_TROPD_CHOICES,
    ),
    "fkl_outlier": Method(
        methods.tropd,
        _TROPD,
        "TrOPD's trust gate and top-k FKL outliers, no teacher prefixes",
        _TROPD_PAPER,
        trains_prefix=True,
        choices=_TROPD_CHOICES,
    ),
    "mask_outlier": Method(
        methods.tropd,
        {**_TROPD, "trust_gate": "threshold", "outlier": "mask"},
        "OPD only on tokens with r_t > τ",
        _TROPD_PAPER,
        trains_prefix=True,
        choices=_TROPD_CHOICES,
    ),
    "clip_outlier": Method(
        methods.tropd,
        {**_TROPD, "trust_gate": "threshold", "outlier": "clip"},
        "OPD with reward max(r_t, τ) (REOPOLD's clip)",
        _TROPD_PAPER,
        trains_prefix=True,
        choices=_TROPD_CHOICES,
    ),
    "topk_fkl": Method(
        methods.topk_fkl,
        {"logprob_floor": -30.0, **_COMMON},
        "Σ_{v∈top-k} π_T(v)(lpT_v − lpS_v) on every student token (negative control)",
        _TROPD_PAPER,
        choices={"loss_agg": LOSS_AGGS},
    ),
}


@dataclass
class ObjectiveOutput:
    loss: torch.Tensor  # scalar
    token_loss: torch.Tensor  # [B, T], zero where not trained
    metrics: dict[str, float]


class Objective:
    """A method with resolved options; call it on `(student_logits, batch)`."""

    def __init__(self, name: str, method: Method, options: dict[str, Any]):
        self.name, self.method, self.options = name, method, options

    @property
    def wants_guidance(self) -> bool:
        return self.method.guidance

    @property
    def needs_reward(self) -> bool:
        return self.method.needs_reward

    def trained_mask(self, batch: TokenBatch) -> torch.Tensor:
        """`[B, T]` bool: the tokens this method's aggregation counts."""
        return batch.response_mask if self.method.trains_prefix else batch.student_mask

    def denominator(self, batch: TokenBatch) -> float:
        return agg_denominator(self.trained_mask(batch), self.options["loss_agg"])

    def __call__(
        self,
        student_logits: torch.Tensor,
        batch: TokenBatch,
        *,
        denominator: float | None = None,
        generator: torch.Generator | None = None,
    ) -> ObjectiveOutput:
        """`denominator`: the global token/sequence count when `batch` is one micro-batch of
        a larger batch (sum the micro-batch losses to get the global loss).
        `generator`: source of randomness for the hard trust gate."""
        token_loss, trained, parts = self.method.fn(student_logits, batch, self.options, generator)
        loss = aggregate(token_loss, trained, self.options["loss_agg"], denominator)
        metrics = {name: _masked_mean(v, m) for name, (v, m) in parts.items()}
        metrics.update(_diagnostics(student_logits, batch))
        return ObjectiveOutput(loss=loss, token_loss=token_loss, metrics=metrics)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> float:
    count = mask.sum()
    if count == 0:
        return 0.0
    return float((values.detach().float() * mask).sum() / count)


@torch.no_grad()
def _diagnostics(student_logits: torch.Tensor, batch: TokenBatch) -> dict[str, float]:
    """SPEC §2.7 metrics every method can report from the batch alone."""
    student = batch.student_mask
    out = {
        "student_entropy": float(entropy(student_logits[student]).mean()) if student.any() else 0.0
    }
    if batch.teacher_logprobs is not None and batch.sampler_logprobs is not None:
        reward = k1_reward(batch.teacher_logprobs.float(), batch.sampler_logprobs.float())
        out["reward_mean"] = _masked_mean(reward, student)
    if batch.teacher_topk_logprobs is not None:
        mass = batch.teacher_topk_logprobs.float().exp().sum(-1)
        out["teacher_topk_mass"] = _masked_mean(mass, student)
    out["student_tokens"] = float(student.sum())
    out["teacher_tokens"] = float(batch.teacher_mask.sum())
    return out


def list_objectives() -> list[str]:
    return sorted(REGISTRY)


def get_objective(name: str, **options: Any) -> Objective:
    """Build a registered objective; unknown names, options or values raise ValueError."""
    if name not in REGISTRY:
        raise ValueError(f"unknown objective {name!r}; valid: {', '.join(list_objectives())}")
    method = REGISTRY[name]
    unknown = sorted(set(options) - set(method.defaults))
    if unknown:
        raise ValueError(
            f"objective {name!r} has no option {', '.join(unknown)}; "
            f"valid: {', '.join(sorted(method.defaults))}"
        )
    resolved = {**method.defaults, **options}
    _validate(name, method, resolved)
    return Objective(name, method, resolved)


def _validate(name: str, method: Method, opt: dict[str, Any]) -> None:
    for key, allowed in method.choices.items():
        if opt[key] not in allowed:
            raise ValueError(f"{name}.{key}={opt[key]!r} is not one of {', '.join(allowed)}")
    checks = {
        "beta": (lambda v: 0 <= v <= 1, "must be in [0, 1]"),
        "ppo_clip": (
            lambda v: v is None or 0 < v < 1,
            "must be null (off) or in (0, 1)",
        ),
        "logprob_floor": (lambda v: v < 0, "must be negative (a log-probability)"),
        "gamma": (lambda v: 0 <= v <= 1, "must be in [0, 1]"),
        "kl_coef": (lambda v: v > 0, "must be positive"),
        "tau": (lambda v: v <= 0, "must be <= 0 (a log-ratio threshold)"),
    }
    for key, (ok, why) in checks.items():
        if key in opt and not _check(ok, opt[key]):
            raise ValueError(f"{name}.{key}={opt[key]!r} {why}")


def _check(ok: Callable[[Any], bool], value: Any) -> bool:
    try:
        return bool(ok(value))
    except TypeError:
        return False


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
    "Objective",
    "ObjectiveOutput",
    "describe_objectives",
    "get_objective",
    "list_objectives",
]
