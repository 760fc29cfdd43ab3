"""The SPEC §3 baselines against their definitions.

Expectations over the sampler are exact sums over the enumerated vocabulary
(`enumeration.one_position`); selections, quantiles and group statistics are recomputed
here from full distributions with plain Python; GKD is also checked against TRL's
`GKDTrainer.generalized_jsd_loss` as an independent implementation.
"""

from __future__ import annotations

import importlib
import math
import warnings
import weakref
from dataclasses import dataclass

import pytest
import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from tropd.batch import PROMPT, STUDENT, TEACHER, TokenBatch
from tropd.objectives import REGISTRY, get_objective, list_objectives
from tropd.objectives.estimators import aggregate

from .enumeration import V, full_forward_kl, full_reverse_kl, one_position

BASELINES = [
    "entropy_opd",
    "eopd",
    "reopold",
    "jsd_topk",
    "gkd",
    "seqkd",
    "top_d",
    "trb",
    "ta_opd",
    "grpo",
    "opd_task",
]
GROUP_EPS = 1e-4  # what the code adds to a group's std (TRL's GRPO value)


def expected_loss(token_loss: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """E_{x ~ q}[sum of a row's token losses] over the enumerated rows."""
    return (q * token_loss.double().sum(-1)).sum()


def entropy_of(logits: torch.Tensor) -> torch.Tensor:
    lp = torch.log_softmax(logits.double(), -1)
    return -(lp.exp() * lp).sum(-1)


def jsd_by_definition(student_lp: torch.Tensor, teacher_lp: torch.Tensor, beta: float):
    """Generalized JSD(beta) over the last axis, from log-probs; 0 -> FKL, 1 -> RKL."""
    p_s, p_t = student_lp.exp(), teacher_lp.exp()
    if beta == 0:
        return (p_t * (teacher_lp - student_lp)).sum(-1)
    if beta == 1:
        return (p_s * (student_lp - teacher_lp)).sum(-1)
    mixture = torch.log(beta * p_t + (1 - beta) * p_s)
    return beta * (p_t * (teacher_lp - mixture)).sum(-1) + (1 - beta) * (
        p_s * (student_lp - mixture)
    ).sum(-1)


@dataclass
class Rows:
    """Rows of any origin pattern; every position has its own student logits `theta[b, t]`
    (a leaf) and teacher logits, so each token's gradient is read off its own slot."""

    theta: torch.Tensor  # [B, T, V]
    teacher: torch.Tensor  # [B, T, V]
    batch: TokenBatch

    @property
    def student_lp(self) -> torch.Tensor:
        return torch.log_softmax(self.theta.detach(), -1)

    @property
    def teacher_lp(self) -> torch.Tensor:
        return torch.log_softmax(self.teacher, -1)

    def at_tokens(self, logprobs: torch.Tensor) -> torch.Tensor:
        return logprobs.gather(-1, self.batch.tokens[..., None]).squeeze(-1)


def make_rows(origin, seed: int = 0, k: int = V, scales=None, **fields) -> Rows:
    """On-policy rows (`lq = lpS` on student tokens, ratio 1). `scales[b]` multiplies row
    b's student logits (different entropies); teacher top-k sorted by teacher prob."""
    origin = torch.tensor(origin)
    rows, width = origin.shape
    gen = torch.Generator().manual_seed(seed)
    scale = torch.ones(rows) if scales is None else torch.tensor(scales, dtype=torch.float64)
    theta = torch.randn(rows, width, V, dtype=torch.float64, generator=gen) * scale[:, None, None]
    theta.requires_grad_()
    teacher = 2.0 * torch.randn(rows, width, V, dtype=torch.float64, generator=gen)
    tokens = torch.randint(0, V, (rows, width), generator=gen)
    lp_s = torch.log_softmax(theta.detach(), -1)
    lp_t = torch.log_softmax(teacher, -1)
    pick = tokens[..., None]
    top = lp_t.topk(k, -1)
    batch = TokenBatch(
        tokens=tokens,
        origin=origin,
        sampler_logprobs=torch.where(origin == STUDENT, lp_s.gather(-1, pick).squeeze(-1), 0.0),
        teacher_logprobs=lp_t.gather(-1, pick).squeeze(-1),
        teacher_topk_ids=top.indices,
        teacher_topk_logprobs=top.values,
        teacher_entropy=entropy_of(teacher),
        **fields,
    )
    return Rows(theta, teacher, batch)


def single_tokens(rows: int, **kw) -> Rows:
    """`rows` rows `[prompt, student token]`."""
    return make_rows([[PROMPT, STUDENT]] * rows, **kw)


def top_rows(scores: list[float], fraction: float) -> set[int]:
    """Indices of the ceil(fraction * n) largest scores, earlier first on ties."""
    keep = math.ceil(round(fraction * len(scores), 9))
    return set(sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:keep])


# --- registry ------------------------------------------------------------------------


