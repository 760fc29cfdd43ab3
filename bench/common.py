"""What the benchmark scripts share: the anchor's Qwen2 shapes, worker processes, atomic
result files, markdown tables, the CPU."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Worker processes never reach the network and keep their logs quiet.
OFFLINE_ENV = {
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",  # TRL trainers otherwise ping the Hub on creation
    "TRANSFORMERS_VERBOSITY": "error",
}


@dataclass(frozen=True)
class ModelSpec:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int

    @property
    def body_params(self) -> int:
        """Matmul weights a token passes through, LM head and biases excluded."""
        d, kv = self.hidden, self.kv_heads * self.hidden // self.heads
        return self.layers * (2 * d * d + 2 * d * kv + 3 * d * self.intermediate)


# The performance issue's anchor models (random weights, tied embeddings).
STUDENT = ModelSpec(hidden=256, layers=4, heads=4, kv_heads=4, intermediate=1024)
TEACHER = ModelSpec(hidden=512, layers=8, heads=8, kv_heads=8, intermediate=2048)
PAD, EOS = 0, 1


def qwen2_config(spec: ModelSpec, vocab: int, max_positions: int = 1024):
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=vocab,
        hidden_size=spec.hidden,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        intermediate_size=spec.intermediate,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        pad_token_id=PAD,
        bos_token_id=EOS,  # Qwen2 convention: one end-of-text token for both
        eos_token_id=EOS,
    )


def run_worker_process(
    command: list[str], env: dict[str, str], marker: str, timeout_s: int, tail: int = 25
) -> tuple[dict[str, Any], float]:
    """Run one worker; returns the JSON it printed after `marker` (its last such line), or
    `{"error": ...}` with the output's tail, and the wall seconds it took."""
    tic = time.perf_counter()
    try:
        proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s} s"}, time.perf_counter() - tic
    wall = time.perf_counter() - tic
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(marker):
            return json.loads(line.removeprefix(marker)), wall
    lines = (proc.stdout + proc.stderr).strip().splitlines()[-tail:]
    return {"error": f"exit code {proc.returncode}:\n" + "\n".join(lines)}, wall


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file and a rename (never half-written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def markdown(head: list[str], cells: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in cells]
    return "\n".join(lines)


def cpu_info() -> dict[str, Any]:
    """CPU model, logical CPUs and Python version of this machine."""
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "python": platform.python_version()}
