"""Off-policy guidance schedule (SPEC §2.5): the cosine prefix cap, prefix lengths, and
which rollouts get a teacher prefix."""

from __future__ import annotations

import itertools
import math
import random
from collections import Counter

import pytest

from tropd.rollout.guidance import guided_rows, prefix_cap, prefix_lengths

# --- prefix_cap --------------------------------------------------------------------


@pytest.mark.parametrize(("total_steps", "max_len"), [(2, 16), (13, 16), (200, 8096), (7, 5)])
def test_cap_starts_at_max_len_and_ends_at_zero(total_steps: int, max_len: int) -> None:
    assert prefix_cap(0, total_steps, max_len) == max_len
    assert prefix_cap(total_steps - 1, total_steps, max_len) == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize(
    ("step", "fraction_of_max"),
    [
        (3, (1 + math.sqrt(0.5)) / 2),  # s/(S-1) = 1/4: cos = sqrt(2)/2
        (4, 0.75),  # 1/3: cos = 1/2
        (6, 0.5),  # 1/2: cos = 0
        (8, 0.25),  # 2/3: cos = -1/2
        (9, (1 - math.sqrt(0.5)) / 2),  # 3/4: cos = -sqrt(2)/2
    ],
)
def test_cap_follows_the_cosine_at_known_angles(step: int, fraction_of_max: float) -> None:
    # S = 13 steps, so s / (S - 1) = s / 12 hits the angles above exactly.
    assert prefix_cap(step, 13, 64) == pytest.approx(64 * fraction_of_max, rel=1e-12)


@pytest.mark.parametrize(("total_steps", "max_len"), [(2, 16), (50, 16), (200, 8096)])
def test_cap_is_monotone_non_increasing_and_within_bounds(total_steps: int, max_len: int) -> None:
    caps = [prefix_cap(s, total_steps, max_len) for s in range(total_steps)]
    assert all(0.0 <= c <= max_len for c in caps)
    assert all(later <= earlier for earlier, later in itertools.pairwise(caps))
    assert caps[0] > caps[-1]


def test_cap_stays_zero_past_the_last_step() -> None:
    # A resumed or extended run must never go back off-policy.
    assert prefix_cap(10, 10, 16) == pytest.approx(0.0, abs=1e-9)
    assert prefix_cap(25, 10, 16) == pytest.approx(0.0, abs=1e-9)


# --- prefix_lengths ----------------------------------------------------------------


def test_cap_mode_keeps_min_of_teacher_length_and_cap() -> None:
    lengths = prefix_lengths([0, 3, 5, 6, 40], 5.0, "cap", [True] * 5, random.Random(0))
    assert lengths == [0, 3, 5, 5, 5]


def test_fractional_cap_is_truncated_to_whole_tokens() -> None:
    lengths = prefix_lengths([10, 10, 2], 5.99, "cap", [True] * 3, random.Random(0))
    assert lengths == [5, 5, 2]


def test_relative_cap_is_a_share_of_each_teacher_length() -> None:
    lengths = prefix_lengths([10, 7, 0], 0.5, "cap", [True] * 3, random.Random(0), relative=True)
    assert lengths == [5, 3, 0]


@pytest.mark.parametrize("mode", ["cap", "uniform"])
def test_without_full_prefix_a_prefix_stops_short_of_the_teacher_reply(mode: str) -> None:
    rng = random.Random(0)
    for _ in range(50):
        lengths = prefix_lengths([1, 4, 9], 100.0, mode, [True] * 3, rng, full_prefix=False)
        assert all(0 <= n < t for n, t in zip(lengths, [1, 4, 9], strict=True))
    assert prefix_lengths([1, 4, 9], 100.0, "cap", [True] * 3, rng, full_prefix=False) == [
        0,
        3,
        8,
    ]


@pytest.mark.parametrize("mode", ["cap", "uniform"])
def test_unguided_rows_get_no_prefix(mode: str) -> None:
    guided = [True, False, True, False]
    lengths = prefix_lengths([9, 9, 9, 9], 4.0, mode, guided, random.Random(3))
    assert lengths[1] == lengths[3] == 0
    if mode == "cap":
        assert lengths == [4, 0, 4, 0]


@pytest.mark.parametrize("mode", ["cap", "uniform"])
def test_zero_cap_gives_no_prefix(mode: str) -> None:
    assert prefix_lengths([5, 0, 9], 0.0, mode, [True] * 3, random.Random(0)) == [0, 0, 0]