def test_every_baseline_is_registered_with_its_paper_defaults() -> None:
    assert set(BASELINES) <= set(list_objectives())
    defaults = {
        "entropy_opd": {"rho": 0.2},
        "eopd": {"ppo_clip": 0.2, "entropy_threshold": 0.8, "top_k": 16},
        "reopold": {"clip_lambda": 0.2},
        "jsd_topk": {"jsd_beta": 0.5},
        "top_d": {"alpha": 0.1, "ppo_clip": 0.2},
        "grpo": {"ppo_clip": 0.2},
    }
    for name, expected in defaults.items():
        options = get_objective(name).options
        assert {k: options[k] for k in expected} == expected, name
    for name in BASELINES:
        method = REGISTRY[name]
        assert method.summary and method.paper
        assert "loss_agg" in method.defaults
    assert REGISTRY["grpo"].needs_reward and REGISTRY["opd_task"].needs_reward
    assert REGISTRY["trb"].rollout == "blend"
    assert REGISTRY["seqkd"].guidance and not REGISTRY["seqkd"].trains_student
    assert {n for n, m in REGISTRY.items() if m.rollout != "student"} == {"trb"}


@pytest.mark.parametrize(
    ("name", "key", "value"),
    [
        ("entropy_opd", "rho", 0.0),
        ("entropy_opd", "rho", 1.5),
        ("ta_opd", "rho", -0.1),
        ("eopd", "entropy_threshold", -1.0),
        ("eopd", "top_k", 0),
        ("eopd", "top_k", 2.5),
        ("reopold", "clip_lambda", 0.7),
        ("reopold", "clip_lambda", 0.0),
        ("reopold", "entropy_keep", 0.0),
        ("reopold", "switch_step", -1),
        ("reopold", "selection", "both"),
        ("jsd_topk", "jsd_beta", 0.0),
        ("jsd_topk", "jsd_beta", 1.0),
        ("gkd", "jsd_beta", 1.5),
        ("gkd", "chunk_size", 0),
        ("top_d", "alpha", 0.0),
        ("top_d", "ppo_clip", 1.0),
        ("trb", "kl_budget", -0.1),
        ("trb", "warmup_steps", 0),
        ("ta_opd", "student_top_k", 0),
        ("grpo", "scale_rewards", "yes"),
        ("opd_task", "gamma", 2.0),
        ("seqkd", "loss_agg", "mean"),
    ],
)
def test_bad_baseline_option_is_one_line_naming_it(name, key, value) -> None:
    with pytest.raises(ValueError) as error:
        get_objective(name, **{key: value})
    message = str(error.value)
    assert "\n" not in message and f"{name}.{key}" in message


def test_gkd_beta_takes_the_kl_endpoints_but_jsd_topk_does_not() -> None:
    assert get_objective("gkd", jsd_beta=0.0).options["jsd_beta"] == 0.0
    assert get_objective("gkd", jsd_beta=1.0).options["jsd_beta"] == 1.0
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        get_objective("jsd_topk", jsd_beta=1.0)


@pytest.mark.parametrize("name", ["jsd_topk", "gkd"])
def test_beta_is_a_deprecated_alias_of_jsd_beta(name: str) -> None:
    with pytest.warns(DeprecationWarning, match=rf"{name}\.beta .* use {name}\.jsd_beta"):
        objective = get_objective(name, beta=0.3)
    assert objective.options["jsd_beta"] == 0.3 and "beta" not in objective.options
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match=r"\(0, 1\)|\[0, 1\]"):
        get_objective(name, beta=1.5)
    with pytest.raises(ValueError, match="jsd_beta only"):
        get_objective(name, beta=0.3, jsd_beta=0.3)


def test_tropd_beta_is_the_guidance_weight_not_an_alias() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert get_objective("tropd", beta=0.3).options["beta"] == 0.3
    with pytest.raises(ValueError, match="jsd_beta"):
        get_objective("tropd", jsd_beta=0.3)


def full_batch(seed: int = 3) -> Rows:
    """Ragged rows with prompt, teacher-prefix and student tokens, two prompt groups,
    verifier rewards and teacher entropy: every field any method reads."""
    origin = [
        [PROMPT, PROMPT, STUDENT, STUDENT, STUDENT, PROMPT],
        [PROMPT, TEACHER, TEACHER, STUDENT, PROMPT, PROMPT],
        [PROMPT, PROMPT, TEACHER, TEACHER, TEACHER, TEACHER],
        [PROMPT, STUDENT, STUDENT, PROMPT, PROMPT, PROMPT],
    ]
    return make_rows(
        origin,
        seed=seed,
        k=3,
        group=torch.tensor([0, 0, 1, 1]),
        reward=torch.tensor([1.0, 0.0, 0.0, 1.0]),
    )


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_mean", "seq_sum"])
@pytest.mark.parametrize("name", BASELINES)
def test_loss_aggregates_the_registered_trained_tokens(name: str, mode: str) -> None:
    """Zero outside the method's tokens, the documented aggregation over exactly the mask
    `Objective.trained_mask` reports (what the loop's micro-batch denominator counts), a
    finite gradient, and float metrics."""
    case = full_batch()
    objective = get_objective(name, loss_agg=mode)
    out = objective(case.theta, case.batch, step=1, generator=torch.Generator().manual_seed(0))
    trained = objective.trained_mask(case.batch)
    assert torch.equal(out.token_loss[~trained], torch.zeros_like(out.token_loss[~trained]))
    assert out.loss.item() == pytest.approx(
        aggregate(out.token_loss, trained, mode).item(), rel=1e-9, abs=1e-12
    )
    (grad,) = torch.autograd.grad(out.loss, case.theta)
    assert torch.isfinite(grad).all()
    assert all(type(v) is float for v in out.metrics.values())
    assert {"student_entropy", "reward_mean", "teacher_topk_mass"} <= set(out.metrics)


