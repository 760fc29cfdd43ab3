"""LoRA on the student: only adapter weights train; the merged export reproduces the
adapted model's logits; a training run with `lora.enabled` exports a plain model."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from tropd.config import load_config
from tropd.lora import apply_lora, has_lora, merge_lora
from tropd.models import tiny_llama_config
from tropd.train import loop

pytest.importorskip("peft")

TOKENS = torch.randint(0, 16, (2, 9), generator=torch.Generator().manual_seed(0))


def tiny_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config(16, 32, 2, num_heads=2))


def test_only_adapter_weights_change_during_training():
    model = apply_lora(tiny_model(), rank=4, alpha=8, target_modules=["q_proj", "v_proj"])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    for _ in range(3):
        loss = model(TOKENS, labels=TOKENS).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)
    assert any("lora_B" in n for n in changed)  # B starts at zero, so it must have moved


def test_merged_export_reproduces_the_adapted_logits(tmp_path):
    model = apply_lora(tiny_model(), rank=4, alpha=16, target_modules="all-linear").eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1)  # a non-trivial adapter
        adapted = model(TOKENS).logits
    merged = merge_lora(model)
    assert not has_lora(merged)
    merged.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert set(reloaded.state_dict()) == set(tiny_model().state_dict())
    with torch.no_grad():
        torch.testing.assert_close(reloaded(TOKENS).logits, adapted, atol=1e-5, rtol=1e-5)


def test_bad_target_modules_is_a_one_line_error():
    with pytest.raises(ValueError, match=r"lora\.target_modules"):
        apply_lora(tiny_model(), target_modules=["no_such_proj"])


def test_a_lora_run_trains_adapters_and_exports_a_merged_model(tiny_pair, tmp_path):
    teacher, student = tiny_pair
    config = load_config(
        None,
        [
            f"model.teacher={teacher}",
            f"model.student={student}",
            f"run.output_dir={tmp_path / 'run'}",
            "run.progress=false",
            "run.steps=2",
            "rollout.prompts_per_step=2",
            "rollout.samples_per_prompt=2",
            "rollout.max_new_tokens=4",
            "teacher.top_k=4",
            "eval.every=0",
            "objective.name=opd",
            "lora.enabled=true",
            "lora.rank=2",
            "optim.lr=0.05",
            "model.dtype=float32",  # (auto is bf16 on a GPU: the embedding compared below)
        ],
    )
    run_dir = loop.train(config)
    final = AutoModelForCausalLM.from_pretrained(run_dir / "final")
    original = AutoModelForCausalLM.from_pretrained(student)
    assert set(final.state_dict()) == set(original.state_dict())
    assert any(
        not torch.equal(final.state_dict()[k], original.state_dict()[k])
        for k in original.state_dict()
        if "proj" in k
    )
    assert torch.equal(final.model.embed_tokens.weight, original.model.embed_tokens.weight)
