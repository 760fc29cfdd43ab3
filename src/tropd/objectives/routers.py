"""Token routers: decide, per token, which estimator applies and with what weight."""

from __future__ import annotations

import math

import torch

TRUST_GATES = ("hard", "soft", "threshold")


def trust_probability(reward: torch.Tensor) -> torch.Tensor:
    """Speculative-decoding acceptance `min(1, pi_T / q) = min(1, exp(r))`, `[B, T]`."""
    return torch.exp(torch.clamp(reward, max=0.0))


def trust_weight(
    reward: torch.Tensor,
    gate: str,
    tau: float,
    injected: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Per-token weight in [0, 1] of the trust-region (on-policy) loss; 1 - weight goes
    to the outlier loss.

    - `hard`: `M_t ~ Bernoulli(min(1, exp(r_t)))` (the paper), drawn from `generator`.
    - `soft`: the probability itself, the hard gate's expectation.
    - `threshold`: `1[r_t > tau]`, the static gate of the Mask/Clip Outlier rows.
    `injected` (a caller-supplied `[B, T]` bool mask) overrides any gate.
    """
    if injected is not None:
        return injected.to(reward.dtype)
    reward = reward.detach()
    if gate == "threshold":
        return (reward > tau).to(reward.dtype)
    probability = trust_probability(reward)
    if gate == "soft":
        return probability
    uniform = torch.rand(probability.shape, generator=generator, device="cpu")
    return (uniform.to(probability.device) < probability).to(reward.dtype)


def top_fraction(scores: torch.Tensor, mask: torch.Tensor, fraction: float) -> torch.Tensor:
    """`[B, T]` bool: the `ceil(fraction * n)` tokens of `mask` with the largest `scores`.

    `n` is the number of tokens in `mask` (in this call: a micro-batch selects among its
    own tokens). Ties are broken by position, earlier first, so the choice is exact and
    reproducible. `fraction` in (0, 1]; 1 keeps every masked token.
    """
    count = int(mask.sum())
    keep = math.ceil(round(fraction * count, 9))
    flat = torch.where(mask, scores.detach(), float("-inf")).flatten()
    order = torch.sort(flat, descending=True, stable=True).indices[:keep]
    selected = torch.zeros_like(flat, dtype=torch.bool)
    selected[order] = True
    return selected.view(mask.shape) & mask


def quantile_normalize(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Empirical CDF of each token's value among the `mask` tokens: the fraction of masked
    values `<=` it, in (0, 1]; equal values get equal quantiles. `[B, T]`, 0 off the mask."""
    values = values.detach()
    reference = torch.sort(values[mask]).values
    if reference.numel() == 0:
        return torch.zeros_like(values)
    below = torch.searchsorted(reference, values.contiguous(), right=True)
    return torch.where(mask, below.to(values.dtype) / reference.numel(), 0.0)
