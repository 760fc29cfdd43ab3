"""The baselines of SPEC §3, each a short rule over the shared estimators and routers.

Each is registered beside its declaration (the rule contract:
`tropd.objectives.registry`); only `reopold`'s two-stage selection reads the step.

Selections and normalisations "in the batch" (top-ρ by entropy, quantiles, group
statistics) are over the rows of one call: with micro-batching that is a micro-batch,
so keep `optim.micro_batch_size` a multiple of `rollout.samples_per_prompt` (groups
stay whole) and equal to the batch for the papers' per-batch rules.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from tropd.batch import TokenBatch
from tropd.objectives.estimators import (
    discounted_returns,
    entropy,
    group_normalize,
    k1_reward,
    policy_gradient_loss,
    sampled_topk_jsd,
    token_logprobs,
    topk_forward_kl,
    topk_generalized_jsd,
)
from tropd.objectives.methods import TROPD_PAPER
from tropd.objectives.registry import MethodResult, never, register
from tropd.objectives.routers import quantile_normalize, top_fraction

ENTROPY_CHUNK = 1024  # positions per chunk when scoring the student's entropy
ADVANTAGE_EPS = 1e-4  # added to the group std before dividing (as TRL's GRPO)
# The JSD's mixing weight was once `beta`, the name TrOPD gives its guidance weight: the
# old spelling is accepted (with a DeprecationWarning) until tropd 0.2.
JSD_BETA_ALIAS = {"beta": "jsd_beta"}


def _logprobs_and_reward(student_logits, batch: TokenBatch):
    """`(lpS [B, T] with grad, lq [B, T], r_t [B, T])`, `r_t = lpT - lq` on student tokens
    (0 elsewhere), all in the student log-probs' dtype (fp32 or wider)."""
    lp_student = token_logprobs(student_logits, batch.tokens)
    lq = batch.sampler_logprobs.to(lp_student.dtype)
    reward = k1_reward(batch.teacher_logprobs.to(lp_student.dtype), lq)
    return lp_student, lq, torch.where(batch.student_mask, reward, 0.0)


def _student_entropy(student_logits: torch.Tensor) -> torch.Tensor:
    """`[B, T]` entropy (nats) of the student's distribution at each position, no grad."""
    return entropy(student_logits, ENTROPY_CHUNK)  # no_grad already


