"""The distillation methods of SPEC.md, each a short rule over the shared estimators,
registered beside its declaration (the rule contract: `tropd.objectives.registry`)."""

from __future__ import annotations

from typing import Any

import torch

from tropd.batch import TokenBatch
from tropd.objectives.estimators import (
    discounted_returns,
    k1_reward,
    policy_gradient_loss,
    token_logprobs,
    topk_forward_kl,
)
from tropd.objectives.registry import MethodResult, never, preset, register
from tropd.objectives.routers import TRUST_GATES, trust_weight

OUTLIERS = ("fkl", "mask", "clip")
# How the prefix loss enters: `separate`, its own mean weighted by beta beside the mean over
# student tokens; `joint`, one mean over student and prefix tokens together.
GUIDANCE_NORMS = ("separate", "joint")
DEFAULT_TAU = -1.3862943611198906  # log(0.2 / 0.8), REOPOLD's lambda = 0.2
TROPD_PAPER = "Xing et al. 2026, arXiv 2606.01249"


def _student_reward(batch: TokenBatch) -> torch.Tensor:
    """`r_t` on student tokens, 0 elsewhere."""
    reward = k1_reward(batch.teacher_logprobs.float(), batch.sampler_logprobs.float())
    return torch.where(batch.student_mask, reward, 0.0)


@register(
    "opd",
    defaults={"kl_coef": 1.0, "ppo_clip": None, "gamma": 0.0},
    summary="-exp(lpS-lq)·r_t, r_t = lpT-lq, on student tokens",
    paper="Thinking Machines, On-Policy Distillation (2025)",
    teacher_topk=never,
)
def opd(student_logits, batch: TokenBatch, opt: dict[str, Any]) -> MethodResult:
    """OPD (SPEC §1): `-exp(lpS - lq) * kl_coef * r_t` on student tokens."""
    student = batch.student_mask
    lp_student = token_logprobs(student_logits, batch.tokens)
    advantage = opt["kl_coef"] * discounted_returns(_student_reward(batch), student, opt["gamma"])
    token_loss = policy_gradient_loss(
        lp_student, batch.sampler_logprobs.float(), advantage, opt["ppo_clip"]
    )
    return torch.where(student, token_loss, 0.0), student, {}


def _fkl_outliers(options: dict[str, Any]) -> bool:
    return options["outlier"] == "fkl"


@register(
    "tropd",
    defaults={
        "trust_gate": "hard",
        "outlier": "fkl",
        "tau": DEFAULT_TAU,
        # The paper's 0.001 was for its own (unstated) aggregation; with the prefix loss a
        # separate mean, 1.0 won bench/claim.py's guidance study (README, Results).
        "beta": 1.0,
        "logprob_floor": -30.0,
        "ppo_clip": None,
        "guidance_norm": "separate",
    },
    summary="trust gate min(1,e^r): OPD in region, top-k FKL on outliers, β·NLL on teacher prefix",
    paper=TROPD_PAPER,
    # Chosen by bench/claim.py's guidance study (README, Results).
    guidance={"guided_fraction": 0.5, "prefix": "uniform"},
    trains_prefix=True,
    teacher_topk=_fkl_outliers,
    choices={"trust_gate": TRUST_GATES, "outlier": OUTLIERS, "guidance_norm": GUIDANCE_NORMS},
)
def tropd(
    student_logits, batch: TokenBatch, opt: dict[str, Any], *, generator: torch.Generator | None
) -> MethodResult:
    """TrOPD (SPEC §2): trust-region OPD, an outlier estimator, guidance on teacher tokens.

    Student tokens: `w * PG(r) + (1 - w) * outlier`, `w` from the trust gate.
    Teacher-prefix tokens: `beta * (lpT - lpS)`; with `guidance_norm: separate` the
    objective averages them apart from the student tokens (see `Objective`).
    """
    student, teacher = batch.student_mask, batch.teacher_mask
    outlier = opt["outlier"]
    student_topk = None
    if outlier == "fkl":  # one pass over the vocabulary for the token and the top-k ids
        ids = torch.cat([batch.tokens[..., None], batch.teacher_topk_ids], dim=-1)
        both = token_logprobs(student_logits, ids)
        lp_student, student_topk = both[..., 0], both[..., 1:]
    else:
        lp_student = token_logprobs(student_logits, batch.tokens)
    lq = batch.sampler_logprobs.float()
    reward = _student_reward(batch)
    weight = trust_weight(reward, opt["trust_gate"], opt["tau"], batch.trust_mask, generator)
    weight = weight * student
    trust_loss = policy_gradient_loss(lp_student, lq, reward, opt["ppo_clip"])

    metrics: dict[str, tuple[torch.Tensor, torch.Tensor]] = {
        "trust_fraction": (weight, student),
        "outlier_fraction": (1 - weight, student),
    }
    if outlier == "fkl":
        outlier_loss, floor_hits = topk_forward_kl(
            student_logits,
            batch.teacher_topk_ids,
            batch.teacher_topk_logprobs,
            opt["logprob_floor"],
            student_topk,
        )
        outlier_tokens = student & (weight < 1)
        metrics["fkl_outlier"] = (outlier_loss.detach(), outlier_tokens)
        metrics["floor_fraction"] = (floor_hits, outlier_tokens)
    elif outlier == "clip":
        clipped_reward = torch.clamp(reward, min=opt["tau"])
        outlier_loss = policy_gradient_loss(lp_student, lq, clipped_reward, opt["ppo_clip"])
    else:
        outlier_loss = torch.zeros_like(trust_loss)

    guidance_loss = opt["beta"] * (batch.teacher_logprobs.float() - lp_student)
    student_loss = weight * trust_loss + (1 - weight) * outlier_loss
    token_loss = torch.where(student, student_loss, torch.where(teacher, guidance_loss, 0.0))
    return token_loss, student | teacher, metrics


# The paper's ablation rows: TrOPD's rule and declaration, without teacher prefixes.
preset(
    "fkl_outlier",
    "tropd",
    "TrOPD's trust gate and top-k FKL outliers, no teacher prefixes",
    options={},
    guidance=None,
)
preset(
    "mask_outlier",
    "tropd",
    "OPD only on tokens with r_t > τ",
    options={"trust_gate": "threshold", "outlier": "mask"},
    guidance=None,
)
preset(
    "clip_outlier",
    "tropd",
    "OPD with reward max(r_t, τ) (REOPOLD's clip)",
    options={"trust_gate": "threshold", "outlier": "clip"},
    guidance=None,
)


@register(
    "topk_fkl",
    defaults={"logprob_floor": -30.0},
    summary="Σ_{v∈top-k} π_T(v)(lpT_v − lpS_v) on every student token (negative control)",
    paper=TROPD_PAPER,
)
def topk_fkl(student_logits, batch: TokenBatch, opt: dict[str, Any]) -> MethodResult:
    """Standalone top-k forward KL on every student token (the paper's negative control)."""
    student = batch.student_mask
    kl, floor_hits = topk_forward_kl(
        student_logits,
        batch.teacher_topk_ids,
        batch.teacher_topk_logprobs,
        opt["logprob_floor"],
    )
    return torch.where(student, kl, 0.0), student, {"floor_fraction": (floor_hits, student)}
