"""The chain teacher/student recipes: style mixing, recipes per mismatch, divergence."""

import pytest
import torch
from transformers import LlamaForCausalLM

from tropd.models import tiny_llama_config
from tropd.recipes.mismatch import (
    MISMATCH,
    STUDENT_SLIP,
    TEACHER_RECIPE,
    Slip,
    StyleMix,
    _set_fields,
    cell_task,
    measure_mismatch,
    slipped_steps,
    student_recipe,
)
from tropd.tasks.reasoning import ChainTask, parse_steps, write_chain
from tropd.tasks.tokenizer import build_char_tokenizer


def test_style_mix_writes_the_teacher_style_only_above_the_threshold():
    mix = StyleMix(ChainTask(style="backward"), "forward", share=0.2)
    for item in mix.items("train", 300, 0):
        start = parse_steps(item.prompt)[0][0]
        expected = "forward" if start >= 80 else "backward"
        assert mix.gold_response(item) == ChainTask(style=expected).gold_response(item)
    assert all(
        StyleMix(ChainTask(style="backward"), "forward", 1.0).gold_response(i)
        == ChainTask().gold_response(i)
        for i in mix.items("eval", 20, 0)
    )


def test_student_recipes_follow_the_mismatch_table():
    for mismatch, fields in MISMATCH.items():
        recipe = student_recipe(mismatch)
        assert {k: getattr(recipe, k) for k in fields} == fields
        assert recipe.slip == STUDENT_SLIP and recipe.steps == 1500
    assert cell_task("multi").domains == "+-" and cell_task("strong") == ChainTask()
    with pytest.raises(ValueError, match="mismatch"):
        student_recipe("huge")


def test_models_built_before_the_slip_keep_their_cache_keys():
    # Unset optional fields stay out of the hashed spec, so the teacher (and any model
    # built before slips and domains existed) is found in the cache under its old key.
    assert set(_set_fields(TEACHER_RECIPE)) == {
        f for f in TEACHER_RECIPE.__dataclass_fields__ if f not in ("slip", "own_style_domain")
    }
    assert "domains" not in _set_fields(ChainTask())
    assert _set_fields(ChainTask(domains="+-"))["domains"] == "+-"


def test_a_slip_drops_carries_and_borrows_on_large_operands():
    always = Slip(min_operand=7, rate=1.0)
    # 47+8: carry dropped (45, not 55); the chain goes on from 45: 45-7 borrows, dropped
    # (48, not 38); 48+2: operand below 7, right.
    assert slipped_steps(parse_steps("47+8-7+2="), always, "k") == [
        (47, "+", 8, 45),
        (45, "-", 7, 48),
        (48, "+", 2, 50),
    ]
    # no carry or borrow to drop: unchanged
    assert slipped_steps(parse_steps("41+8-7="), always, "k") == parse_steps("41+8-7=")
    assert slipped_steps(parse_steps("47+8="), Slip(rate=0.0), "k") == parse_steps("47+8=")


def test_slip_rate_is_the_share_of_slip_prone_steps_that_slip():
    slip, prone, slipped = Slip(min_operand=7, rate=0.7), 0, 0
    for item in ChainTask().items("train", 2000, 0):
        gold = parse_steps(item.prompt)
        wrong = slipped_steps(gold, slip, item.prompt)
        # the first step starts from the prompt's value: it is prone iff it carries/borrows
        a, op, b, _ = gold[0]
        if b >= 7 and ((op == "+" and a % 10 + b >= 10) or (op == "-" and a % 10 < b)):
            prone += 1
            slipped += wrong[0][3] != gold[0][3]
        else:
            assert wrong[0] == gold[0]
        assert slipped_steps(gold, slip, item.prompt) == wrong  # fixed by the prompt
    # binomial: std of the share is sqrt(0.7 * 0.3 / n) < 0.03 for n > 250; allow 4 std
    assert prone > 250
    assert abs(slipped / prone - 0.7) < 4 * (0.21 / prone) ** 0.5


def test_style_mix_by_domain_writes_only_the_own_domain_in_the_own_style():
    task = ChainTask(style="backward", domains="+-")
    mix = StyleMix(task, "forward", 0.0, own_style_domain="sub")
    items = task.items("train", 100, 0)
    assert {i.meta["domain"] for i in items} == {"add", "sub"}
    for item in items:
        style = "backward" if item.meta["domain"] == "sub" else "forward"
        assert mix.gold_response(item) == write_chain(parse_steps(item.prompt), style)


def test_measure_mismatch_is_zero_for_identical_models_and_positive_otherwise():
    task = ChainTask(max_steps=2)
    tokenizer = build_char_tokenizer(task.alphabet)
    torch.manual_seed(0)
    config = tiny_llama_config(len(tokenizer), 16, 1, 2)
    model = LlamaForCausalLM(config).eval()
    other = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        other.get_output_embeddings().weight.mul_(5.0)
    same = measure_mismatch(model, model, tokenizer, task, num_prompts=4, max_new_tokens=8)
    assert same["reverse_kl_k1"] == pytest.approx(0.0, abs=1e-4)
    assert same["outlier_fraction"] == pytest.approx(0.0, abs=1e-4)
    apart = measure_mismatch(other, model, tokenizer, task, num_prompts=4, max_new_tokens=8)
    assert apart["reverse_kl_k1"] > 0.1 and 0 < apart["outlier_fraction"] < 1
    assert 0 <= apart["near_zero_fraction"] <= 1 and 0 <= apart["student_accuracy"] <= 1
    for share in ("outlier_share_opening", "outlier_share_digits", "digit_token_share"):
        assert 0 <= apart[share] <= 1 + 1e-6, share
