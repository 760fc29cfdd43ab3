"""The lean decoding step (`tropd.rollout.lean`) against the model's own forward: the same
logits, hidden states and KV cache to float32 rounding, on Llama and Qwen2 (biases,
grouped-query attention, left padding), with torch's and oneDNN's products and on a CUDA
device where there is one; and the models it must refuse."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_qwen2
from transformers import GPT2Config, GPT2LMHeadModel, LlamaForCausalLM

from tropd.kernels import decoding, onednn_available, use_onednn
from tropd.models import tiny_llama_config
from tropd.rollout import HFEngine, SamplingParams, lean
from tropd.rollout import engine as engine_module
from tropd.rollout.lean import LeanStepper, lean_supported, pad_after_prefix, shared_prefix

VOCAB = 48
# Log-probs of a few-layer float32 model: its activations carry rounding of ~1e-6 relative;
# a structural mistake (a wrong mask, rotary position or head grouping) moves them by O(1).
ATOL = 1e-4


def llama(seed: int = 0, kv_heads: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = tiny_llama_config(VOCAB, 32, 3, num_heads=4)
    config.num_key_value_heads = kv_heads
    return LlamaForCausalLM(config).eval()


def forced(stepper, tokens: torch.Tensor, attention: torch.Tensor, prefill: int):
    """Per-step logits of `stepper` fed `tokens` (prefill columns, then one at a time)."""
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    out = []
    with torch.no_grad(), decoding():
        for start, end in [(0, prefill), *((c, c + 1) for c in range(prefill, tokens.shape[1]))]:
            out.append(stepper(tokens[:, start:end], attention[:, :end], positions[:, start:end]))
    return torch.stack(out, 1)


MODELS = {"llama": llama, "llama_mha": lambda: llama(1, kv_heads=4), "qwen2": tiny_qwen2}


@pytest.mark.parametrize("products", ["torch", "onednn", "cuda"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_lean_step_matches_the_models_forward(name: str, products: str) -> None:
    if products == "onednn" and not onednn_available():
        pytest.skip("no oneDNN on this machine")
    if products == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    model = MODELS[name]()
    if products == "onednn":
        use_onednn(model)
    device = "cuda" if products == "cuda" else "cpu"
    model.to(device)
    assert lean_supported(model)
    torch.manual_seed(5)
    tokens = torch.randint(3, VOCAB, (3, 11), device=device)
    attention = torch.ones_like(tokens)
    attention[0, :3] = 0  # left padding of different widths
    attention[2, :1] = 0
    ours = LeanStepper(model, rows=3, columns=11)
    ours.hidden = []
    theirs = engine_module._Stepper(model, local=True)
    theirs.hidden = []
    a = forced(ours, tokens, attention, prefill=5)
    b = forced(theirs, tokens, attention, prefill=5)
    assert a.shape == b.shape == (3, 7, VOCAB)
    torch.testing.assert_close(a.log_softmax(-1), b.log_softmax(-1), rtol=0, atol=ATOL)
    torch.testing.assert_close(
        torch.stack(ours.hidden), torch.stack(theirs.hidden), rtol=0, atol=ATOL
    )
    # The KV cache it hands on (for scoring on top of it) holds what the model's would,
    # at the real columns (padding columns are never attended to).
    mine, model_cache = ours.cache, theirs.cache
    assert mine.get_seq_length() == model_cache.get_seq_length() == 11
    real = attention.bool()
    for i in range(len(model.model.layers)):
        for x, y in (
            (mine.layers[i].keys, model_cache.layers[i].keys),
            (mine.layers[i].values, model_cache.layers[i].values),
        ):
            torch.testing.assert_close(
                x.transpose(1, 2)[real], y.transpose(1, 2)[real], rtol=0, atol=ATOL
            )


def test_engine_decodes_with_the_lean_step_and_writes_the_same_tokens(monkeypatch) -> None:
    """Greedy generation through the engine: the lean step is what runs, and it writes
    the tokens the model's own forward writes, with log-probs equal to rounding."""
    model = tiny_qwen2(2)
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13, 14]]
    params = SamplingParams(9, temperature=0)
    built = []
    real = engine_module._stepper
    monkeypatch.setattr(engine_module, "_stepper", lambda *a: built.append(real(*a)) or built[-1])
    ours = HFEngine(model, 0, 1).generate(prompts, params)
    assert [type(s) for s in built] == [LeanStepper]
    monkeypatch.setattr(engine_module, "lean_supported", lambda model: False)
    theirs = HFEngine(model, 0, 1).generate(prompts, params)
    assert type(built[-1]) is engine_module._Stepper
    assert [g.tokens for g in ours] == [g.tokens for g in theirs]
    for g, h in zip(ours, theirs, strict=True):
        torch.testing.assert_close(
            torch.tensor(g.logprobs), torch.tensor(h.logprobs), rtol=0, atol=ATOL
        )


