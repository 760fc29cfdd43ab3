"""`tropd eval`: pass@k against the closed form, confidence intervals, outputs, CLI."""

from __future__ import annotations

import json
import math
from math import comb

import pytest

from tropd.cli import main
from tropd.model_names import load_eval_model
from tropd.task_eval import (
    EvalSettings,
    evaluate_on_task,
    mean_with_ci,
    pass_at_k,
    score_responses,
)
from tropd.tasks import get_task


@pytest.mark.parametrize(
    ("n", "c", "k"),
    [(1, 0, 1), (1, 1, 1), (10, 3, 1), (10, 3, 5), (10, 8, 3), (20, 0, 7), (5, 5, 5)],
)
def test_pass_at_k_matches_the_closed_form(n, c, k):
    assert pass_at_k(n, c, k) == pytest.approx(1 - comb(n - c, k) / comb(n, k), abs=1e-12)


def test_pass_at_k_special_cases_and_errors():
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(4, 2, 3) == 1.0  # fewer wrong samples than k: some pick is right
    with pytest.raises(ValueError, match="pass@k"):
        pass_at_k(3, 4, 1)
    with pytest.raises(ValueError, match="pass@k"):
        pass_at_k(3, 1, 4)


def test_mean_with_ci():
    mean, low, high = mean_with_ci([0.0, 1.0, 0.0, 1.0])
    # sample standard deviation of [0, 1, 0, 1]: sqrt(1/3); a few float64 operations
    assert mean == 0.5 and low == pytest.approx(0.5 - 1.96 * math.sqrt(1 / 3) / 2, rel=1e-12)
    assert high == pytest.approx(1 - low)
    assert mean_with_ci([0.7]) == (0.7, 0.7, 0.7)


def test_score_responses_uses_the_task_verifier():
    task = get_task("add")
    items = task.items("eval", 3, 0)
    responses = [items[0].answer, "x", items[2].answer + " "]
    assert score_responses(task, items, responses) == [1.0, 0.0, 1.0]


def test_evaluate_on_task_writes_per_item_results(tiny_pair, tmp_path):
    teacher, _ = tiny_pair
    model, tokenizer, config = load_eval_model(teacher, "float32", "cpu")
    assert config is None
    settings = EvalSettings(samples=4, temperature=1.0, max_new_tokens=4, num_items=5, ks=(1, 2))
    summary = evaluate_on_task(
        model, tokenizer, get_task("add"), settings, tmp_path / "out", progress=False
    )
    rows = [
        json.loads(line)
        for line in (tmp_path / "out" / "results.jsonl").read_text().split("\n")
        if line
    ]
    assert len(rows) == 5 and all(len(r["responses"]) == 4 for r in rows)
    for row in rows:
        assert row["pass@2"] == pytest.approx(pass_at_k(4, row["correct"], 2))
    assert summary["pass@1"] == pytest.approx(sum(r["correct"] for r in rows) / 20)
    assert summary["ci95"][0] <= summary["mean"] <= summary["ci95"][1]
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["items"] == 5
    again = evaluate_on_task(model, tokenizer, get_task("add"), settings, progress=False)
    assert again["mean"] == summary["mean"]  # seeded sampling


def test_eval_cli_on_a_run_directory_and_a_checkpoint(tiny_pair, tmp_path):
    from tropd.config import load_config
    from tropd.train import loop

    teacher, student = tiny_pair
    config = load_config(
        None,
        [
            f"model.teacher={teacher}",
            f"model.student={student}",
            f"run.output_dir={tmp_path / 'run'}",
            "run.progress=false",
            "run.steps=1",
            "rollout.prompts_per_step=2",
            "rollout.samples_per_prompt=2",
            "rollout.max_new_tokens=4",
            "teacher.top_k=4",
            "eval.every=0",
            "objective.name=opd",
        ],
    )
    run_dir = loop.train(config)
    common = ["--num-items", "3", "--max-new-tokens", "4"]
    assert main(["eval", str(run_dir), "--out", str(tmp_path / "e1"), *common]) == 0
    checkpoint = next((run_dir / "checkpoints").iterdir())
    assert main(["eval", str(checkpoint), "--out", str(tmp_path / "e2"), *common]) == 0
    first = json.loads((tmp_path / "e1" / "summary.json").read_text())
    second = json.loads((tmp_path / "e2" / "summary.json").read_text())
    assert first["task"] == "add" and first["mean"] == second["mean"]
    assert main(["eval", teacher, *common]) == 2  # no task: one-line usage error
    assert main(["eval", teacher, "--task", "add", "--samples", "2", "--k", "3", *common]) == 2
