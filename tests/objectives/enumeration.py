"""Exact-enumeration builders for the objective tests.

The vocabulary is tiny (V = 5) so every outcome of a one- or two-token response can be
listed, and every expectation over the sampler is a finite weighted sum.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tropd.batch import PROMPT, STUDENT, TokenBatch

V = 5
PROMPT_TOKEN = 0


@dataclass
class OnePosition:
    """Every token `x` of the vocabulary as its own row `[prompt, x]`.

    `logits [V, 2, V]` is a function of the leaf `theta [V]` (the student's logits at the
    response position, shared by all rows), so gradients land on `theta`.
    """

    theta: torch.Tensor  # [V] student logits, requires grad
    teacher_logits: torch.Tensor  # [V]
    sampler_logits: torch.Tensor  # [V], the policy q that sampled the token
    logits: torch.Tensor  # [V, 2, V]
    batch: TokenBatch

    @property
    def student_logprobs(self) -> torch.Tensor:  # [V], float64
        return torch.log_softmax(self.theta.detach().double(), -1)

    @property
    def teacher_logprobs(self) -> torch.Tensor:  # [V], float64
        return torch.log_softmax(self.teacher_logits.double(), -1)

    @property
    def q(self) -> torch.Tensor:  # [V], float64 sampling probability of each row's token
        return torch.softmax(self.sampler_logits.double(), -1)


def one_position(
    theta: torch.Tensor,
    teacher_logits: torch.Tensor,
    sampler_logits: torch.Tensor | None = None,
    k: int | None = None,
    **fields: torch.Tensor,
) -> OnePosition:
    """Build the enumeration batch; `sampler_logits` defaults to `theta` (on-policy).

    Teacher top-k holds the `k` most likely teacher tokens (default: all V) at every
    position, with their full-vocabulary log-probs.
    """
    vocab = theta.shape[-1]
    k = vocab if k is None else k
    sampler_logits = theta.detach() if sampler_logits is None else sampler_logits
    x = torch.arange(vocab)
    tokens = torch.stack([torch.full_like(x, PROMPT_TOKEN), x], dim=1)
    origin = torch.tensor([PROMPT, STUDENT]).expand(vocab, 2).clone()
    logits = torch.stack(
        [torch.zeros(vocab, vocab, dtype=theta.dtype), theta.expand(vocab, vocab)], 1
    )

    lq = torch.log_softmax(sampler_logits.detach().double(), -1)[x]
    lp_teacher = torch.log_softmax(teacher_logits.double(), -1)
    topk_ids = sorted(range(vocab), key=lambda v: -float(lp_teacher[v]))[:k]
    topk_ids = torch.tensor(topk_ids).expand(vocab, 2, k).clone()
    batch = TokenBatch(
        tokens=tokens,
        origin=origin,
        sampler_logprobs=torch.stack([torch.zeros(vocab, dtype=torch.float64), lq], 1),
        teacher_logprobs=torch.stack([torch.zeros(vocab, dtype=torch.float64), lp_teacher[x]], 1),
        teacher_topk_ids=topk_ids,
        teacher_topk_logprobs=lp_teacher[topk_ids],
        **fields,
    )
    return OnePosition(theta, teacher_logits, sampler_logits, logits, batch)


def full_reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(pi_S || pi_T) over the whole vocabulary (last axis), by definition."""
    lp_s = torch.log_softmax(student_logits.double(), -1)
    lp_t = torch.log_softmax(teacher_logits.double(), -1)
    return (lp_s.exp() * (lp_s - lp_t)).sum(-1)


def full_forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(pi_T || pi_S) over the whole vocabulary (last axis), by definition."""
    return full_reverse_kl(teacher_logits, student_logits)


def grad_logprob(theta: torch.Tensor, token: int) -> torch.Tensor:
    """Closed form of d log softmax(theta)[token] / d theta = onehot(token) - softmax(theta)."""
    onehot = torch.zeros_like(theta, dtype=torch.float64)
    onehot[token] = 1.0
    return onehot - torch.softmax(theta.detach().double(), -1)


@dataclass
class TwoPositions:
    """Every two-token response `(x1, x2)` as its own row `[prompt, x1, x2]`.

    The student's logits are `theta1 [V]` at the first response position and
    `theta2[x1] [V]` at the second (one set per prefix), so the batch logits
    `[V*V, 3, V]` are a function of those two leaves. Row `x1 * V + x2`.
    """

    theta1: torch.Tensor
    theta2: torch.Tensor
    teacher1: torch.Tensor
    teacher2: torch.Tensor
    logits: torch.Tensor
    batch: TokenBatch
    q: torch.Tensor  # [V*V] probability of each row under the (on-policy) sampler


def two_positions(
    theta1: torch.Tensor, theta2: torch.Tensor, teacher1: torch.Tensor, teacher2: torch.Tensor
) -> TwoPositions:
    vocab = theta1.shape[-1]
    x1 = torch.arange(vocab).repeat_interleave(vocab)
    x2 = torch.arange(vocab).repeat(vocab)
    rows = vocab * vocab
    tokens = torch.stack([torch.full_like(x1, PROMPT_TOKEN), x1, x2], 1)
    origin = torch.tensor([PROMPT, STUDENT, STUDENT]).expand(rows, 3).clone()
    logits = torch.stack(
        [torch.zeros(rows, vocab, dtype=theta1.dtype), theta1.expand(rows, vocab), theta2[x1]], 1
    )
    lp_s1 = torch.log_softmax(theta1.detach().double(), -1)
    lp_s2 = torch.log_softmax(theta2.detach().double(), -1)
    lp_t1 = torch.log_softmax(teacher1.double(), -1)
    lp_t2 = torch.log_softmax(teacher2.double(), -1)
    zero = torch.zeros(rows, dtype=torch.float64)
    batch = TokenBatch(
        tokens=tokens,
        origin=origin,
        sampler_logprobs=torch.stack([zero, lp_s1[x1], lp_s2[x1, x2]], 1),
        teacher_logprobs=torch.stack([zero, lp_t1[x1], lp_t2[x1, x2]], 1),
    )
    q = (lp_s1[x1] + lp_s2[x1, x2]).exp()
    return TwoPositions(theta1, theta2, teacher1, teacher2, logits, batch, q)