@pytest.mark.parametrize("name", ["jsd_topk", "gkd", "seqkd", "trb", "top_d", "grpo", "opd_task"])
def test_micro_batches_that_keep_groups_whole_add_up(name: str) -> None:
    case = full_batch()
    objective = get_objective(name)
    full = objective(case.theta, case.batch)
    (full_grad,) = torch.autograd.grad(full.loss, case.theta)
    denominator = objective.denominator(case.batch)
    parts = [
        objective(case.theta[s], case.batch.select(s), denominator=denominator).loss
        for s in (slice(0, 2), slice(2, 4))
    ]
    (micro_grad,) = torch.autograd.grad(sum(parts), case.theta)
    assert sum(parts).item() == pytest.approx(full.loss.item(), rel=1e-9, abs=1e-12)
    torch.testing.assert_close(micro_grad, full_grad, rtol=1e-9, atol=1e-12)


def test_step_keyword_is_optional_for_every_objective() -> None:
    """The loop passes `step=`; callers of the original signature still work, and only a
    method whose rule depends on the step (two-stage REOPOLD, not its default) reads it."""
    case = full_batch()
    for name in list_objectives():
        objective = get_objective(name)
        without = objective(case.theta, case.batch, generator=torch.Generator().manual_seed(0))
        with_step = objective(
            case.theta, case.batch, generator=torch.Generator().manual_seed(0), step=7
        )
        assert without.loss.item() == with_step.loss.item(), name


# --- Entropy OPD -------------------------------------------------------------------


@pytest.mark.parametrize("rho", [0.2, 0.5, 1.0])
def test_entropy_opd_trains_the_top_rho_tokens_by_student_entropy(rho: float) -> None:
    scales = [0.3, 2.0, 1.0, 4.0, 0.1, 1.5, 0.7]
    case = single_tokens(len(scales), scales=scales)
    out = get_objective("entropy_opd", rho=rho, loss_agg="seq_sum")(case.theta, case.batch)
    entropies = [float(entropy_of(case.theta[b, 1].detach())) for b in range(len(scales))]
    chosen = top_rows(entropies, rho)
    reward = (case.batch.teacher_logprobs - case.batch.sampler_logprobs)[:, 1]
    for b in range(len(scales)):
        expected = -reward[b].item() if b in chosen else 0.0  # ratio 1: loss = -r_t
        assert out.token_loss[b, 1].item() == pytest.approx(expected, abs=1e-12), b
    assert out.metrics["selected_fraction"] == pytest.approx(len(chosen) / len(scales))
    # denominator: every student token, selected or not
    mean = get_objective("entropy_opd", rho=rho)(case.theta, case.batch)
    assert mean.loss.item() == pytest.approx(out.token_loss.sum().item() / len(scales))


def test_entropy_opd_with_every_token_is_opd_in_expectation(random_position) -> None:
    case = random_position
    out = get_objective("entropy_opd", rho=1.0)(case.logits, case.batch)
    (grad,) = torch.autograd.grad(expected_loss(out.token_loss, case.q), case.theta)
    (reference,) = torch.autograd.grad(full_reverse_kl(case.theta, case.teacher_logits), case.theta)
    torch.testing.assert_close(grad, reference, rtol=1e-6, atol=1e-9)


# --- EOPD ------------------------------------------------------------------------------


@pytest.mark.parametrize("fkl_coef", [1.0, 0.3])
@pytest.mark.parametrize("uncertain", [True, False])
def test_eopd_adds_forward_kl_where_the_teacher_is_uncertain(random_position, uncertain, fkl_coef):
    case = random_position
    h_teacher = float(entropy_of(case.teacher_logits))
    threshold = h_teacher - 0.1 if uncertain else h_teacher + 0.1
    batch = case.batch.replace(teacher_entropy=torch.full((V, 2), h_teacher, dtype=torch.float64))
    objective = get_objective("eopd", entropy_threshold=threshold, fkl_coef=fkl_coef, top_k=V)
    out = objective(case.logits, batch)
    loss = expected_loss(out.token_loss, case.q)
    (grad,) = torch.autograd.grad(loss, case.theta)

    reference = full_reverse_kl(case.theta, case.teacher_logits)
    if uncertain:
        reference = reference + fkl_coef * full_forward_kl(case.theta, case.teacher_logits)
    (reference_grad,) = torch.autograd.grad(reference, case.theta)
    torch.testing.assert_close(grad, reference_grad, rtol=1e-6, atol=1e-9)
    assert loss.item() == pytest.approx(reference.item(), rel=1e-9)
    assert out.metrics["high_entropy_fraction"] == (1.0 if uncertain else 0.0)


