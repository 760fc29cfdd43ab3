"""Trust-region behaviour blending (TRB, SPEC §3): rollouts sampled from the geometric
mixture `mu_b ∝ pi_S^(1-b) · pi_T^b` with the largest `b` that keeps `KL(mu_b || pi_S)`
within a budget, so early rollouts lean toward the teacher without leaving a trust
region around the student. The budget anneals to 0 (pure student rollouts)."""

from __future__ import annotations

import torch

from tropd.rollout.engine import Generation, HFEngine, SamplingParams, decode, top_p_logits

BISECTION_STEPS = 30  # b is found to within 2^-30 of the largest feasible value
LOGPROB_MIN = -1e4  # log-probs are clamped here so b * (lpT - lpS) stays finite


def blend_budget(step: int, kl_budget: float, warmup_steps: int) -> float:
    """`eps_k = eps_0 · max(1 - k / K, 0)` for the 0-based step `k`: `kl_budget` at the
    first step, 0 from step `warmup_steps` on."""
    return kl_budget * max(1.0 - step / warmup_steps, 0.0)


def blend_logprobs(
    student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor, weight: torch.Tensor
) -> torch.Tensor:
    """`log mu_b = log_softmax((1 - b) lpS + b lpT)` over the last axis.

    Log-probs `[N, V]`, `weight` (b) `[N]`; returns `[N, V]`."""
    mixed = student_logprobs + weight[:, None] * (teacher_logprobs - student_logprobs)
    return torch.log_softmax(mixed, dim=-1)


def kl_from_student(blend: torch.Tensor, student_logprobs: torch.Tensor) -> torch.Tensor:
    """`KL(mu || pi_S)` per row from log-probs `[N, V]`; returns `[N]`."""
    return (blend.exp() * (blend - student_logprobs)).sum(-1)


def blend_weight(
    student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor, budget: float
) -> torch.Tensor:
    """The largest `b` in [0, 1] with `KL(mu_b || pi_S) <= budget`, per row `[N]`.

    `KL(mu_b || pi_S)` grows with b (its derivative is b times the variance of
    `lpT - lpS` under mu_b), so bisection applies. Invariant: the returned b is always
    feasible (the lower end of the bracket only moves to feasible points); it is exactly 1
    where the teacher itself is within budget, and exactly 0 for a budget of 0 (where
    rounding could otherwise admit a tiny b).
    """
    rows = student_logprobs.shape[0]
    low = student_logprobs.new_zeros(rows)
    if budget <= 0:
        return low
    high = student_logprobs.new_ones(rows)
    teacher_fits = kl_from_student(
        blend_logprobs(student_logprobs, teacher_logprobs, high), student_logprobs
    )
    teacher_fits = teacher_fits <= budget
    for _ in range(BISECTION_STEPS):
        middle = (low + high) / 2
        kl = kl_from_student(
            blend_logprobs(student_logprobs, teacher_logprobs, middle), student_logprobs
        )
        feasible = kl <= budget
        low = torch.where(feasible, middle, low)
        high = torch.where(feasible, high, middle)
    return torch.where(teacher_fits, high.new_ones(rows), low)


def _top_p(logprobs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus truncation of `[N, V]` log-probs, renormalised (see `top_p_logits`)."""
    if top_p >= 1:
        return logprobs
    return torch.log_softmax(top_p_logits(logprobs, top_p), dim=-1)


class BlendEngine:
    """An `Engine` sampling every token from `mu_b`, `b` per row and position the largest
    with `KL(mu_b || pi_S) <= kl_budget` (`blend_weight`). The recorded log-prob is
    `log mu(token)`, the behaviour policy's, as `Generation.logprobs` promises.

    Student and teacher run side by side one token at a time, each with its own KV cache
    (left-padded prompts, positions counted from each prompt's first real token, as
    `HFEngine`). `temperature` tempers both distributions before blending, so the budget is
    measured against the tempered student; `top_p` then truncates mu, and the recorded
    log-prob is that of the truncated, renormalised mu. Temperature 0 takes mu's argmax
    (b from the untempered distributions). A budget of 0 makes mu the student: generation
    is then handed to `HFEngine` and the teacher is not run.
    """

    def __init__(self, student, teacher, kl_budget: float, pad_token_id: int, eos_token_id: int):
        self.student, self.teacher, self.kl_budget = student, teacher, kl_budget
        self.pad_token_id, self.eos_token_id = pad_token_id, eos_token_id

    @torch.no_grad()
    def generate(
        self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]
    ) -> list[Generation]:
        if self.kl_budget == 0:
            return HFEngine(self.student, self.pad_token_id, self.eos_token_id).generate(
                prompts, params
            )
        return decode(
            [self.student, self.teacher],
            prompts,
            params,
            self.pad_token_id,
            self.eos_token_id,
            lambda logits, p: self._sample(*logits, p),
        )

    def _sample(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, params: SamplingParams
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw one token per row from mu; returns `(tokens [N], log mu(tokens) [N])`."""
        temperature = params.temperature if params.temperature > 0 else 1.0
        student = torch.log_softmax(student_logits / temperature, -1).clamp(min=LOGPROB_MIN)
        teacher = torch.log_softmax(teacher_logits / temperature, -1).clamp(min=LOGPROB_MIN)
        blend = blend_logprobs(student, teacher, blend_weight(student, teacher, self.kl_budget))
        if params.temperature == 0:
            token = blend.argmax(-1)
        else:
            blend = _top_p(blend, params.top_p)
            token = torch.multinomial(blend.exp(), 1).squeeze(-1)
        return token, blend.gather(-1, token[:, None]).squeeze(-1)
