"""`tropd demo` end to end on tiny models and a two-step budget: outputs exist and are
well-formed. (The scientific comparison lives in bench/claim.py, not in tests.)"""

from __future__ import annotations

import json

import pytest

from tropd import cli
from tropd.recipes import mismatch
from tropd.recipes.mismatch import ChainRecipe

TINY = {
    "hidden_size": 16,
    "num_layers": 1,
    "num_heads": 2,
    "steps": 4,
    "batch_size": 8,
    "warmup_steps": 1,
    "eval_items": 8,
}


@pytest.fixture
def tiny_recipes(monkeypatch, tmp_path):
    monkeypatch.setenv("TROPD_CACHE", str(tmp_path / "cache"))
    teacher = ChainRecipe(mismatch.TEACHER_STYLE, 0.0, **TINY)
    monkeypatch.setattr(mismatch, "TEACHER_RECIPE", teacher)
    monkeypatch.setattr(mismatch, "student_recipe", lambda m: ChainRecipe("backward", 0.2, **TINY))
    return tmp_path


def test_quick_demo_writes_runs_summary_and_plots(tiny_recipes, capsys):
    out = tiny_recipes / "demo"
    assert cli.main(["demo", "--quick", "--steps", "2", "--out", str(out)]) == 0

    summary = json.loads((out / "summary.json").read_text())
    methods = {"opd", "fkl_outlier", "tropd"}
    assert set(summary["cells"]) == {"none", "strong"}
    for cell, c in summary["cells"].items():
        assert set(c["results"]) == methods and 0 <= c["teacher_accuracy"] <= 1
        divergence = c["divergence_at_start"]
        assert 0 <= divergence["outlier_fraction"] <= 1 and divergence["reverse_kl_k1"] > -1e-6
        for method, result in c["results"].items():
            assert 0 <= result["accuracy_before"] <= 1 and 0 <= result["accuracy_after"] <= 1
            assert result["reverse_kl_after"] >= 0 and result["skipped_steps"] == 0
            assert 0 < result["trust_probability_first"] <= 1
            records = [json.loads(line) for line in (out / cell / method / "metrics.jsonl").open()]
            assert [r["step"] for r in records] == [0, 1, 2]
            assert (out / cell / method / "final" / "config.json").is_file()
        assert c["results"]["opd"]["outlier_fraction_mean"] is None
        assert 0 <= c["results"]["tropd"]["outlier_fraction_mean"] <= 1
        for name in ("curves", "accuracy", "reverse_kl", "trust", "prefix_cap"):
            assert (out / "plots" / cell / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    table = capsys.readouterr().err
    assert "strong" in table and "fkl_outlier" in table and "teacher" in table

    # the models are cached: a second demo builds nothing and refuses a used folder
    assert len(list((tiny_recipes / "cache").iterdir())) == 2
    assert cli.main(["demo", "--quick", "--out", str(out)]) == 2


def test_demo_rejects_unknown_cells(tiny_recipes):
    assert cli.main(["demo", "--cells", "none,huge", "--out", str(tiny_recipes / "x")]) == 2


def test_demo_rejects_unknown_methods(tiny_recipes):
    assert cli.main(["demo", "--methods", "opd,nope", "--out", str(tiny_recipes / "x")]) == 2
