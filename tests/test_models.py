import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from tropd.models import (
    load_model,
    load_tokenizer,
    read_vocab_size,
    resolve_device,
    resolve_dtype,
    resolve_model_path,
    tiny_llama_config,
)
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


def test_tiny_config_builds_a_model():
    config = tiny_llama_config(20, hidden_size=32, num_layers=2, num_heads=4, eos_token_id=5)
    assert config.intermediate_size == 128
    assert (config.pad_token_id, config.bos_token_id, config.eos_token_id) == (0, 1, 5)
    model = AutoModelForCausalLM.from_config(config)
    assert model.config.tie_word_embeddings
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert len(model.model.layers) == 2
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, 20)


def test_tiny_config_rejects_heads_that_do_not_divide_hidden():
    with pytest.raises(ValueError, match="multiple of num_heads"):
        tiny_llama_config(20, hidden_size=30, num_layers=1, num_heads=4)


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


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("gpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_resolve_device_cuda_without_cuda_is_an_error():
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_device("cuda")


def test_resolve_dtype():
    assert resolve_dtype("float32") is torch.float32
    assert resolve_dtype("bf16") is torch.bfloat16
    assert resolve_dtype("float16") is torch.float16
    assert resolve_dtype("auto", torch.device("cpu")) is torch.float32
    with pytest.raises(ValueError, match="unknown dtype 'int8'"):
        resolve_dtype("int8")


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
    from tropd.recipes import builtin as recipes

    calls = []

    def fake_prepare(task_name, role, cache_dir=None):
        calls.append((task_name, role, cache_dir))
        return tmp_path / f"{task_name}-{role}"

    monkeypatch.setattr(recipes, "prepare_builtin", fake_prepare)
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
