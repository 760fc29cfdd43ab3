"""Per-token estimators: pure tensor functions, no models, no I/O.

Shapes: `B` sequences, `T` positions, `V` vocabulary, `K` teacher top-k. Log-probs are
natural-log, per token. Every function returns per-token values `[B, T]`; which tokens
count is decided by the routers and the aggregation, not here.
"""

from __future__ import annotations

import functools
import math

import torch

from tropd.head import HeadLogits


def token_logprobs(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[ids] without materialising the `[B, T, V]` log-softmax.

    logits `[B, T, V]` (or a `HeadLogits`); ids `[B, T]` or `[B, T, K]`; returns the
    shape of `ids`, fp32.
    """
    if isinstance(logits, HeadLogits):
        return logits.token_logprobs(ids)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    lse = torch.logsumexp(logits, dim=-1)
    if ids.dim() == logits.dim() - 1:
        return logits.gather(-1, ids.unsqueeze(-1)).squeeze(-1) - lse
    return logits.gather(-1, ids) - lse.unsqueeze(-1)


@torch.no_grad()
def entropy(logits: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
    """Entropy in nats of softmax(logits) over the last axis: `[..., V]` -> `[...]`.

    With `chunk_size`, positions are processed that many at a time, so the temporaries
    are `[chunk_size, V]` instead of the size of `logits`. A `HeadLogits` gives the
    entropy it took in its log-prob pass.
    """
    if isinstance(logits, HeadLogits):
        return logits.entropy()
    if chunk_size is not None:
        flat = logits.reshape(-1, logits.shape[-1])
        parts = [entropy(part) for part in flat.split(chunk_size)]
        return torch.cat(parts).reshape(logits.shape[:-1])
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
    student_topk: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k forward KL `sum_{v in V_k} pi_T(v) (lpT_v - max(lpS_v, floor))`.

    Teacher log-probs are the full-vocabulary values at the top-k ids (not renormalised).
    With K = V this is the full forward KL (when the floor does not bind). The student's
    log-probs are clamped at `logprob_floor` so a token the student gives no mass cannot
    make the term diverge; the clamp passes no gradient where it binds.
    Returns `(kl [B, T], floor_hits [B, T])`, the latter the fraction of the K ids whose
    student log-prob was clamped. `student_topk [B, T, K]`: the student's log-probs at
    `topk_ids` when the caller already has them (`student_logits` is then not read).
    """
    if student_topk is None:
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


def generalized_jsd(
    student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor, beta: float
) -> torch.Tensor:
    """GKD's generalized Jensen-Shannon divergence JSD(beta) over the last axis.

    Inputs are log-probabilities `[..., N]` of two distributions on the same N outcomes;
    returns `[...]`. With `M = beta * pi_T + (1 - beta) * pi_S`:
    `JSD(beta) = beta * KL(pi_T || M) + (1 - beta) * KL(pi_S || M)`.
    `beta = 0` is the forward KL(pi_T || pi_S) and `beta = 1` the reverse KL(pi_S || pi_T)
    (the limits of JSD(beta) / beta and JSD(beta) / (1 - beta); GKD's and TRL's convention).
    Outcomes of zero probability (log-prob -inf) add 0, not NaN.
    """
    if beta == 0:
        return _kl(teacher_logprobs, student_logprobs)
    if beta == 1:
        return _kl(student_logprobs, teacher_logprobs)
    mixture = torch.logaddexp(
        teacher_logprobs + math.log(beta), student_logprobs + math.log1p(-beta)
    )
    return beta * _kl(teacher_logprobs, mixture) + (1 - beta) * _kl(student_logprobs, mixture)


def _kl(p_logprobs: torch.Tensor, q_logprobs: torch.Tensor) -> torch.Tensor:
    """KL(p || q) over the last axis from log-probs, with 0 * log 0 = 0."""
    p = p_logprobs.exp()
    return torch.where(p > 0, p * (p_logprobs - q_logprobs), 0.0).sum(-1)


def topk_generalized_jsd(
    student_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_teacher_logprobs: torch.Tensor,
    beta: float,
    logprob_floor: float,
    chunk_size: int,
) -> torch.Tensor:
    """JSD(beta) per position on the teacher's top-k support plus one remainder bucket.

    student_logits `[B, T, V]`, topk_ids / topk_teacher_logprobs `[B, T, K]` (full-vocab
    teacher log-probs); returns `[B, T]`. Both distributions are coarse-grained to the K
    ids and one bucket holding the rest of the vocabulary (mass `1 - sum` of the K
    probabilities). With K = V there is no bucket and this is exactly the full-vocabulary
    JSD(beta); with K < V it is the divergence between the coarse-grained distributions, a
    lower bound of the full one (merging outcomes never increases an f-divergence).
    Teacher log-probs (and the teacher's remainder) are clamped at `logprob_floor` so the
    reverse-KL terms stay finite.

    Memory: computed `chunk_size` positions at a time (`ChunkedRows`), so forward and
    backward hold `[chunk_size, V]` temporaries beyond `student_logits` and its gradient.
    """
    vocab, k = student_logits.shape[-1], topk_ids.shape[-1]
    divergence = ChunkedRows.apply(
        student_logits.reshape(-1, vocab),
        functools.partial(_bucketed_jsd, beta=beta, logprob_floor=logprob_floor),
        chunk_size,
        topk_ids.reshape(-1, k),
        topk_teacher_logprobs.reshape(-1, k),
    )
    return divergence.reshape(student_logits.shape[:-1])


class ChunkedRows(torch.autograd.Function):
    """`fn` applied to `logits [N, V]` (with `row_inputs [N, ...]`) `chunk_size` rows at a
    time, returning `[N]`; `fn` maps one chunk `[C, V]` to `[C]`, row by row.

    No chunk's intermediates are kept: the forward runs without autograd, and the backward
    recomputes each chunk and writes its gradient into one `[N, V]` buffer (the gradient
    of `logits`, which autograd needs anyway). The largest temporaries are `[C, V]`.
    Unlike activation checkpointing over `split` views, the per-chunk gradients are never
    all alive at once. First-order gradients only.
    """

    @staticmethod
    def forward(ctx, logits, fn, chunk_size, *row_inputs):
        ctx.fn, ctx.chunk_size = fn, chunk_size
        ctx.save_for_backward(logits, *row_inputs)
        chunks = (x.split(chunk_size) for x in (logits, *row_inputs))
        parts = zip(*chunks, strict=True)
        return torch.cat([fn(*part) for part in parts])

    @staticmethod
    def backward(ctx, grad_output):
        logits, *row_inputs = ctx.saved_tensors
        grad = torch.empty_like(logits)
        for start in range(0, logits.shape[0], ctx.chunk_size):
            rows = slice(start, start + ctx.chunk_size)
            part = logits[rows].detach().requires_grad_()
            with torch.enable_grad():
                value = ctx.fn(part, *(x[rows] for x in row_inputs))
            (grad[rows],) = torch.autograd.grad(value, part, grad_output[rows])
        return grad, None, None, *(None for _ in row_inputs)


def _bucketed_jsd(
    logits: torch.Tensor,
    ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    beta: float,
    logprob_floor: float,
) -> torch.Tensor:
    """One chunk of `topk_generalized_jsd`: logits `[C, V]`, ids / teacher `[C, K]` -> `[C]`."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    student = logits.gather(-1, ids) - lse
    teacher = torch.clamp(teacher_logprobs.to(student.dtype), min=logprob_floor)
    if ids.shape[-1] < logits.shape[-1]:
        outside = logits.scatter(-1, ids, float("-inf"))
        student_rest = torch.logsumexp(outside, dim=-1, keepdim=True) - lse
        teacher_mass = torch.logsumexp(teacher, dim=-1, keepdim=True)
        teacher_rest = torch.log(
            torch.clamp(-torch.expm1(teacher_mass), min=math.exp(logprob_floor))
        )
        student = torch.cat([student, student_rest], -1)
        teacher = torch.cat([teacher, teacher_rest], -1)
    return generalized_jsd(student, teacher, beta)


def sampled_topk_jsd(
    student_logits: torch.Tensor,
    tokens: torch.Tensor,
    sampler_logprobs: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_teacher_logprobs: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """SPEC §3 JSD (top-k) per token `[B, T]`, with `M = beta * pi_T + (1 - beta) * pi_S`:

        beta * sum_{v in V_k} pi_T(v) log(pi_T(v) / M(v))  +  (1 - beta) * w * f(x)

    `f(x) = log pi_S(x) - log M(x)` on the sampled token, `w = exp(lpS - lq)`. The first
    term is exact over the teacher's top-k (gradient through M). The second is the
    importance-sampled estimate of KL(pi_S || M) written as the stop-gradient surrogate
    `w * sg(f) + sg(w) * (f - sg(f))`: its value is `w * f` and its expected gradient under
    q is the gradient of KL(pi_S || M) including M's own dependence on pi_S. With K = V the
    expectation of the loss and of its gradient are those of the full JSD(beta).
    `beta` must be in (0, 1).
    """
    log_beta, log_rest = math.log(beta), math.log1p(-beta)
    student_topk = token_logprobs(student_logits, topk_ids)
    teacher_topk = topk_teacher_logprobs.to(student_topk.dtype)
    mixture_topk = torch.logaddexp(teacher_topk + log_beta, student_topk + log_rest)
    teacher_probs = teacher_topk.exp()
    teacher_part = torch.where(
        teacher_probs > 0, teacher_probs * (teacher_topk - mixture_topk), 0.0
    ).sum(-1)

    student_lp = token_logprobs(student_logits, tokens)
    mixture = torch.logaddexp(
        teacher_logprobs.to(student_lp.dtype) + log_beta, student_lp + log_rest
    )
    f = student_lp - mixture
    ratio = torch.exp(student_lp - sampler_logprobs.to(student_lp.dtype))
    student_part = ratio * f.detach() + ratio.detach() * (f - f.detach())
    return beta * teacher_part + (1 - beta) * student_part


def group_normalize(
    values: torch.Tensor, mask: torch.Tensor, group: torch.Tensor, eps: float, scale: bool = True
) -> torch.Tensor:
    """Per-group z-score of `values [B, T]` over the entries in `mask [B, T]`.

    Rows with the same `group [B]` id (the rollouts of one prompt) share one mean and one
    (unbiased) standard deviation, taken over all their masked entries:
    `(v - mean_g) / (std_g + eps)`, or `v - mean_g` when `scale` is false. A group whose
    entries are all equal (a single one included) gets exactly 0, with no rounding residue
    from the mean. Returns 0 off the mask; the result carries no gradient.
    """
    values = values.detach()
    _, index = torch.unique(group, return_inverse=True)
    index = index.to(values.device)
    weight = mask.to(values.dtype)
    zeros = values.new_zeros(int(index.max()) + 1 if index.numel() else 0)
    count = zeros.index_add(0, index, weight.sum(-1))
    mean = zeros.index_add(0, index, (values * weight).sum(-1)) / count.clamp(min=1)
    row_max = torch.where(mask, values, float("-inf")).amax(-1)
    row_min = torch.where(mask, values, float("inf")).amin(-1)
    spread = zeros.scatter_reduce(0, index, row_max, "amax", include_self=False)
    spread = spread - zeros.scatter_reduce(0, index, row_min, "amin", include_self=False)
    varies = (spread > 0)[index, None]
    centered = torch.where(mask & varies, values - mean[index, None], 0.0)
    if not scale:
        return centered
    variance = zeros.index_add(0, index, (centered**2).sum(-1)) / (count - 1).clamp(min=1)
    return centered / (variance.sqrt()[index, None] + eps)