def test_eopd_top_k_keeps_the_teachers_most_likely_ids() -> None:
    """The FKL runs over the `top_k` most likely of the scored ids, whatever their order."""
    gen = torch.Generator().manual_seed(5)
    theta = torch.randn(V, dtype=torch.float64, generator=gen).requires_grad_()
    teacher = 2.0 * torch.randn(V, dtype=torch.float64, generator=gen)
    case = one_position(theta, teacher, k=4)
    shuffled = case.batch.replace(
        teacher_topk_ids=case.batch.teacher_topk_ids.flip(-1),
        teacher_topk_logprobs=case.batch.teacher_topk_logprobs.flip(-1),
        teacher_entropy=torch.ones(V, 2, dtype=torch.float64),
    )
    out = get_objective("eopd", top_k=2, entropy_threshold=0.5)(case.logits, shuffled)
    lp_t = torch.log_softmax(teacher, -1)
    lp_s = torch.log_softmax(theta.detach(), -1)
    best = lp_t.argsort(descending=True)[:2]
    partial_fkl = (lp_t[best].exp() * (lp_t[best] - lp_s[best])).sum()
    assert out.metrics["fkl_high_entropy"] == pytest.approx(partial_fkl.item(), rel=1e-6)


# --- REOPOLD ---------------------------------------------------------------------------


def reward_rows(rewards: list[float], scales: list[float]) -> Rows:
    """Single-token rows with the reward of row b set to `rewards[b]` exactly."""
    case = single_tokens(len(rewards), scales=scales)
    teacher_lp = case.batch.sampler_logprobs.clone()
    teacher_lp[:, 1] += torch.tensor(rewards, dtype=torch.float64)
    return Rows(case.theta, case.teacher, case.batch.replace(teacher_logprobs=teacher_lp))


REWARDS = [-6.0, -2.0, -1.0, -0.1, 0.5, 2.0]
SCALES = [1.0, 0.2, 3.0, 0.5, 2.0, 0.05]


def reopold_expected(case: Rows, kept: set[int], lam: float = 0.2) -> torch.Tensor:
    floor = math.log(lam / (1 - lam))
    return torch.tensor(
        [-max(r, floor) if b in kept else 0.0 for b, r in enumerate(REWARDS)],
        dtype=torch.float64,
    )


@pytest.mark.parametrize("lam", [0.2, 0.4])
def test_reopold_reward_selection_clips_every_reward_from_below(lam: float) -> None:
    case = reward_rows(REWARDS, SCALES)
    out = get_objective("reopold", selection="reward", clip_lambda=lam)(case.theta, case.batch)
    expected = reopold_expected(case, set(range(len(REWARDS))), lam)
    torch.testing.assert_close(out.token_loss[:, 1], expected, rtol=1e-9, atol=1e-12)
    floor = math.log(lam / (1 - lam))
    assert out.metrics["clip_fraction"] == pytest.approx(sum(r < floor for r in REWARDS) / 6)


def test_reopold_entropy_selection_keeps_the_top_fraction() -> None:
    case = reward_rows(REWARDS, SCALES)
    out = get_objective("reopold", selection="entropy", entropy_keep=0.5)(case.theta, case.batch)
    entropies = [float(entropy_of(case.theta[b, 1].detach())) for b in range(len(REWARDS))]
    expected = reopold_expected(case, top_rows(entropies, 0.5))
    torch.testing.assert_close(out.token_loss[:, 1], expected, rtol=1e-9, atol=1e-12)
    assert get_objective("reopold").options["selection"] == "entropy"


def test_reopold_two_stage_switches_at_switch_step() -> None:
    case = reward_rows(REWARDS, SCALES)
    objective = get_objective("reopold", selection="two_stage", switch_step=10, entropy_keep=0.5)
    by_reward = get_objective("reopold", selection="reward")(case.theta, case.batch)
    by_entropy = get_objective("reopold", selection="entropy", entropy_keep=0.5)(
        case.theta, case.batch
    )
    for step, reference in [(1, by_reward), (9, by_reward), (10, by_entropy), (50, by_entropy)]:
        out = objective(case.theta, case.batch, step=step)
        assert torch.equal(out.token_loss, reference.token_loss), step
    with pytest.raises(ValueError, match="step"):
        objective(case.theta, case.batch)


# --- JSD (top-k) -----------------------------------------------------------------------


