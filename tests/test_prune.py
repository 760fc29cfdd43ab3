"""Layer-pruned students: all layers kept is the teacher exactly; a subset is a working,
saveable model with the chosen layers."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from tropd.cli import main
from tropd.compress import parse_layers, prune_layers
from tropd.model_names import load_model, load_tokenizer, read_vocab_size
from tropd.models import tiny_llama_config

TOKENS = torch.randint(0, 16, (2, 9), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config(16, 32, 4, num_heads=2)).eval()


def test_keeping_every_layer_gives_the_teacher_exactly(teacher):
    student = prune_layers(teacher, [0, 1, 2, 3])
    with torch.no_grad():
        assert torch.equal(student(TOKENS).logits, teacher(TOKENS).logits)
    assert student is not teacher


def test_a_subset_keeps_those_layers_and_leaves_the_teacher_alone(teacher):
    student = prune_layers(teacher, [0, 3])
    assert student.config.num_hidden_layers == 2 and teacher.config.num_hidden_layers == 4
    assert len(teacher.model.layers) == 4
    kept = student.model.layers
    assert torch.equal(kept[1].mlp.up_proj.weight, teacher.model.layers[3].mlp.up_proj.weight)
    assert [block.self_attn.layer_idx for block in kept] == [0, 1]
    # The KV cache indexes layers by layer_idx: cached generation must match a full forward.
    with torch.no_grad():
        out = student.generate(TOKENS, max_new_tokens=4, do_sample=False)
        step_by_step = student(out[:, :-1]).logits[:, -1].argmax(-1)
    assert torch.equal(step_by_step, out[:, -1])


def test_bad_layer_lists_are_one_line_errors(teacher):
    assert parse_layers("0-2,5") == [0, 1, 2, 5]
    for text in ("", "a,b", "1-x"):
        with pytest.raises(ValueError, match="layer list"):
            parse_layers(text)
    with pytest.raises(ValueError, match=r"distinct indices in 0..3"):
        prune_layers(teacher, [0, 4])
    with pytest.raises(ValueError, match="distinct"):
        prune_layers(teacher, [1, 1])


def test_prune_cli_and_model_name_agree(tiny_pair, tmp_path):
    teacher_dir, _ = tiny_pair
    out = tmp_path / "student"
    assert main(["prune", teacher_dir, "--layers", "1", "--out", str(out)]) == 0
    saved = AutoModelForCausalLM.from_pretrained(out).eval()
    built = load_model(f"prune:{teacher_dir}:1", dtype="float32", device="cpu").eval()
    assert saved.config.num_hidden_layers == 1
    with torch.no_grad():
        assert torch.equal(saved(TOKENS % 10).logits, built(TOKENS % 10).logits)
    assert read_vocab_size(f"prune:{teacher_dir}:1") == read_vocab_size(teacher_dir)
    assert len(load_tokenizer(str(out))) == len(load_tokenizer(f"prune:{teacher_dir}:1"))
    assert main(["prune", teacher_dir, "--layers", "7", "--out", str(tmp_path / "x")]) == 2
