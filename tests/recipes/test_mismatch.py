"""The chain teacher/student recipes: style mixing, recipes per mismatch, divergence."""

import pytest
import torch
from transformers import LlamaForCausalLM

from tropd.models import tiny_llama_config
from tropd.recipes.mismatch import MISMATCH, StyleMix, measure_mismatch, student_recipe
from tropd.tasks.reasoning import ChainTask, parse_steps
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
    for mismatch, (style, share, steps) in MISMATCH.items():
        recipe = student_recipe(mismatch)
        assert (recipe.style, recipe.teacher_style_share, recipe.steps) == (style, share, steps)
    with pytest.raises(ValueError, match="mismatch"):
        student_recipe("huge")


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