def topk_jsd_by_definition(theta, teacher, ids, beta):
    """beta * sum_{v in ids} pi_T log(pi_T / M) + (1 - beta) * KL(pi_S || M)."""
    p_s, p_t = torch.softmax(theta, -1), torch.softmax(teacher.double(), -1)
    m = beta * p_t + (1 - beta) * p_s
    teacher_part = sum(p_t[v] * torch.log(p_t[v] / m[v]) for v in ids)
    return beta * teacher_part + (1 - beta) * (p_s * torch.log(p_s / m)).sum()


@pytest.mark.parametrize("k", [V, 3, 1])
@pytest.mark.parametrize("beta", [0.5, 0.1, 0.9])
@pytest.mark.parametrize("off_policy", [False, True])
def test_jsd_topk_is_unbiased_for_its_definition(k: int, beta: float, off_policy: bool) -> None:
    gen = torch.Generator().manual_seed(11)
    theta = torch.randn(V, dtype=torch.float64, generator=gen).requires_grad_()
    teacher = 2.0 * torch.randn(V, dtype=torch.float64, generator=gen)
    sampler = torch.randn(V, dtype=torch.float64, generator=gen) if off_policy else None
    case = one_position(theta, teacher, sampler, k=k)
    out = get_objective("jsd_topk", jsd_beta=beta)(case.logits, case.batch)
    loss = expected_loss(out.token_loss, case.q)
    (grad,) = torch.autograd.grad(loss, theta)

    ids = case.batch.teacher_topk_ids[0, 1].tolist()
    reference = topk_jsd_by_definition(theta, teacher, ids, beta)
    (reference_grad,) = torch.autograd.grad(reference, theta)
    assert loss.item() == pytest.approx(reference.item(), rel=1e-9, abs=1e-12)
    torch.testing.assert_close(grad, reference_grad, rtol=1e-7, atol=1e-10)
    if k == V:  # the full generalized JSD
        full = jsd_by_definition(
            torch.log_softmax(theta.detach(), -1), torch.log_softmax(teacher, -1), beta
        )
        assert loss.item() == pytest.approx(full.item(), rel=1e-9)


# --- GKD -------------------------------------------------------------------------------


def gkd_rows(seed: int = 2, k: int = V) -> Rows:
    origin = [
        [PROMPT, TEACHER, TEACHER, STUDENT, STUDENT],
        [PROMPT, STUDENT, STUDENT, STUDENT, PROMPT],
    ]
    return make_rows(origin, seed=seed, k=k)


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
def test_gkd_with_full_top_k_is_the_full_vocabulary_jsd(beta: float) -> None:
    case = gkd_rows()
    out = get_objective("gkd", jsd_beta=beta, loss_agg="seq_sum")(case.theta, case.batch)
    lp_s = torch.log_softmax(case.theta, -1)
    reference = jsd_by_definition(lp_s, case.teacher_lp, beta)
    trained = case.batch.response_mask
    torch.testing.assert_close(
        out.token_loss, torch.where(trained, reference, 0.0).detach(), rtol=1e-9, atol=1e-12
    )
    (grad,) = torch.autograd.grad(out.token_loss.sum(), case.theta)
    (reference_grad,) = torch.autograd.grad(torch.where(trained, reference, 0.0).sum(), case.theta)
    torch.testing.assert_close(grad, reference_grad, rtol=1e-8, atol=1e-11)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("k", [1, 3])
def test_gkd_below_full_k_uses_one_remainder_bucket(beta: float, k: int) -> None:
    case = gkd_rows(k=k)
    out = get_objective("gkd", jsd_beta=beta)(case.theta, case.batch)
    lp_s, lp_t = case.student_lp, case.teacher_lp
    trained = case.batch.response_mask
    for b, t in trained.nonzero().tolist():
        ids = case.batch.teacher_topk_ids[b, t].tolist()
        rest = [v for v in range(V) if v not in ids]
        coarse_s = [lp_s[b, t, v] for v in ids] + [torch.logsumexp(lp_s[b, t, rest], 0)]
        coarse_t = [lp_t[b, t, v] for v in ids] + [torch.logsumexp(lp_t[b, t, rest], 0)]
        expected = jsd_by_definition(torch.stack(coarse_s), torch.stack(coarse_t), beta)
        assert out.token_loss[b, t].item() == pytest.approx(expected.item(), rel=1e-9, abs=1e-12)
        full = jsd_by_definition(lp_s[b, t], lp_t[b, t], beta)
        assert out.token_loss[b, t].item() <= full.item() + 1e-12  # coarse-graining


@pytest.mark.parametrize("chunk_size", [1, 2, 7])
def test_gkd_result_does_not_depend_on_the_chunk_size(chunk_size: int) -> None:
    case = gkd_rows(k=3)
    whole = get_objective("gkd", chunk_size=4096)(case.theta, case.batch)
    (whole_grad,) = torch.autograd.grad(whole.loss, case.theta)
    part = get_objective("gkd", chunk_size=chunk_size)(case.theta, case.batch)
    (part_grad,) = torch.autograd.grad(part.loss, case.theta)
    torch.testing.assert_close(part.token_loss, whole.token_loss, rtol=0, atol=1e-15)
    torch.testing.assert_close(part_grad, whole_grad, rtol=0, atol=1e-15)


