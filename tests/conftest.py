"""Shared fixtures: tiny random teacher/student pairs saved as local HF directories."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from tropd.config import Config, load_config
from tropd.models import tiny_llama_config
from tropd.recipes.builtin import BuiltinRecipe
from tropd.tasks import get_task
from tropd.tasks.sandbox import bwrap_problem
from tropd.tasks.tokenizer import build_char_tokenizer

# A built-in model recipe that trains in a second (tests that build models).
TINY_RECIPE = BuiltinRecipe(
    hidden_size=16,
    num_layers=1,
    num_heads=2,
    steps=3,
    batch_size=4,
    lr=1e-3,
    warmup_steps=1,
    eval_items=8,
)

# Tests that run generated code; .ci/run installs bubblewrap so that CI runs them.
needs_bwrap = pytest.mark.skipif(
    bwrap_problem() is not None, reason=f"no code sandbox: {bwrap_problem()}"
)


def save_tiny_model(path: Path, hidden: int, layers: int, seed: int, alphabet: str) -> str:
    tokenizer = build_char_tokenizer(alphabet)
    torch.manual_seed(seed)
    config = tiny_llama_config(len(tokenizer), hidden, layers, num_heads=2)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory) -> tuple[str, str]:
    """(teacher_dir, student_dir): random tiny Llamas over the `add` task's alphabet."""
    root = tmp_path_factory.mktemp("models")
    alphabet = get_task("add").alphabet
    teacher = save_tiny_model(root / "teacher", 32, 2, seed=1, alphabet=alphabet)
    student = save_tiny_model(root / "student", 16, 1, seed=2, alphabet=alphabet)
    return teacher, student


def one_line(error: pytest.ExceptionInfo) -> str:
    """The message of a user-facing error, checked to be one line with no traceback."""
    message = str(error.value)
    assert "\n" not in message, f"not one line: {message!r}"
    assert "Traceback" not in message
    return message


def tiny_config(pair: tuple[str, str], run_dir: Path, *overrides: str) -> Config:
    """A run of the (teacher, student) `pair` writing to `run_dir`, without a progress
    bar, with `overrides` on top."""
    teacher, student = pair
    return load_config(
        None,
        [
            f"model.teacher={teacher}",
            f"model.student={student}",
            f"run.output_dir={run_dir}",
            "run.progress=false",
            *overrides,
        ],
    )


def config_file(config: Config, run_dir: Path) -> Path:
    """`config` written as YAML beside `run_dir` (`<run_dir>.yaml`), for the CLI."""
    path = run_dir.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    return path


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def interrupted_run(monkeypatch, config: Config, at_step: int) -> None:
    """Train `config` until step `at_step` raises KeyboardInterrupt (after the previous
    steps' metrics and checkpoints), then put `train_step` back."""
    from tropd.train import loop

    real_step = loop.train_step

    def dies(setup, step, rank, world_size):
        if step == at_step:
            raise KeyboardInterrupt
        return real_step(setup, step, rank, world_size)

    monkeypatch.setattr(loop, "train_step", dies)
    with pytest.raises(KeyboardInterrupt):
        loop.train(config)
    monkeypatch.setattr(loop, "train_step", real_step)


def assert_resumed_run_matches(full: Path, resumed: Path) -> None:
    """A resumed run logged what the uninterrupted one did (timings aside) and ended with
    the same weights."""
    expected, got = read_metrics(full), read_metrics(resumed)
    assert [m["step"] for m in got] == [m["step"] for m in expected]
    for a, b in zip(expected, got, strict=True):
        for key in (k for k in a if not k.startswith("time_")):  # timings differ
            assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-9), (a["step"], key)
    weights = AutoModelForCausalLM.from_pretrained(full / "final").state_dict()
    final = AutoModelForCausalLM.from_pretrained(resumed / "final").state_dict()
    for name, tensor in weights.items():
        torch.testing.assert_close(final[name], tensor, rtol=0, atol=1e-6, msg=name)


def guided_rollout(pair: tuple[str, str], run_dir: Path, *overrides: str):
    """(setup, batch): 3 prompts x 2 rollouts of the tiny pair, half of them guided (a
    constant cap), 7 new tokens, not yet scored by the teacher."""
    from tropd.train import loop

    config = tiny_config(
        pair,
        run_dir,
        "rollout.prompts_per_step=3",
        "rollout.samples_per_prompt=2",
        "rollout.max_new_tokens=7",
        "teacher.top_k=8",
        "guidance.enabled=true",
        "guidance.schedule=constant",
        "guidance.guided_fraction=0.5",
        "optim.head_chunk=5",
        *overrides,
    )
    setup = loop.build(config, run_dir)
    torch.manual_seed(0)
    batch, _ = loop.rollout(setup, setup.train_prompts[:3], step=1)
    return setup, batch


def tiny_qwen2(seed: int = 0, vocab: int = 48, **extra) -> Qwen2ForCausalLM:
    """A 2-layer Qwen2 with grouped-query attention and non-zero q/k/v biases, in eval mode."""
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=vocab,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        rope_theta=500.0,
        tie_word_embeddings=False,
        **extra,
    )
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():  # non-zero biases, so a dropped or misplaced one shows
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_()
    return model
