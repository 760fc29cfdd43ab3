"""The distillation methods of SPEC.md, each a short rule over the shared estimators.

A method function takes `(student_logits [B, T, V], batch, options, generator, step)` and
returns `(token_loss [B, T], trained_mask [B, T] bool, metrics)`, where `metrics` maps
names to `(values [B, T], mask [B, T])` pairs that the registry averages.
"""

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
from tropd.objectives.routers import trust_weight

MethodResult = tuple[torch.Tensor, torch.Tensor, dict[str, tuple[torch.Tensor, torch.Tensor]]]


def _student_reward(batch: TokenBatch) -> torch.Tensor:
    """`r_t` on student tokens, 0 elsewhere."""
    reward = k1_reward(batch.teacher_logprobs.float(), batch.sampler_logprobs.float())
    return torch.where(batch.student_mask, reward, 0.0)


def opd(student_logits, batch: TokenBatch, opt: dict[str, Any], generator, step) -> MethodResult:
    """OPD (SPEC §1): `-exp(lpS - lq) * kl_coef * r_t` on student tokens."""
    student = batch.student_mask
    lp_student = token_logprobs(student_logits, batch.tokens)
    advantage = opt["kl_coef"] * discounted_returns(_student_reward(batch), student, opt["gamma"])
    token_loss = policy_gradient_loss(
        lp_student, batch.sampler_logprobs.float(), advantage, opt["ppo_clip"]
    )
    return torch.where(student, token_loss, 0.0), student, {}


def tropd(student_logits, batch: TokenBatch, opt: dict[str, Any], generator, step) -> MethodResult:
    """TrOPD (SPEC §2): trust-region OPD, an outlier estimator, guidance on teacher tokens.

    Student tokens: `w * PG(r) + (1 - w) * outlier`, `w` from the trust gate.
    Teacher-prefix tokens: `beta * (lpT - lpS)`.
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


def topk_fkl(
    student_logits, batch: TokenBatch, opt: dict[str, Any], generator, step
) -> MethodResult:
    """Standalone top-k forward KL on every student token (the paper's negative control)."""
    student = batch.student_mask
    kl, floor_hits = topk_forward_kl(
        student_logits,
        batch.teacher_topk_ids,
        batch.teacher_topk_logprobs,
        opt["logprob_floor"],
    )
    return torch.where(student, kl, 0.0), student, {"floor_fraction": (floor_hits, student)}