@pytest.fixture(scope="module")
def trl_generalized_jsd():
    """TRL's reference implementation (an independent code base)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for module in ("trl.experimental.gkd", "trl"):
            try:
                return importlib.import_module(module).GKDTrainer.generalized_jsd_loss
            except (ImportError, AttributeError):
                continue
    pytest.skip("TRL (pip install trl) is the independent GKD reference; it is not importable")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_gkd_agrees_with_trl_generalized_jsd(trl_generalized_jsd, beta: float, dtype) -> None:
    gen = torch.Generator().manual_seed(7)
    rows, width, vocab = 3, 6, 40
    student = (3.0 * torch.randn(rows, width, vocab, generator=gen, dtype=torch.float64)).to(dtype)
    teacher = (3.0 * torch.randn(rows, width, vocab, generator=gen, dtype=torch.float64)).to(dtype)
    student.requires_grad_()
    top = torch.log_softmax(teacher, -1).topk(vocab, -1)
    origin = torch.full((rows, width), STUDENT)
    origin[:, 0] = PROMPT
    batch = TokenBatch(
        tokens=torch.zeros(rows, width, dtype=torch.long),
        origin=origin,
        teacher_topk_ids=top.indices,
        teacher_topk_logprobs=top.values,
    )
    out = get_objective("gkd", jsd_beta=beta)(student, batch)
    reference = trl_generalized_jsd(student, teacher, beta=beta, temperature=1.0, reduction="none")
    reference = reference.sum(-1)
    tolerance = 1e-12 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(
        out.token_loss[:, 1:], reference[:, 1:].detach(), rtol=tolerance, atol=tolerance
    )
    (grad,) = torch.autograd.grad(out.token_loss.sum(), student)
    (reference_grad,) = torch.autograd.grad(reference[:, 1:].sum(), student)
    torch.testing.assert_close(grad, reference_grad, rtol=tolerance, atol=tolerance)


class LiveTensorBytes(TorchDispatchMode):
    """Tracks the bytes of tensor storages created while active (freed when the last
    tensor using them dies), and their peak. Storages of `external` tensors don't count."""

    def __init__(self, external: list[torch.Tensor]):
        super().__init__()
        self.external = {t.untyped_storage().data_ptr() for t in external}
        self.live: dict[int, list[int]] = {}
        self.current = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in pytree.tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self._track(tensor)
        return out

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key == 0 or key in self.external:
            return
        if key in self.live:
            self.live[key][1] += 1
        else:
            self.live[key] = [storage.nbytes(), 1]
            self.current += storage.nbytes()
            self.peak = max(self.peak, self.current)
        weakref.finalize(tensor, self._release, key)

    def _release(self, key: int) -> None:
        entry = self.live.get(key)
        if entry is not None:
            entry[1] -= 1
            if entry[1] == 0:
                self.current -= entry[0]
                del self.live[key]


def gkd_peak_bytes(positions: int, vocab: int, chunk_size: int) -> int:
    """Peak bytes created by a GKD loss + backward on `positions` fp32 logits rows."""
    gen = torch.Generator().manual_seed(0)
    rows = 4
    width = positions // rows
    logits = torch.randn(rows, width, vocab, generator=gen).requires_grad_()
    top = torch.log_softmax(torch.randn(rows, width, vocab, generator=gen), -1).topk(8, -1)
    origin = torch.full((rows, width), STUDENT)
    origin[:, 0] = PROMPT
    batch = TokenBatch(
        tokens=torch.randint(0, vocab, (rows, width), generator=gen),
        origin=origin,
        sampler_logprobs=torch.zeros(rows, width),
        teacher_logprobs=torch.zeros(rows, width),
        teacher_topk_ids=top.indices,
        teacher_topk_logprobs=top.values,
    )
    external = [logits, *(v for v in vars(batch).values() if isinstance(v, torch.Tensor))]
    objective = get_objective("gkd", chunk_size=chunk_size)
    with LiveTensorBytes(external) as memory:
        objective(logits, batch).loss.backward()
    return memory.peak


def test_gkd_memory_is_one_chunk_beyond_the_logits_gradient() -> None:
    """Peak bytes at a fixed chunk size = the logits' own gradient `[N, V]` plus a few
    `[chunk, V]` fp32 temporaries, whatever N: sub-linear in the `[N, V]` size, where one
    unchunked pass needs several `[N, V]` temporaries."""
    chunk = 32
    extra = {}
    for positions in (128, 512):
        for vocab in (256, 1024):
            gradient = positions * vocab * 4
            extra[positions, vocab] = gkd_peak_bytes(positions, vocab, chunk) - gradient
            assert extra[positions, vocab] <= 6 * chunk * vocab * 4, (positions, vocab)
    for vocab in (256, 1024):  # independent of the number of positions
        assert extra[512, vocab] <= 1.05 * extra[128, vocab]
    unchunked = gkd_peak_bytes(512, 256, 512) - 512 * 256 * 4
    assert unchunked >= 2 * 512 * 256 * 4  # several [N, V] temporaries in one pass
    assert unchunked > 5 * extra[512, 256]