def test_refuses_other_architectures_and_adapters() -> None:
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2)).eval()
    assert not lean_supported(gpt2)
    from peft import LoraConfig, get_peft_model

    adapted = get_peft_model(llama(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert not lean_supported(adapted.base_model.model)


def test_refuses_sliding_window_layers() -> None:
    model = tiny_qwen2(use_sliding_window=True, sliding_window=4, max_window_layers=0)
    assert set(model.config.layer_types) == {"sliding_attention"}
    assert not lean_supported(model)


def test_refuses_a_model_whose_forward_differs_from_its_structure() -> None:
    """A change the structural check cannot see (here a hook scaling one layer's output)
    fails the check decoding, and the model keeps its own forward."""
    model = llama(4)
    assert lean._structure_fits(model)
    changed = copy.deepcopy(model)
    changed.model.layers[1].register_forward_hook(lambda module, args, out: out * 1.5)
    assert lean._structure_fits(changed) and not lean_supported(changed)


def test_shared_prefix_is_what_every_prompt_starts_with() -> None:
    assert shared_prefix([[1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 7, 8], [1, 2, 3, 4, 5]]) == 4
    assert shared_prefix([[1, 2, 3, 4, 5, 6, 9]] * 3) == 6  # one short of the prompt
    assert shared_prefix([[1, 2, 3, 9, 5], [1, 2, 3, 4, 5]]) == 0  # under MIN_SHARED_COLUMNS
    assert shared_prefix([[1, 2, 3, 4, 5, 6]]) == 0  # one prompt
    tokens, mask = pad_after_prefix([[7, 7, 7, 1], [7, 7, 7, 2, 3, 4]], 3, 0)
    assert tokens.tolist() == [[7, 7, 7, 0, 0, 1], [7, 7, 7, 2, 3, 4]]
    assert mask.tolist() == [[1, 1, 1, 0, 0, 1], [1, 1, 1, 1, 1, 1]]


HEAD = [9, 10, 11, 12, 13, 14]
SHARING = {
    # a prefix all prompts share (run once, padding after it), and a repeated prompt
    "prefix": [[*HEAD, 5, 6, 7], [*HEAD, 8], [*HEAD, 20, 21, 22, 23, 24], [*HEAD, 5, 6, 7]],
    # repeated prompts only (samples of one prompt: each distinct prompt run once)
    "repeats": [[5, 6, 7], [30, 8], [5, 6, 7], [5, 6, 7], [30, 8]],
}


@pytest.mark.parametrize("sharing", sorted(SHARING))
@pytest.mark.parametrize("name", sorted(MODELS))
def test_prompts_sharing_tokens_decode_as_without_sharing(
    name: str, sharing: str, monkeypatch
) -> None:
    """Prompts that share their first tokens or repeat give the tokens and log-probs of
    the model's own forward over every left-padded prompt."""
    model = MODELS[name]()
    use_onednn(model)
    prompts = SHARING[sharing]
    params = SamplingParams(8, temperature=0)
    built = []
    real = engine_module._stepper
    monkeypatch.setattr(engine_module, "_stepper", lambda *a: built.append(real(*a)) or built[-1])
    ours = HFEngine(model, 0, 1).generate(prompts, params)
    assert built[-1].shared == (len(HEAD) if sharing == "prefix" else 0)
    monkeypatch.setattr(engine_module, "lean_supported", lambda model: False)
    theirs = HFEngine(model, 0, 1).generate(prompts, params)
    assert [g.tokens for g in ours] == [g.tokens for g in theirs]
    assert ours[0].tokens == ours[3].tokens  # the same prompt, greedy
    for g, h in zip(ours, theirs, strict=True):
        torch.testing.assert_close(
            torch.tensor(g.logprobs), torch.tensor(h.logprobs), rtol=0, atol=ATOL
        )