def _teacher_topk(batch: TokenBatch, top_k: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's `min(top_k, K)` most likely ids of the scored K, and their log-probs."""
    ids, logprobs = batch.teacher_topk_ids, batch.teacher_topk_logprobs
    if top_k is None or top_k >= ids.shape[-1]:
        return ids, logprobs
    order = logprobs.topk(top_k, dim=-1).indices
    return ids.gather(-1, order), logprobs.gather(-1, order)


def _need(batch: TokenBatch, name: str, method: str, hint: str) -> None:
    if getattr(batch, name) is None:
        raise ValueError(f"{method} needs batch.{name}; {hint}")


@register(
    "entropy_opd",
    defaults={"rho": 0.2, "kl_coef": 1.0, "ppo_clip": None},
    summary="OPD only on the top ρ of student tokens by student entropy",
    paper=TROPD_PAPER + " (Entropy-OPD baseline)",
    teacher_topk=never,
)
def entropy_opd(student_logits, batch: TokenBatch, opt: dict[str, Any]) -> MethodResult:
    """Entropy OPD: the OPD loss only on the top `rho` of student tokens by student entropy.

    Tokens not selected count as zero in the aggregation (they stay in its denominator).
    """
    student = batch.student_mask
    lp_student, lq, reward = _logprobs_and_reward(student_logits, batch)
    selected = top_fraction(_student_entropy(student_logits), student, opt["rho"])
    loss = policy_gradient_loss(lp_student, lq, opt["kl_coef"] * reward, opt["ppo_clip"])
    return torch.where(selected, loss, 0.0), student, {"selected_fraction": (selected, student)}


@register(
    "eopd",
    defaults={
        "ppo_clip": 0.2,
        "entropy_threshold": 0.8,
        "top_k": 16,
        "fkl_coef": 1.0,
        "logprob_floor": -30.0,
    },
    summary="PPO-clipped OPD + top-k FKL where the teacher's entropy > τ",
    paper="EOPD, arXiv 2603.07079",
    teacher_entropy=True,
)
def eopd(student_logits, batch: TokenBatch, opt: dict[str, Any]) -> MethodResult:
    """EOPD: PPO-clipped OPD on every student token, plus `fkl_coef` times the top-k
    forward KL on tokens where the teacher's full-vocabulary entropy exceeds
    `entropy_threshold`. The FKL uses the `top_k` most likely of the scored teacher ids
    (paper: 16; all of them when `teacher.top_k` is smaller)."""
    _need(batch, "teacher_entropy", "eopd", "score the batch with tropd.teacher.score_batch")
    student = batch.student_mask
    lp_student, lq, reward = _logprobs_and_reward(student_logits, batch)
    loss = policy_gradient_loss(lp_student, lq, reward, opt["ppo_clip"])
    uncertain = student & (batch.teacher_entropy > opt["entropy_threshold"])
    ids, teacher_lp = _teacher_topk(batch, opt["top_k"])
    fkl, floor_hits = topk_forward_kl(student_logits, ids, teacher_lp, opt["logprob_floor"])
    loss = loss + opt["fkl_coef"] * torch.where(uncertain, fkl, 0.0)
    return (
        torch.where(student, loss, 0.0),
        student,
        {
            "high_entropy_fraction": (uncertain, student),
            "fkl_high_entropy": (fkl.detach(), uncertain),
            "floor_fraction": (floor_hits, uncertain),
        },
    )


def _reopold_stage(opt: dict[str, Any], step: int | None) -> str:
    """Which token selection REOPOLD uses at `step`: `reward` or `entropy`."""
    if opt["selection"] != "two_stage":
        return opt["selection"]
    if step is None:
        raise ValueError(
            "reopold with selection=two_stage needs the optimizer step: call obj(..., step=N)"
        )
    return "reward" if step < opt["switch_step"] else "entropy"


@register(
    "reopold",
    defaults={
        "clip_lambda": 0.2,
        "selection": "entropy",
        "entropy_keep": 0.2,
        "switch_step": 100,
        "ppo_clip": None,
    },
    summary="OPD with reward max(r_t, log(λ/(1−λ))) on the top-β by student entropy",
    paper="REOPOLD, Ko et al. 2026, arXiv 2603.11137",
    teacher_topk=never,
    choices={"selection": ("entropy", "reward", "two_stage")},
)
def reopold(
    student_logits, batch: TokenBatch, opt: dict[str, Any], *, step: int | None
) -> MethodResult:
    """REOPOLD: OPD with the reward clipped from below, `max(r_t, log(λ / (1 - λ)))`.

    Selection `reward`: every student token, the clipped reward alone decides its weight;
    `entropy`: only the top `entropy_keep` of student tokens by student entropy;
    `two_stage`: `reward` for steps before `switch_step`, `entropy` from then on.
    """
    student = batch.student_mask
    lp_student, lq, reward = _logprobs_and_reward(student_logits, batch)
    floor = math.log(opt["clip_lambda"] / (1 - opt["clip_lambda"]))
    loss = policy_gradient_loss(lp_student, lq, torch.clamp(reward, min=floor), opt["ppo_clip"])
    selected = student
    if _reopold_stage(opt, step) == "entropy":
        selected = top_fraction(_student_entropy(student_logits), student, opt["entropy_keep"])
    return (
        torch.where(selected, loss, 0.0),
        student,
        {"selected_fraction": (selected, student), "clip_fraction": (reward < floor, student)},
    )


@register(
    "jsd_topk",
    defaults={"jsd_beta": 0.5},
    summary="β·Σ_top-k π_T log(π_T/M) + (1−β)·PG of log(π_S/M), M = βπ_T + (1−β)π_S",
    paper=TROPD_PAPER + " (JSD baseline)",
    chunked_head=False,
    checks={"jsd_beta": (lambda v: 0 < v < 1, "must be in (0, 1)")},
    aliases=JSD_BETA_ALIAS,
)
def jsd_topk(student_logits, batch: TokenBatch, opt: dict[str, Any]) -> MethodResult:
    """Top-k JSD(β) on student tokens (`estimators.sampled_topk_jsd`), β = `jsd_beta`."""
    student = batch.student_mask
    loss = sampled_topk_jsd(
        student_logits,
        batch.tokens,
        batch.sampler_logprobs,
        batch.teacher_logprobs,
        batch.teacher_topk_ids,
        batch.teacher_topk_logprobs,
        opt["jsd_beta"],
    )
    return torch.where(student, loss, 0.0), student, {"jsd": (loss.detach(), student)}


@register(
    "gkd",
    defaults={"jsd_beta": 0.5, "logprob_floor": -30.0, "chunk_size": 1024},
    summary="generalized JSD(β) over the vocabulary (top-k + remainder bucket) at every response "
    "token",
    paper="GKD, Agarwal et al., arXiv 2306.13649",
    trains_prefix=True,
    chunked_head=False,
    aliases=JSD_BETA_ALIAS,
)
def gkd(student_logits, batch: TokenBatch, opt: dict[str, Any]) -> MethodResult:
    """GKD: generalized JSD(β), β = `jsd_beta`, at every response position (student
    samples and teacher sequences alike), over the teacher's top-k plus a remainder
    bucket: exact over the full vocabulary when `teacher.top_k` equals the vocabulary size
    (see `estimators.topk_generalized_jsd`). Differentiated directly, no sampling estimator.

    GKD's on-policy fraction λ is set by the rollout, not here: with `guidance.enabled:
    true`, `guidance.schedule: constant` and `guidance.guided_fraction: 1 - λ`, that share
    of the step's rollouts is a whole teacher-written response.
    """
    trained = batch.response_mask
    divergence = topk_generalized_jsd(
        student_logits,
        batch.teacher_topk_ids,
        batch.teacher_topk_logprobs,
        opt["jsd_beta"],
        opt["logprob_floor"],
        opt["chunk_size"],
    )
    return torch.where(trained, divergence, 0.0), trained, {"gkd_divergence": (divergence, trained)}


@register(
    "seqkd",
    defaults={},
    summary="−lpS on teacher-written tokens (SFT on teacher responses)",
    paper="SeqKD, Kim & Rush 2016 (SPEC §3: SFT / SeqKD, off-policy distillation)",
    guidance={"schedule": "constant", "full_prefix": True},  # whole teacher responses
    trains_prefix=True,
    trains_student=False,
    teacher_topk=never,
)
def seqkd(student_logits, batch: TokenBatch, opt: dict[str, Any]) -> MethodResult:
    """SeqKD / SFT on teacher-generated responses: `-log pi_S(x_t)` on teacher tokens
    (origin TEACHER). Student tokens, if any, are neither trained nor counted."""
    teacher = batch.teacher_mask
    nll = -token_logprobs(student_logits, batch.tokens)
    return torch.where(teacher, nll, 0.0), teacher, {}


@register(
    "top_d",
    defaults={"alpha": 0.1, "ppo_clip": 0.2},
    summary="reward log(α·e^r + 1 − α), length-normalised return, group z-score, PPO clip",
    paper="TOP-D, arXiv 2607.04751",
    teacher_topk=never,
)
def top_d(student_logits, batch: TokenBatch, opt: dict[str, Any]) -> MethodResult:
    """TOP-D: proximal-teacher reward `log(α e^{r_t} + 1 - α)` (the log-ratio of the
    mixture `α pi_T + (1 - α) q` to q, bounded below by `log(1 - α)`), summed to the end of
    the response and divided by the response's student-token count (length-normalised
    future return), z-normalised per prompt group over its tokens, PPO-clipped."""
    _need(batch, "group", "top_d", "collect_rollouts sets it (rows of one prompt share it)")
    student = batch.student_mask
    lp_student, lq, reward = _logprobs_and_reward(student_logits, batch)
    alpha = opt["alpha"]
    proximal = torch.logaddexp(
        reward + math.log(alpha), torch.full_like(reward, math.log1p(-alpha))
    )
    proximal = torch.where(student, proximal, 0.0)
    lengths = student.sum(-1, keepdim=True).clamp(min=1)
    returns = discounted_returns(proximal, student, 1.0) / lengths
    advantage = group_normalize(returns, student, batch.group, ADVANTAGE_EPS)
    loss = policy_gradient_loss(lp_student, lq, advantage, opt["ppo_clip"])
    return torch.where(student, loss, 0.0), student, {"proximal_reward": (proximal, student)}


@register(
    "trb",
    defaults={"kl_budget": 0.1, "warmup_steps": 50, "kl_coef": 1.0, "ppo_clip": None},
    summary="reverse-KL OPD on rollouts from π_S^(1−b)·π_T^b, KL(μ‖π_S) ≤ ε_k annealed to 0",
    paper="TRB, Plyusov et al. 2026, arXiv 2605.31159",
    rollout="blend",
    teacher_topk=never,
)
def trb(student_logits, batch: TokenBatch, opt: dict[str, Any]) -> MethodResult:
    """TRB: the per-prefix reverse-KL OPD loss on rollouts sampled from the blended
    behaviour policy μ (`tropd.rollout.blend.BlendEngine`, which records `lq = log μ`).

    Advantage `sg(lpT - lpS)` with importance ratio `pi_S / μ`: in expectation over μ the
    gradient is that of KL(pi_S || pi_T) at every prefix, whatever μ is. With μ = pi_S
    (budget 0, after the warm-up) it is OPD.
    """
    student = batch.student_mask
    lp_student, lq, _ = _logprobs_and_reward(student_logits, batch)
    teacher_lp = batch.teacher_logprobs.to(lp_student.dtype)
    advantage = opt["kl_coef"] * (teacher_lp - lp_student.detach())
    loss = policy_gradient_loss(lp_student, lq, advantage, opt["ppo_clip"])
    ratio = torch.exp(lp_student.detach() - lq)
    return torch.where(student, loss, 0.0), student, {"importance_ratio": (ratio, student)}


@register(
    "ta_opd",
    defaults={
        "rho": 0.2,
        "student_top_k": 16,
        "kl_coef": 1.0,
        "ppo_clip": None,
        "logprob_floor": -30.0,
    },
    summary="OPD only on the top ρ by quantile(D_t)·quantile(C_t) (teachability)",
    paper="TA-OPD, arXiv 2605.26844",
    chunked_head=False,
)
def ta_opd(student_logits, batch: TokenBatch, opt: dict[str, Any]) -> MethodResult:
    """TA-OPD (token teachability): OPD only on the top `rho` of student tokens by
    `D̂_t · Ĉ_t`, the batch quantiles of

    - compatibility `C_t = sum_{v in TopK(pi_S)} pi_T(v)` (K = `student_top_k`), and
    - the forward KL `D_t` over the union of the student's and the teacher's top ids.

    Approximation: the scorer gives teacher log-probs only on the teacher's own top-k, so
    pi_T(v) is taken as 0 for every other id. C_t then sums the teacher's mass on the ids
    both top lists share, and D_t reduces to the top-k forward KL over the teacher's top-k
    (student log-probs floored at `logprob_floor`). Both are lower bounds of the paper's
    quantities, exact when the teacher's top-k holds all its mass.
    """
    student = batch.student_mask
    lp_student, lq, reward = _logprobs_and_reward(student_logits, batch)
    top_k = min(opt["student_top_k"], student_logits.shape[-1])
    student_ids = student_logits.detach().topk(top_k, dim=-1).indices
    shared = (student_ids.unsqueeze(-1) == batch.teacher_topk_ids.unsqueeze(-2)).any(-2)
    teacher_probs = batch.teacher_topk_logprobs.to(lp_student.dtype).exp()
    compatibility = torch.where(shared, teacher_probs, 0.0).sum(-1)
    with torch.no_grad():
        distance, _ = topk_forward_kl(
            student_logits,
            batch.teacher_topk_ids,
            batch.teacher_topk_logprobs,
            opt["logprob_floor"],
        )
    score = quantile_normalize(distance, student) * quantile_normalize(compatibility, student)
    selected = top_fraction(score, student, opt["rho"])
    loss = policy_gradient_loss(lp_student, lq, opt["kl_coef"] * reward, opt["ppo_clip"])
    return (
        torch.where(selected, loss, 0.0),
        student,
        {
            "selected_fraction": (selected, student),
            "compatibility": (compatibility, student),
            "teachability_distance": (distance, student),
        },
    )


def _task_advantage(batch: TokenBatch, method: str, scale: bool = True) -> torch.Tensor:
    """`[B]` verifier reward normalised within each prompt group."""
    hint = "declare needs_reward=True in its @register so the loop fills it from the verifier"
    _need(batch, "reward", method, hint)
    _need(batch, "group", method, "collect_rollouts sets it (rows of one prompt share it)")
    reward = batch.reward.to(torch.promote_types(batch.reward.dtype, torch.float32))
    rows = torch.ones(len(batch), 1, dtype=torch.bool, device=reward.device)
    return group_normalize(reward[:, None], rows, batch.group, ADVANTAGE_EPS, scale)[:, 0]


def _per_row(values: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A `[B]` metric as a `(values [B, T], mask)` pair whose masked mean is the row mean."""
    rows = torch.zeros(like.shape, dtype=torch.bool, device=like.device)
    rows[:, 0] = True
    return values[:, None].expand(like.shape), rows


@register(
    "grpo",
    defaults={"ppo_clip": 0.2, "scale_rewards": True},
    summary="−ratio·A, A = group-normalised verifier reward (no teacher)",
    paper="GRPO (Shao et al. 2024), the RL baseline of Thinking Machines' OPD post",
    needs_reward=True,
    teacher_topk=never,
)
def grpo(student_logits, batch: TokenBatch, opt: dict[str, Any]) -> MethodResult:
    """GRPO: the verifier's reward, normalised within each prompt group (`scale_rewards`:
    divide by the group's std), as the advantage of every student token of the row;
    PPO-clipped importance-sampled policy gradient. No teacher and no KL penalty."""
    student = batch.student_mask
    lp_student = token_logprobs(student_logits, batch.tokens)
    lq = batch.sampler_logprobs.to(lp_student.dtype)
    advantage = _task_advantage(batch, "grpo", opt["scale_rewards"]).to(lp_student.dtype)
    loss = policy_gradient_loss(lp_student, lq, advantage[:, None], opt["ppo_clip"])
    return (
        torch.where(student, loss, 0.0),
        student,
        {"task_reward": _per_row(batch.reward, student)},
    )


@register(
    "opd_task",
    defaults={"kl_coef": 1.0, "gamma": 0.0, "ppo_clip": None},
    summary="OPD with advantage A_task + kl_coef·r_t (A_task: group-normalised verifier reward)",
    paper="Thinking Machines, On-Policy Distillation (2025)",
    needs_reward=True,
    teacher_topk=never,
)
def opd_task(student_logits, batch: TokenBatch, opt: dict[str, Any]) -> MethodResult:
    """OPD + task reward (SPEC §1): advantage `A_t = A_task + kl_coef * G_t`, `A_task` the
    group-normalised verifier reward of the row, `G_t` OPD's (discounted) reward."""
    student = batch.student_mask
    lp_student, lq, reward = _logprobs_and_reward(student_logits, batch)
    task = _task_advantage(batch, "opd_task").to(lp_student.dtype)
    returns = discounted_returns(reward, student, opt["gamma"])
    advantage = task[:, None] + opt["kl_coef"] * returns
    loss = policy_gradient_loss(lp_student, lq, advantage, opt["ppo_clip"])
    return (
        torch.where(student, loss, 0.0),
        student,
        {"task_reward": _per_row(batch.reward, student)},
    )