# --- SeqKD -----------------------------------------------------------------------------


def test_seqkd_is_nll_on_teacher_tokens_only() -> None:
    origin = [
        [PROMPT, TEACHER, TEACHER, STUDENT, PROMPT],
        [PROMPT, PROMPT, TEACHER, STUDENT, STUDENT],
    ]
    case = make_rows(origin, seed=4)
    objective = get_objective("seqkd")
    out = objective(case.theta, case.batch)
    teacher = case.batch.teacher_mask
    nll = -case.at_tokens(case.student_lp)
    torch.testing.assert_close(out.token_loss, torch.where(teacher, nll, 0.0), rtol=1e-12, atol=0)
    assert torch.equal(objective.trained_mask(case.batch), teacher)
    assert out.loss.item() == pytest.approx(nll[teacher].mean().item(), rel=1e-12)
    (grad,) = torch.autograd.grad(out.loss, case.theta)
    student = case.batch.student_mask
    assert grad[student].abs().sum() == 0 and grad[teacher].abs().sum() > 0


# --- TOP-D ------------------------------------------------------------------------------


def test_top_d_advantage_is_group_normalised_length_normalised_proximal_return() -> None:
    origin = [
        [PROMPT, STUDENT, STUDENT, STUDENT],
        [PROMPT, STUDENT, STUDENT, PROMPT],
        [PROMPT, STUDENT, STUDENT, STUDENT],
        [PROMPT, PROMPT, STUDENT, PROMPT],
    ]
    alpha = 0.1
    case = make_rows(origin, seed=6, group=torch.tensor([0, 0, 1, 1]))
    out = get_objective("top_d", alpha=alpha)(case.theta, case.batch)

    batch = case.batch
    advantage = {}
    for group in (0, 1):
        returns = {}
        for b in (2 * group, 2 * group + 1):
            positions = [t for t in range(4) if origin[b][t] == STUDENT]
            rewards = [
                math.log(
                    alpha * math.exp(batch.teacher_logprobs[b, t] - batch.sampler_logprobs[b, t])
                    + 1
                    - alpha
                )
                for t in positions
            ]
            for i, t in enumerate(positions):
                returns[b, t] = sum(rewards[i:]) / len(positions)
        values = list(returns.values())
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
        advantage.update({key: (v - mean) / (std + GROUP_EPS) for key, v in returns.items()})
    for (b, t), a in advantage.items():  # on-policy ratio 1: loss = -A
        assert out.token_loss[b, t].item() == pytest.approx(-a, rel=1e-9, abs=1e-12)
    assert len(advantage) == int(batch.student_mask.sum())


# --- TRB -------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_trb_loss_is_the_reverse_kl_under_any_behaviour_policy(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    theta = torch.randn(V, dtype=torch.float64, generator=gen).requires_grad_()
    teacher = 2.0 * torch.randn(V, dtype=torch.float64, generator=gen)
    behaviour = torch.randn(V, dtype=torch.float64, generator=gen)  # mu, not the student
    case = one_position(theta, teacher, behaviour)
    out = get_objective("trb")(case.logits, case.batch)
    loss = expected_loss(out.token_loss, case.q)
    (grad,) = torch.autograd.grad(loss, theta)
    reference = full_reverse_kl(theta, teacher)
    (reference_grad,) = torch.autograd.grad(reference, theta)
    assert loss.item() == pytest.approx(reference.item(), rel=1e-9)
    torch.testing.assert_close(grad, reference_grad, rtol=1e-7, atol=1e-10)


def test_trb_on_student_samples_is_opd(random_position) -> None:
    case = random_position
    trb = get_objective("trb")(case.logits, case.batch)
    opd = get_objective("opd")(case.logits, case.batch)
    # opd computes its reward in fp32, trb in the logits' dtype
    torch.testing.assert_close(trb.token_loss, opd.token_loss, rtol=1e-6, atol=1e-9)


# --- TA-OPD -----------------------------------------------------------------------------


def quantiles(values: list[float]) -> list[float]:
    return [sum(w <= v for w in values) / len(values) for v in values]


