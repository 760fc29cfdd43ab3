"""Registry contract (DESIGN "Public contracts", SPEC §2.3) and the §2.7 metrics."""

from __future__ import annotations

import pytest
import torch

from tropd.objectives import get_objective, list_objectives

from .enumeration import V, full_forward_kl, one_position

REQUIRED = {"opd", "tropd", "fkl_outlier", "mask_outlier", "clip_outlier", "topk_fkl"}
TROPD_FAMILY = ["tropd", "fkl_outlier", "mask_outlier", "clip_outlier"]


def test_list_objectives_names_every_method() -> None:
    names = list_objectives()
    assert set(names) >= REQUIRED
    assert names == sorted(set(names))
    for name in names:
        assert callable(get_objective(name))


def test_unknown_name_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError) as error:
        get_objective("tropdd")
    message = str(error.value)
    assert "tropdd" in message and "\n" not in message
    for name in REQUIRED:
        assert name in message


def test_unknown_option_names_the_key_and_the_valid_ones() -> None:
    with pytest.raises(ValueError) as error:
        get_objective("tropd", trust_gates="soft")
    message = str(error.value)
    assert "trust_gates" in message
    for key in ["trust_gate", "outlier", "tau", "beta", "logprob_floor", "ppo_clip", "loss_agg"]:
        assert key in message


def test_option_from_another_method_is_unknown() -> None:
    with pytest.raises(ValueError, match="gamma"):
        get_objective("tropd", gamma=0.5)
    with pytest.raises(ValueError, match="beta"):
        get_objective("opd", beta=0.1)


@pytest.mark.parametrize("name", TROPD_FAMILY)
@pytest.mark.parametrize(
    ("key", "value", "must_name"),
    [
        ("beta", 2, ["beta"]),
        ("beta", -0.1, ["beta"]),
        ("trust_gate", "x", ["trust_gate", "hard", "soft", "threshold"]),
        ("outlier", "x", ["outlier", "fkl", "mask", "clip"]),
        ("loss_agg", "x", ["loss_agg", "token_mean", "seq_mean_token_mean", "seq_sum"]),
        ("logprob_floor", 1, ["logprob_floor"]),
        ("ppo_clip", 1.5, ["ppo_clip"]),
        ("tau", 0.5, ["tau"]),
        ("beta", "big", ["beta"]),
    ],
)
def test_bad_value_is_one_clear_line(name, key, value, must_name) -> None:
    with pytest.raises(ValueError) as error:
        get_objective(name, **{key: value})
    message = str(error.value)
    assert "\n" not in message
    for word in must_name:
        assert word in message


@pytest.mark.parametrize("name", ["opd", "topk_fkl"])
def test_loss_agg_is_validated_for_every_method(name) -> None:
    with pytest.raises(ValueError, match="seq_mean_token_mean"):
        get_objective(name, loss_agg="mean")


def test_options_resolve_over_defaults() -> None:
    objective = get_objective("tropd", beta=0.5, trust_gate="soft")
    assert objective.options["beta"] == 0.5
    assert objective.options["trust_gate"] == "soft"
    assert objective.options["outlier"] == "fkl"
    assert objective.options["beta"] != get_objective("tropd").options["beta"]
    # beta is relative to the on-policy mean (guidance_norm separate); see README Results
    assert get_objective("tropd").options["beta"] == 1.0
    assert get_objective("tropd").options["guidance_norm"] == "separate"
    assert get_objective("tropd").options["logprob_floor"] == -30.0
    assert get_objective("tropd").options["ppo_clip"] is None


SECTION_2_7 = {
    "trust_fraction",
    "outlier_fraction",
    "reward_mean",
    "student_entropy",
    "fkl_outlier",
    "floor_fraction",
    "teacher_topk_mass",
}


@pytest.fixture
def metric_case():
    theta = torch.tensor([0.8, 0.7, -0.2, -0.4, -0.9], dtype=torch.float64).requires_grad_()
    teacher = torch.tensor([-1.0, 0.5, 2.0, -2.0, 0.0], dtype=torch.float64)
    sampler = torch.tensor([1.0, 0.5, 0.0, -0.5, -1.0], dtype=torch.float64)
    mask = torch.tensor(
        [[False, True], [False, False], [False, True], [False, False], [False, True]]
    )
    return one_position(theta, teacher, sampler, k=3, trust_mask=mask)


