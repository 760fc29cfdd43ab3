"""`LeanDecoder` computes what the model's own forward computes: final hidden states at
every decoding step, for Llama and Qwen2 (biased projections, grouped-query attention),
with left-padded prompts; and the engine uses it only where `supports` says so."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from tropd.head import hidden_only
from tropd.rollout import HFEngine, SamplingParams
from tropd.rollout.engine import _Stepper
from tropd.rollout.lean import LeanDecoder

SMALL = {
    "vocab_size": 97,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}


def _model(kind: str):
    torch.manual_seed(0)
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(**SMALL)).eval()
    return Qwen2ForCausalLM(Qwen2Config(**SMALL)).eval()


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_steps_match_the_models_forward(kind: str) -> None:
    model = _model(kind)
    assert LeanDecoder.supports(model)
    rows, width, steps = 3, 6, 5
    prompts = torch.randint(0, 97, (rows, width))
    mask = torch.ones(rows, width, dtype=torch.long)
    mask[0, :3] = 0  # left padding
    mask[2, :1] = 0
    new = torch.randint(0, 97, (rows, steps))
    tokens = torch.cat([prompts, new], 1)
    full_mask = torch.cat([mask, torch.ones(rows, steps, dtype=torch.long)], 1)
    positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = hidden_only(
            model, input_ids=tokens, attention_mask=full_mask, position_ids=positions
        ).hidden_states[-1]
        lean = LeanDecoder(model, rows, width + steps)
        got = [
            lean.prefill(input_ids=prompts, attention_mask=mask, position_ids=positions[:, :width])
        ]
        for t in range(steps):
            got.append(lean.step(new[:, t], positions[:, width + t], full_mask[:, : width + t + 1]))
    real = full_mask[:, width - 1 :].bool()  # every step's last position is a real token
    torch.testing.assert_close(
        torch.stack(got, 1)[real], expected[:, width - 1 :][real], atol=1e-5, rtol=1e-4
    )


def test_engine_samples_the_same_with_and_without_it(monkeypatch) -> None:
    """Same seed, same tokens and (to rounding) the same recorded log-probs whether the
    steps run in `LeanDecoder` or in the model's forward."""
    model = _model("qwen2")
    prompts = [[5, 6, 7, 8], [9, 10]]

    def sample():
        torch.manual_seed(3)
        return HFEngine(model, 0, 1).generate(prompts, SamplingParams(8))

    lean = sample()
    monkeypatch.setattr(LeanDecoder, "supports", staticmethod(lambda model: False))
    plain = sample()
    for a, b in zip(lean, plain, strict=True):
        assert a.tokens == b.tokens
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)


def test_unsupported_configurations_keep_the_models_forward() -> None:
    model = _model("llama")
    model.config.rope_parameters = {**model.config.rope_parameters, "rope_type": "linear"}
    assert not LeanDecoder.supports(model)
    assert _Stepper(model, 1, 4, local=True).lean is None
    windowed = Qwen2ForCausalLM(Qwen2Config(**SMALL, use_sliding_window=True, sliding_window=4))
    assert not LeanDecoder.supports(windowed)