@pytest.mark.parametrize(("k", "student_top_k", "rho"), [(V, 2, 0.5), (V, 1, 0.3), (3, 2, 0.5)])
def test_ta_opd_selects_by_teachability(k: int, student_top_k: int, rho: float) -> None:
    rows = 8
    case = single_tokens(rows, k=k, seed=9, scales=[0.5, 1.0, 2.0, 0.3, 1.5, 3.0, 0.8, 1.2])
    objective = get_objective("ta_opd", rho=rho, student_top_k=student_top_k)
    out = objective(case.theta, case.batch)
    lp_s, lp_t = case.student_lp[:, 1], case.teacher_lp[:, 1]
    teacher_ids = case.batch.teacher_topk_ids[:, 1]
    compatibility, distance = [], []
    for b in range(rows):
        known = set(teacher_ids[b].tolist())  # pi_T is 0 outside the teacher's top-k
        student_top = lp_s[b].argsort(descending=True)[:student_top_k].tolist()
        compatibility.append(sum(lp_t[b, v].exp().item() for v in student_top if v in known))
        union = known | set(student_top)
        distance.append(
            sum(lp_t[b, v].exp() * (lp_t[b, v] - lp_s[b, v]) for v in union if v in known).item()
        )
    score = [d * c for d, c in zip(quantiles(distance), quantiles(compatibility), strict=True)]
    chosen = top_rows(score, rho)
    reward = case.batch.teacher_logprobs[:, 1] - case.batch.sampler_logprobs[:, 1]
    for b in range(rows):
        expected = -reward[b].item() if b in chosen else 0.0
        assert out.token_loss[b, 1].item() == pytest.approx(expected, abs=1e-12), b
    assert out.metrics["compatibility"] == pytest.approx(sum(compatibility) / rows, rel=1e-6)
    if k == V:  # no approximation: C_t is the teacher's mass on the student's top-K
        exact = [
            lp_t[b, lp_s[b].argsort(descending=True)[:student_top_k]].exp().sum().item()
            for b in range(rows)
        ]
        assert compatibility == pytest.approx(exact, rel=1e-12)


# --- GRPO and OPD + task reward ---------------------------------------------------------


def task_rows(rewards: list[float], group: list[int]) -> Rows:
    origin = [[PROMPT, STUDENT, STUDENT, PROMPT]] * len(rewards)
    return make_rows(
        origin,
        seed=8,
        reward=torch.tensor(rewards, dtype=torch.float64),
        group=torch.tensor(group),
    )


def group_advantages(rewards: list[float], group: list[int], scale: bool = True) -> list[float]:
    out = []
    for b, r in enumerate(rewards):
        members = [rewards[i] for i in range(len(rewards)) if group[i] == group[b]]
        mean = sum(members) / len(members)
        if not scale:
            out.append(r - mean)
            continue
        std = math.sqrt(sum((m - mean) ** 2 for m in members) / max(len(members) - 1, 1))
        out.append((r - mean) / (std + GROUP_EPS))
    return out


REWARDS_01 = [1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 1.0]
GROUPS = [0, 0, 0, 1, 1, 1, 2]  # the last group has a single rollout


@pytest.mark.parametrize("scale", [True, False])
def test_grpo_advantage_is_the_group_normalised_reward(scale: bool) -> None:
    case = task_rows(REWARDS_01, GROUPS)
    out = get_objective("grpo", scale_rewards=scale)(case.theta, case.batch)
    advantages = group_advantages(REWARDS_01, GROUPS, scale)
    for b, a in enumerate(advantages):  # ratio 1: every student token's loss is -A
        for t in (1, 2):
            assert out.token_loss[b, t].item() == pytest.approx(-a, abs=1e-12)
    for g in set(GROUPS):
        members = [a for a, gg in zip(advantages, GROUPS, strict=True) if gg == g]
        assert sum(members) == pytest.approx(0.0, abs=1e-12)
    per_row = -out.token_loss[:, 1]
    for g in set(GROUPS):
        assert per_row[torch.tensor(GROUPS) == g].sum().item() == pytest.approx(0.0, abs=1e-12)
    assert out.metrics["task_reward"] == pytest.approx(sum(REWARDS_01) / len(REWARDS_01))


@pytest.mark.parametrize("value", [0.0, 1.0, 0.37])
def test_grpo_constant_reward_gives_zero_gradient(value: float) -> None:
    case = task_rows([value] * 6, [0, 0, 0, 1, 1, 1])
    out = get_objective("grpo")(case.theta, case.batch)
    (grad,) = torch.autograd.grad(out.loss, case.theta)
    assert torch.equal(grad, torch.zeros_like(grad))


def test_grpo_needs_the_verifier_reward() -> None:
    case = task_rows([1.0, 0.0], [0, 0])
    with pytest.raises(ValueError, match=r"batch\.reward"):
        get_objective("grpo")(case.theta, case.batch.replace(reward=None))


@pytest.mark.parametrize("kl_coef", [1.0, 0.5])
def test_opd_task_advantage_adds_the_task_advantage_to_the_opd_reward(kl_coef: float) -> None:
    case = task_rows(REWARDS_01, GROUPS)
    out = get_objective("opd_task", kl_coef=kl_coef)(case.theta, case.batch)
    task = group_advantages(REWARDS_01, GROUPS)
    reward = case.batch.teacher_logprobs - case.batch.sampler_logprobs
    for b, a in enumerate(task):
        for t in (1, 2):
            expected = -(a + kl_coef * reward[b, t].item())
            assert out.token_loss[b, t].item() == pytest.approx(expected, rel=1e-9, abs=1e-12)