def test_tropd_reports_the_section_2_7_metrics(metric_case) -> None:
    out = get_objective("tropd")(metric_case.logits, metric_case.batch)
    assert set(out.metrics) >= SECTION_2_7
    assert all(type(v) is float for v in out.metrics.values())
    assert out.metrics["trust_fraction"] + out.metrics["outlier_fraction"] == pytest.approx(1.0)

    lpt, lq = metric_case.teacher_logprobs, torch.log_softmax(metric_case.sampler_logits, -1)
    assert out.metrics["reward_mean"] == pytest.approx(float((lpt - lq).mean()), rel=1e-5)
    p = torch.softmax(metric_case.theta.detach(), -1)
    entropy = -(p * p.log()).sum()
    assert out.metrics["student_entropy"] == pytest.approx(float(entropy), rel=1e-5)
    top3 = lpt.exp().sort(descending=True).values[:3].sum()
    assert out.metrics["teacher_topk_mass"] == pytest.approx(float(top3), rel=1e-5)
    assert out.metrics["trust_fraction"] == pytest.approx(3 / 5)
    # every outlier row sees the same position, so the mean FKL on outliers is that value
    ids = lpt.argsort(descending=True)[:3]
    fkl = (lpt[ids].exp() * (lpt[ids] - torch.log(p[ids]))).sum()
    assert out.metrics["fkl_outlier"] == pytest.approx(float(fkl), rel=1e-5)
    assert out.metrics["floor_fraction"] == 0.0


@pytest.mark.parametrize("gate", ["hard", "soft", "threshold"])
@pytest.mark.parametrize("outlier", ["fkl", "mask", "clip"])
def test_trust_and_outlier_fractions_sum_to_one(metric_case, gate, outlier) -> None:
    batch = metric_case.batch.replace(trust_mask=None)
    out = get_objective("tropd", trust_gate=gate, outlier=outlier)(
        metric_case.logits, batch, generator=torch.Generator().manual_seed(0)
    )
    assert out.metrics["trust_fraction"] + out.metrics["outlier_fraction"] == pytest.approx(1.0)
    assert 0.0 <= out.metrics["trust_fraction"] <= 1.0
    assert {"reward_mean", "student_entropy", "teacher_topk_mass"} <= set(out.metrics)


def test_floor_fraction_counts_outlier_tokens_hitting_the_floor() -> None:
    theta = torch.tensor([2.0, 1.0, 0.0, -60.0, -1.0], dtype=torch.float64).requires_grad_()
    teacher = torch.tensor([1.0, 0.5, 0.0, 0.8, -3.0], dtype=torch.float64)
    outliers = torch.zeros(V, 2, dtype=torch.bool)
    case = one_position(theta, teacher, torch.zeros(V), trust_mask=outliers)  # k = V
    out = get_objective("tropd", logprob_floor=-30.0)(case.logits, case.batch)
    assert out.metrics["floor_fraction"] == pytest.approx(1 / V)  # 1 of the V ids, every token
    expected = full_forward_kl(theta.detach(), teacher)  # the clamped term is excluded...
    lp_s = torch.log_softmax(theta.detach(), -1)
    lp_t = torch.log_softmax(teacher, -1)
    expected = expected + lp_t[3].exp() * (lp_s[3] - -30.0)  # ...and replaced by lpT - floor
    assert out.metrics["fkl_outlier"] == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.parametrize("name", ["opd", "topk_fkl"])
def test_other_methods_report_what_they_can(metric_case, name) -> None:
    out = get_objective(name)(metric_case.logits, metric_case.batch)
    assert {"reward_mean", "student_entropy", "teacher_topk_mass"} <= set(out.metrics)
    assert all(type(v) is float for v in out.metrics.values())
    if name == "topk_fkl":
        assert "floor_fraction" in out.metrics
