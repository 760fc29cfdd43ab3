"""The vLLM rollout engine against `HFEngine` on a tiny model (needs CUDA and the extra)."""

from __future__ import annotations

import pytest
import torch

from tropd.model_names import load_model, load_tokenizer
from tropd.rollout import HFEngine, SamplingParams

vllm = pytest.importorskip(
    "vllm", reason="vLLM is an optional CUDA extra (pip install 'tropd[vllm]'), not installed"
)
if not torch.cuda.is_available():
    pytest.skip("the vLLM engine needs a CUDA GPU", allow_module_level=True)


@pytest.fixture(scope="module")
def engine(tiny_pair):
    from tropd.rollout.vllm_engine import VLLMEngine

    tokenizer = load_tokenizer(tiny_pair[1])
    return VLLMEngine(tiny_pair[1], tokenizer.eos_token_id, 0.2, "float32", seed=0)


def test_sampler_logprobs_are_the_students(engine, tiny_pair):
    student = load_model(tiny_pair[1], "float32", "cuda")
    tokenizer = load_tokenizer(tiny_pair[1])
    prompts = [[1, 5, 6, 7], [1, 8, 9]]
    for gen, prompt in zip(engine.generate(prompts, SamplingParams(6)), prompts, strict=True):
        assert 1 <= len(gen.tokens) <= 6 and len(gen.logprobs) == len(gen.tokens)
        ids = torch.tensor([prompt + gen.tokens], device="cuda")
        logits = student(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
        expected = torch.log_softmax(logits, -1).gather(-1, ids[0, len(prompt) :, None])
        torch.testing.assert_close(
            torch.tensor(gen.logprobs), expected.squeeze(-1).cpu(), atol=1e-3, rtol=0
        )
    hf = HFEngine(student, tokenizer.pad_token_id, tokenizer.eos_token_id)
    assert len(hf.generate(prompts, SamplingParams(6))) == len(prompts)


def test_pushed_weights_change_what_vllm_samples(engine, tiny_pair):
    student = load_model(tiny_pair[1], "float32", "cuda")
    greedy = SamplingParams(6, temperature=0.0)
    with torch.no_grad():
        student.get_output_embeddings().weight.mul_(-1.0)
    engine.push_weights(student.named_parameters())
    after = engine.generate([[1, 5, 6]], greedy)[0].tokens
    hf = HFEngine(student, 0, load_tokenizer(tiny_pair[1]).eos_token_id)
    assert after == hf.generate([[1, 5, 6]], greedy)[0].tokens
