"""Off-policy guidance (SPEC §2.5): teacher prefixes whose cap shrinks to zero."""

from __future__ import annotations

import math
import random


def prefix_cap(step: int, total_steps: int, max_len: int) -> float:
    """`L_max(s) = L_0 * (1 + cos(pi * s / (S - 1))) / 2` for steps s = 0 .. S-1.

    Equals `max_len` at the first step and 0 at the last, so training starts fully
    off-policy and ends fully on-policy.
    """
    if total_steps <= 1:
        return 0.0
    progress = min(max(step / (total_steps - 1), 0.0), 1.0)
    return max_len * 0.5 * (1 + math.cos(math.pi * progress))


def prefix_lengths(
    teacher_lengths: list[int],
    cap: float,
    mode: str,
    guided: list[bool],
    rng: random.Random,
    relative: bool = False,
    full_prefix: bool = True,
) -> list[int]:
    """Tokens of each teacher response to keep: `cap` mode keeps `min(|y_T|, limit)`,
    `uniform` draws `l ~ U{0 .. min(|y_T|, limit)}`; unguided rollouts keep 0.

    `limit` is `cap` tokens, or `cap * |y_T|` (rounded down) when `relative` (cap is a
    share of each teacher response). Without `full_prefix` a prefix stops at least one
    token short of the teacher's response, so the student writes part of every rollout.
    """
    lengths = []
    for n_teacher, is_guided in zip(teacher_lengths, guided, strict=True):
        limit = cap * n_teacher if relative else cap
        limit = min(n_teacher if full_prefix else n_teacher - 1, int(limit))
        limit = max(limit, 0) if is_guided else 0
        lengths.append(rng.randint(0, limit) if mode == "uniform" else limit)
    return lengths


def guided_rows(
    num_prompts: int, samples_per_prompt: int, fraction: float, rng: random.Random
) -> list[bool]:
    """Which rollouts get a prefix: `fraction` of the step's rollouts (rounded half up),
    spread over the prompts as evenly as they divide: each prompt gets `total // prompts`
    of its rollouts, and `total % prompts` prompts chosen at random get one more (so one
    sample per prompt and fraction 0.5 guide half the prompts, not none). Within a prompt
    the guided rollouts are chosen at random. Rows are ordered prompt-major (prompt i owns
    rows i*n .. i*n+n-1)."""
    total = math.floor(fraction * num_prompts * samples_per_prompt + 0.5)
    base, extra = divmod(total, num_prompts)
    # Drawn only when the share does not divide evenly, so the draws of the even case
    # (e.g. 2 of 4 samples) do not depend on this step.
    one_more = set(rng.sample(range(num_prompts), extra)) if extra else set()
    flags = []
    for p in range(num_prompts):
        chosen = set(rng.sample(range(samples_per_prompt), base + (p in one_more)))
        flags.extend(j in chosen for j in range(samples_per_prompt))
    return flags
