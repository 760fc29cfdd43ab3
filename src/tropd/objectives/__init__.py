"""The objective registry: `get_objective(name, **options)` and `list_objectives()`.

An objective is called as `obj(student_logits, batch)` with `student_logits [B, T, V]`
aligned with `batch.tokens` (see `tropd.batch.align_logits`), or, where
`obj.chunked_head`, a `HeadLogits` holding hidden states and the LM head (the training
loop's fast path: no `[B, T, V]` tensor), and returns an
`ObjectiveOutput` with `.loss` (scalar), `.token_loss` (`[B, T]`, zero where not
trained) and `.metrics` (`dict[str, float]`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from tropd.batch import TokenBatch
from tropd.objectives import baselines, methods
from tropd.objectives.estimators import agg_denominator, aggregate, entropy, k1_reward
from tropd.objectives.routers import TRUST_GATES, trust_probability

LOSS_AGGS = ("token_mean", "seq_mean_token_mean", "seq_sum")
OUTLIERS = ("fkl", "mask", "clip")
DEFAULT_TAU = -1.3862943611198906  # log(0.2 / 0.8), REOPOLD's lambda = 0.2
DIAGNOSTIC_CHUNK = 1024  # positions per chunk for the entropy diagnostic


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
    choices: dict[str, tuple] = field(default_factory=dict)  # besides `loss_agg` (all methods)
    trains_student: bool = True  # whether student tokens are trained (and counted)
    rollout: str = "student"  # "blend": rollouts come from `tropd.rollout.blend.BlendEngine`
    checks: dict[str, tuple[Callable[[Any], bool], str]] = field(default_factory=dict)
    # Whether the rule reads the student only through `token_logprobs` and `entropy`, so
    # the loop may pass a `HeadLogits` (chunked LM head) instead of `[B, T, V]` logits.
    chunked_head: bool = True
    # Whether the rule reads the teacher's top-k (`teacher_topk_*`), given the options,
    # and its entropy: scoring skips what no one reads.
    teacher_topk: Callable[[dict[str, Any]], bool] = lambda options: True
    teacher_entropy: bool = False


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
_TROPD_CHOICES = {"trust_gate": TRUST_GATES, "outlier": OUTLIERS}
_TROPD_PAPER = "Xing et al. 2026, arXiv 2606.01249"


def _never(options: dict[str, Any]) -> bool:
    return False


def _fkl_outliers(options: dict[str, Any]) -> bool:
    return options["outlier"] == "fkl"


REGISTRY: dict[str, Method] = {
    "opd": Method(
        methods.opd,
        {"kl_coef": 1.0, "ppo_clip": None, "gamma": 0.0, **_COMMON},
        "-exp(lpS-lq)·r_t, r_t = lpT-lq, on student tokens",
        "Thinking Machines, On-Policy Distillation (2025)",
        teacher_topk=_never,
    ),
    "tropd": Method(
        methods.tropd,
        _TROPD,
        "trust gate min(1,e^r): OPD in region, top-k FKL on outliers, β·NLL on teacher prefix",
        _TROPD_PAPER,
        guidance=True,
        trains_prefix=True,
        teacher_topk=_fkl_outliers,
        choices=_TROPD_CHOICES,
    ),
    "fkl_outlier": Method(
        methods.tropd,
        _TROPD,
        "TrOPD's trust gate and top-k FKL outliers, no teacher prefixes",
        _TROPD_PAPER,
        trains_prefix=True,
        teacher_topk=_fkl_outliers,
        choices=_TROPD_CHOICES,
    ),
    "mask_outlier": Method(
        methods.tropd,
        {**_TROPD, "trust_gate": "threshold", "outlier": "mask"},
        "OPD only on tokens with r_t > τ",
        _TROPD_PAPER,
        trains_prefix=True,
        teacher_topk=_fkl_outliers,
        choices=_TROPD_CHOICES,
    ),
    "clip_outlier": Method(
        methods.tropd,
        {**_TROPD, "trust_gate": "threshold", "outlier": "clip"},
        "OPD with reward max(r_t, τ) (REOPOLD's clip)",
        _TROPD_PAPER,
        trains_prefix=True,
        teacher_topk=_fkl_outliers,
        choices=_TROPD_CHOICES,
    ),
    "topk_fkl": Method(
        methods.topk_fkl,
        {"logprob_floor": -30.0, **_COMMON},
        "Σ_{v∈top-k} π_T(v)(lpT_v − lpS_v) on every student token (negative control)",
        _TROPD_PAPER,
    ),
    "entropy_opd": Method(
        baselines.entropy_opd,
        {"rho": 0.2, "kl_coef": 1.0, "ppo_clip": None, **_COMMON},
        "OPD only on the top ρ of student tokens by student entropy",
        _TROPD_PAPER + " (Entropy-OPD baseline)",
        teacher_topk=_never,
    ),
    "eopd": Method(
        baselines.eopd,
        {
            "ppo_clip": 0.2,
            "entropy_threshold": 0.8,
            "top_k": 16,
            "fkl_coef": 1.0,
            "logprob_floor": -30.0,
            **_COMMON,
        },
        "PPO-clipped OPD + top-k FKL where the teacher's entropy > τ",
        "EOPD, arXiv 2603.07079",
        teacher_entropy=True,
    ),
    "reopold": Method(
        baselines.reopold,
        {
            "clip_lambda": 0.2,
            "selection": "entropy",
            "entropy_keep": 0.2,
            "switch_step": 100,
            "ppo_clip": None,
            **_COMMON,
        },
        "OPD with reward max(r_t, log(λ/(1−λ))) on the top-β by student entropy",
        "REOPOLD, Ko et al. 2026, arXiv 2603.11137",
        teacher_topk=_never,
        choices={"selection": ("entropy", "reward", "two_stage")},
    ),
    "jsd_topk": Method(
        baselines.jsd_topk,
        {"beta": 0.5, **_COMMON},
        "β·Σ_top-k π_T log(π_T/M) + (1−β)·PG of log(π_S/M), M = βπ_T + (1−β)π_S",
        _TROPD_PAPER + " (JSD baseline)",
        chunked_head=False,
        checks={"beta": (lambda v: 0 < v < 1, "must be in (0, 1)")},
    ),
    "gkd": Method(
        baselines.gkd,
        {"beta": 0.5, "logprob_floor": -30.0, "chunk_size": 1024, **_COMMON},
        "generalized JSD(β) over the vocabulary (top-k + remainder bucket) at every response token",
        "GKD, Agarwal et al., arXiv 2306.13649",
        trains_prefix=True,
        chunked_head=False,
    ),
    "seqkd": Method(
        baselines.seqkd,
        dict(_COMMON),
        "−lpS on teacher-written tokens (SFT on teacher responses)",
        "SeqKD, Kim & Rush 2016 (SPEC §3: SFT / SeqKD, off-policy distillation)",
        guidance=True,
        trains_prefix=True,
        trains_student=False,
        teacher_topk=_never,
    ),
    "top_d": Method(
        baselines.top_d,
        {"alpha": 0.1, "ppo_clip": 0.2, **_COMMON},
        "reward log(α·e^r + 1 − α), length-normalised return, group z-score, PPO clip",
        "TOP-D, arXiv 2607.04751",
        teacher_topk=_never,
    ),
    "trb": Method(
        baselines.trb,
        {"kl_budget": 0.1, "warmup_steps": 50, "kl_coef": 1.0, "ppo_clip": None, **_COMMON},
        "reverse-KL OPD on rollouts from π_S^(1−b)·π_T^b, KL(μ‖π_S) ≤ ε_k annealed to 0",
        "TRB, Plyusov et al. 2026, arXiv 2605.31159",
        rollout="blend",
        teacher_topk=_never,
    ),
    "ta_opd": Method(
        baselines.ta_opd,
        {
            "rho": 0.2,
            "student_top_k": 16,
            "kl_coef": 1.0,
            "ppo_clip": None,
            "logprob_floor": -30.0,
            **_COMMON,
        },
        "OPD only on the top ρ by quantile(D_t)·quantile(C_t) (teachability)",
        "TA-OPD, arXiv 2605.26844",
        chunked_head=False,
    ),
    "grpo": Method(
        baselines.grpo,
        {"ppo_clip": 0.2, "scale_rewards": True, **_COMMON},
        "−ratio·A, A = group-normalised verifier reward (no teacher)",
        "GRPO (Shao et al. 2024), the RL baseline of Thinking Machines' OPD post",
        needs_reward=True,
        teacher_topk=_never,
    ),
    "opd_task": Method(
        baselines.opd_task,
        {"kl_coef": 1.0, "gamma": 0.0, "ppo_clip": None, **_COMMON},
        "OPD with advantage A_task + kl_coef·r_t (A_task: group-normalised verifier reward)",
        "Thinking Machines, On-Policy Distillation (2025)",
        needs_reward=True,
        teacher_topk=_never,
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

    def trained_mask(self, batch: TokenBatch) -> torch.Tensor:
        """`[B, T]` bool: the tokens this method's aggregation counts."""
        method = self.method
        return (batch.student_mask & method.trains_student) | (
            batch.teacher_mask & method.trains_prefix
        )

    def denominator(self, batch: TokenBatch) -> float:
        return agg_denominator(self.trained_mask(batch), self.options["loss_agg"])

    def __call__(
        self,
        student_logits: torch.Tensor,
        batch: TokenBatch,
        *,
        denominator: float | None = None,
        generator: torch.Generator | None = None,
        step: int | None = None,
    ) -> ObjectiveOutput:
        """`denominator`: the global token/sequence count when `batch` is one micro-batch of
        a larger batch (sum the micro-batch losses to get the global loss).
        `generator`: source of randomness for the hard trust gate.
        `step`: the 1-based optimizer step, for methods whose rule changes over training
        (REOPOLD's two-stage selection); None when unknown."""
        token_loss, trained, parts = self.method.fn(
            student_logits, batch, self.options, generator, step
        )
        loss = aggregate(token_loss, trained, self.options["loss_agg"], denominator)
        metrics = {name: _masked_mean(v, m) for name, (v, m) in parts.items()}
        chunk = self.options.get("chunk_size", DIAGNOSTIC_CHUNK)
        metrics.update(_diagnostics(student_logits, batch, chunk))
        return ObjectiveOutput(loss=loss, token_loss=token_loss, metrics=metrics)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> float:
    count = mask.sum()
    if count == 0:
        return 0.0
    return float((values.detach().float() * mask).sum() / count)


