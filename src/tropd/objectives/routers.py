"""Token routers: decide, per token, which estimator applies and with what weight."""

from __future__ import annotations

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
