"""Loading primitives: tiny configs, devices and dtypes."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from tropd.models import resolve_device, resolve_dtype, tiny_llama_config


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