@torch.no_grad()
def _diagnostics(
    student_logits: torch.Tensor, batch: TokenBatch, chunk_size: int
) -> dict[str, float]:
    """SPEC §2.7 metrics every method can report from the batch alone. The entropy is taken
    `chunk_size` positions at a time (no `[B * T, V]` fp32 temporary)."""
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


# Option checks shared by every method that has the option (`Method.checks` adds more).
_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "beta": (lambda v: 0 <= v <= 1, "must be in [0, 1]"),
    "ppo_clip": (
        lambda v: v is None or 0 < v < 1,
        "must be null (off) or in (0, 1)",
    ),
    "logprob_floor": (lambda v: v < 0, "must be negative (a log-probability)"),
    "gamma": (lambda v: 0 <= v <= 1, "must be in [0, 1]"),
    "kl_coef": (lambda v: v > 0, "must be positive"),
    "tau": (lambda v: v <= 0, "must be <= 0 (a log-ratio threshold)"),
    "rho": (lambda v: 0 < v <= 1, "must be in (0, 1] (a fraction of tokens)"),
    "entropy_keep": (lambda v: 0 < v <= 1, "must be in (0, 1] (a fraction of tokens)"),
    "entropy_threshold": (lambda v: v >= 0, "must be >= 0 (nats)"),
    "fkl_coef": (lambda v: v >= 0, "must be >= 0"),
    "top_k": (lambda v: v is None or _integer(v, 1), "must be null (all) or an integer >= 1"),
    "clip_lambda": (
        lambda v: 0 < v <= 0.5,
        "must be in (0, 0.5] (so the clip log(λ/(1−λ)) is <= 0)",
    ),
    "switch_step": (lambda v: _integer(v, 0), "must be an integer >= 0 (a step)"),
    "chunk_size": (lambda v: _integer(v, 1), "must be an integer >= 1 (positions per chunk)"),
    "alpha": (lambda v: 0 < v <= 1, "must be in (0, 1]"),
    "kl_budget": (lambda v: v >= 0, "must be >= 0 (nats per token)"),
    "warmup_steps": (lambda v: _integer(v, 1), "must be an integer >= 1 (steps)"),
    "student_top_k": (lambda v: _integer(v, 1), "must be an integer >= 1"),
    "scale_rewards": (lambda v: isinstance(v, bool), "must be true or false"),
}


def _validate(name: str, method: Method, opt: dict[str, Any]) -> None:
    for key, allowed in {"loss_agg": LOSS_AGGS, **method.choices}.items():
        if opt[key] not in allowed:
            raise ValueError(f"{name}.{key}={opt[key]!r} is not one of {', '.join(allowed)}")
    for key, (ok, why) in {**_CHECKS, **method.checks}.items():
        if key in opt and not _check(ok, opt[key]):
            raise ValueError(f"{name}.{key}={opt[key]!r} {why}")


def _integer(value: Any, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


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