@pytest.mark.parametrize("mode", ["cap", "uniform"])
def test_lengths_never_exceed_teacher_length_or_cap(mode: str) -> None:
    rng = random.Random(1234)
    for _ in range(300):
        n = rng.randint(1, 8)
        teacher_lengths = [rng.randint(0, 30) for _ in range(n)]
        cap = rng.uniform(0, 25)
        guided = [rng.random() < 0.7 for _ in range(n)]
        lengths = prefix_lengths(teacher_lengths, cap, mode, guided, random.Random(rng.random()))
        for length, n_teacher, is_guided in zip(lengths, teacher_lengths, guided, strict=True):
            assert 0 <= length <= min(n_teacher, int(cap))
            if not is_guided:
                assert length == 0


def test_uniform_mode_covers_zero_to_limit_evenly() -> None:
    rng = random.Random(7)
    draws = 6000
    # limit = min(|y_T|, cap) = min(9, 5) = 5 for every row: U{0 .. 5}, six values.
    lengths = prefix_lengths([9] * draws, 5.5, "uniform", [True] * draws, rng)
    counts = Counter(lengths)
    assert sorted(counts) == [0, 1, 2, 3, 4, 5]
    # Each count is Binomial(draws, 1/6): within 5 standard deviations of its mean.
    spread = 5 * math.sqrt(draws * (1 / 6) * (5 / 6))
    for value in range(6):
        assert abs(counts[value] - draws / 6) <= spread, (value, counts[value])


def test_uniform_mode_limit_is_the_teacher_length_when_shorter() -> None:
    draws = 3000
    lengths = prefix_lengths([2] * draws, 10.0, "uniform", [True] * draws, random.Random(11))
    assert set(lengths) == {0, 1, 2}


def test_uniform_mode_is_reproducible_from_the_rng() -> None:
    def draw(seed: int) -> list[int]:
        return prefix_lengths([12] * 50, 8.0, "uniform", [True] * 50, random.Random(seed))

    assert draw(5) == draw(5)
    assert draw(5) != draw(6)


# --- guided_rows -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("num_prompts", "samples_per_prompt", "fraction", "guided_total"),
    [
        (6, 4, 0.0, 0),
        (6, 4, 0.25, 6),
        (6, 4, 0.3, 7),  # 7.2 rollouts
        (6, 4, 0.5, 12),
        (6, 4, 0.4, 10),  # 9.6
        (6, 4, 0.75, 18),
        (6, 4, 1.0, 24),
        (6, 3, 0.5, 9),
        (6, 5, 0.6, 18),
        (6, 1, 1.0, 6),
        (6, 1, 0.5, 3),  # one sample per prompt: half the prompts, not none
        (5, 1, 0.5, 3),  # 2.5 rounds half up
        (7, 2, 0.25, 4),  # 3.5
    ],
)
def test_the_step_gets_its_fraction_of_guided_rollouts_spread_evenly(
    num_prompts: int, samples_per_prompt: int, fraction: float, guided_total: int
) -> None:
    for seed in range(5):
        flags = guided_rows(num_prompts, samples_per_prompt, fraction, random.Random(seed))
        assert len(flags) == num_prompts * samples_per_prompt
        assert sum(flags) == guided_total
        per_prompt = [
            sum(flags[p * samples_per_prompt : (p + 1) * samples_per_prompt])
            for p in range(num_prompts)
        ]
        assert max(per_prompt) - min(per_prompt) <= (guided_total % num_prompts > 0)


def test_with_one_sample_per_prompt_the_guided_prompts_vary() -> None:
    draws = {tuple(guided_rows(6, 1, 0.5, random.Random(seed))) for seed in range(20)}
    assert len(draws) > 5  # random prompts, not "the first half"


def test_guided_rollouts_are_chosen_at_random_within_each_prompt() -> None:
    flags = guided_rows(400, 4, 0.5, random.Random(2))
    per_slot = [sum(flags[j::4]) for j in range(4)]
    # Every slot is picked sometimes and none always: not "the first k rollouts".
    assert all(100 < count < 300 for count in per_slot)
    patterns = {tuple(flags[p * 4 : p * 4 + 4]) for p in range(400)}
    assert len(patterns) == 6  # all C(4, 2) choices occur


def test_guided_rows_are_reproducible_from_the_rng() -> None:
    assert guided_rows(20, 4, 0.5, random.Random(9)) == guided_rows(20, 4, 0.5, random.Random(9))
