"""Shared fixtures: tiny random teacher/student pairs saved as local HF directories."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

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
