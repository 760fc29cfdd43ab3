"""Per-token estimators: pure tensor functions, no models, no I/O.

Shapes: `B` sequences, `T` positions, `V` vocabulary, `K` teacher top-k. Log-probs are
natural-log, per token. Every function returns per-token values `[B, T]`; which tokens
count is decided by the routers and the aggregation, not here.
"""

from __future__ import annotations

import torch


def token_logprobs(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[ids] without materialising the `[B, T, V]` log-softmax.

    logits `[B, T, V]`; ids `[B, T]` or `[B, T, K]`; returns the shape of `ids`, fp32.
    """
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    lse = torch.logsumexp(logits, dim=-1)
    if ids.dim() == logits.dim() - 1:
        return logits.gather(-1, ids.unsqueeze(-1)).squeeze(-1) - lse
    return logits.gather(-1, ids) - lse.unsqueeze(-1)


@torch.no_grad()
def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of softmax(logits) over the last axis: `[..., V]` -> `[...]`."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    logprobs = torch.log_softmax(logits, dim=-1)
    return -(logprobs.exp() * logprobs).sum(-1)


def k1_reward(teacher_logprobs: torch.Tensor, sampler_logprobs: torch.Tensor) -> torch.Tensor:
    """OPD's per-token reward `r_t = log pi_T(x_t) - log q(x_t)` (negative K1 reverse KL)."""
    return teacher_logprobs - sampler_logprobs


def discounted_returns(reward: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """`G_t = sum_{s >= t} gamma^(s-t) r_s` over the masked tokens of each row; `[B, T]`.

    gamma = 0 returns the per-token reward itself (the blog's choice).
    """
    reward = reward * mask
    if gamma == 0:
        return reward
    returns = torch.zeros_like(reward)
    running = torch.zeros_like(reward[:, 0])
    for t in range(reward.shape[1] - 1, -1, -1):
        running = reward[:, t] + gamma * running * mask[:, t]
        returns[:, t] = running
    return returns * mask


def policy_gradient_loss(
    student_logprobs: torch.Tensor,
    sampler_logprobs: torch.Tensor,
    advantage: torch.Tensor,
    ppo_clip: float | None = None,
) -> torch.Tensor:
    """Importance-sampled policy-gradient loss `-exp(lpS - lq) * A`, optionally PPO-clipped.

    Its gradient is `-ratio * A * grad lpS`; with `A = r_t` and on-policy samples its
    expectation is the gradient of KL(pi_S || pi_T). `advantage` is treated as a constant.
    """
    ratio = torch.exp(student_logprobs - sampler_logprobs)
    advantage = advantage.detach()
    loss = -ratio * advantage
    if ppo_clip is not None:
        clipped = -torch.clamp(ratio, 1 - ppo_clip, 1 + ppo_clip) * advantage
        loss = torch.maximum(loss, clipped)
    return loss


def topk_forward_kl(
    student_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_teacher_logprobs: torch.Tensor,
    logprob_floor: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k forward KL `sum_{v in V_k} pi_T(v) (lpT_v - max(lpS_v, floor))`.

    Teacher log-probs are the full-vocabulary values at the top-k ids (not renormalised).
    With K = V this is the full forward KL (when the floor does not bind). The student's
    log-probs are clamped at `logprob_floor` so a token the student gives no mass cannot
    make the term diverge; the clamp passes no gradient where it binds.
    Returns `(kl [B, T], floor_hits [B, T])`, the latter the fraction of the K ids whose
    student log-prob was clamped.
    """
    student_topk = token_logprobs(student_logits, topk_ids)
    floored = student_topk < logprob_floor
    clamped = torch.clamp(student_topk, min=logprob_floor)
    teacher_logprobs = topk_teacher_logprobs.to(clamped.dtype)
    teacher_probs = teacher_logprobs.exp()
    # 0 * log 0 = 0: an id the teacher gives no mass (log-prob -inf) adds nothing, not NaN.
    per_id = torch.where(teacher_probs > 0, teacher_probs * (teacher_logprobs - clamped), 0.0)
    kl = per_id.sum(-1)
    return kl, floored.float().mean(-1)


def aggregate(
    token_loss: torch.Tensor,
    mask: torch.Tensor,
    mode: str,
    denominator: float | None = None,
) -> torch.Tensor:
    """Reduce `[B, T]` per-token losses over the tokens in `mask` to a scalar.

    - `token_mean`: sum over masked tokens / number of masked tokens.
    - `seq_mean_token_mean`: mean over tokens within each sequence, then mean over sequences.
    - `seq_sum`: sum over tokens within each sequence, then mean over sequences (Tinker's
      per-sequence sum).
    `denominator` replaces the batch's own token/sequence count, so micro-batches of one
    global batch add up to the global value (see `agg_denominator`).
    """
    mask = mask.float()
    if mode == "seq_mean_token_mean":
        per_seq = (token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1)
        total = per_seq.sum()
    else:
        total = (token_loss * mask).sum()
    if denominator is None:
        denominator = agg_denominator(mask, mode)
    return total / max(denominator, 1.0)


def agg_denominator(mask: torch.Tensor, mode: str) -> float:
    """What `aggregate` divides by for this batch: masked tokens, or sequences with any."""
    if mode == "token_mean":
        return float(mask.sum())
    return float((mask.sum(-1) > 0).sum())
