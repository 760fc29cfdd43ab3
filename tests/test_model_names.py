"""Model names: hub ids and folders, built-in names (built only when loaded), errors."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from tropd import model_names
from tropd.model_names import load_model, load_tokenizer, read_vocab_size, resolve_model_path
from tropd.models import tiny_llama_config
from tropd.tasks.tokenizer import build_char_tokenizer

ALPHABET = "0123456789+="


@pytest.fixture
def tiny_dir(tmp_path):
    """A saved random tiny Llama with its character tokenizer."""
    tokenizer = build_char_tokenizer(ALPHABET)
    torch.manual_seed(0)
    config = tiny_llama_config(len(tokenizer), hidden_size=16, num_layers=1, num_heads=2)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    return tmp_path


def test_read_vocab_size_needs_only_the_config(tmp_path):
    tiny_llama_config(37, hidden_size=16, num_layers=1, num_heads=2).save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]
    assert read_vocab_size(str(tmp_path)) == 37


def test_read_vocab_size_of_a_builtin_builds_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("TROPD_CACHE", str(tmp_path / "cache"))
    assert read_vocab_size("builtin:add:teacher") == 4 + len(ALPHABET)
    assert not (tmp_path / "cache").exists()


def test_read_vocab_size_of_a_missing_model_is_one_clear_error(tmp_path):
    with pytest.raises(ValueError, match="cannot read the config"):
        read_vocab_size(str(tmp_path / "missing"))


def test_load_model_from_a_saved_directory(tiny_dir):
    saved = AutoModelForCausalLM.from_pretrained(tiny_dir).state_dict()
    model = load_model(str(tiny_dir), dtype="float32", device="cpu")
    assert model.dtype is torch.float32 and model.device.type == "cpu"
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, saved[name])
    assert load_model(str(tiny_dir), dtype="bfloat16", device="cpu").dtype is torch.bfloat16


def test_load_model_of_a_missing_path_is_one_clear_error(tmp_path):
    with pytest.raises(ValueError, match="cannot load model"):
        load_model(str(tmp_path / "missing"), device="cpu")


def test_load_tokenizer_pads_left(tiny_dir):
    tokenizer = load_tokenizer(str(tiny_dir))
    assert tokenizer.padding_side == "left"
    assert tokenizer.pad_token_id == 0


def test_load_tokenizer_falls_back_to_eos_for_padding(tiny_dir):
    config_path = tiny_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    del config["pad_token"]
    config["padding_side"] = "right"
    config_path.write_text(json.dumps(config))
    tokenizer = load_tokenizer(str(tiny_dir))
    assert tokenizer.pad_token == tokenizer.eos_token == "<eos>"
    assert tokenizer.padding_side == "left"


def test_resolve_model_path_passes_other_names_through():
    assert resolve_model_path("Qwen/Qwen3-0.6B") == "Qwen/Qwen3-0.6B"
    assert resolve_model_path("/some/local/dir") == "/some/local/dir"


def test_resolve_model_path_builds_builtins(tmp_path, monkeypatch):
    calls = []

    def fake_prepare(task_name, role, cache_dir=None):
        calls.append((task_name, role, cache_dir))
        return tmp_path / f"{task_name}-{role}"

    monkeypatch.setattr(model_names, "prepare_builtin", fake_prepare)
    assert resolve_model_path("builtin:reverse:student", tmp_path) == str(
        tmp_path / "reverse-student"
    )
    assert calls == [("reverse", "student", tmp_path)]


@pytest.mark.parametrize("name", ["builtin:mul:teacher", "builtin:add:coach", "builtin:add"])
def test_bad_builtin_names_list_the_valid_parts(name):
    with pytest.raises(ValueError, match=r"add, copy, reverse.*teacher, student"):
        resolve_model_path(name)
    with pytest.raises(ValueError, match="builtin:<task>:<role>"):
        read_vocab_size(name)
