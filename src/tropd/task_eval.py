"""`tropd eval`: sample a model on a task's eval split and score it with the task's verifier.

For each item, `samples` responses at `temperature`/`top_p`; each response scores in
[0, 1]. Reported: the mean score with a 95% confidence interval over items, and the
unbiased pass@k (Chen et al. 2021, a sample counts as correct when it scores 1) for
each k <= samples. Per-item results (prompt, answer, responses, scores) go to
`results.jsonl`, the summary to `summary.json`. The trainer's evaluation hook
(`tropd.train.heldout`) scores with the same `score_responses`.

A model is a Hugging Face id or directory, any name `tropd.model_names.load_model` takes
(GGUF, pruned), a run directory (its `final/` model, and its task unless one is
given), or a checkpoint folder `RUN/checkpoints/step_N` (rebuilt from the run's
config, LoRA included): `tropd.model_names.load_eval_model`.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from tropd.console import StepProgress
from tropd.rollout import HFEngine, SamplingParams
from tropd.tasks import Item, Task
from tropd.tasks.chat import encode_prompt


def score_responses(task: Task, items: Sequence[Item], responses: Sequence[str]) -> list[float]:
    """The verifier's score of each response (text, special tokens removed) to its item."""
    return [float(task.score(text, item)) for text, item in zip(responses, items, strict=True)]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from `n` samples of which `c` are correct: `1 - C(n-c, k) / C(n, k)`,
    computed as a stable product."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n; got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def mean_with_ci(values: Sequence[float], z: float = 1.96) -> tuple[float, float, float]:
    """(mean, low, high): a normal-approximation confidence interval (95% by default) of
    the mean; zero width for fewer than two values."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, mean, mean
    half = z * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half


@dataclass(frozen=True)
class EvalSettings:
    samples: int = 1  # responses per item (n of pass@k)
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    max_new_tokens: int = 256
    num_items: int = 100  # eval items (a prompt file's eval split gives at most all it has)
    ks: tuple[int, ...] = (1,)
    batch_size: int = 16  # sequences per generate call
    seed: int = 0
    system_prompt: str | None = None


def evaluate_on_task(
    model,
    tokenizer,
    task: Task,
    settings: EvalSettings,
    out_dir: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Sample, score and summarise; write `results.jsonl` and `summary.json` to `out_dir`.

    Sampling is seeded by `settings.seed` (the caller's torch RNG is left alone).
    Returns the summary: `mean` and `ci95` of the per-item mean score, `pass@k`, the
    mean response length in tokens, and timing.
    """
    s = settings
    bad_k = [k for k in s.ks if not 1 <= k <= s.samples]
    if bad_k:
        raise ValueError(f"pass@k needs 1 <= k <= samples ({s.samples}); got k={bad_k}")
    items = task.items("eval", s.num_items, s.seed)
    engine = HFEngine(model, tokenizer.pad_token_id, tokenizer.eos_token_id)
    params = SamplingParams(s.max_new_tokens, s.temperature, s.top_p)
    per_call = max(1, s.batch_size // s.samples)
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.jsonl").write_text("")
    item_means, lengths, passes = [], [], {k: [] for k in s.ks}
    started = time.perf_counter()
    device = next(model.parameters()).device
    bar = StepProgress("eval", len(items), enabled=progress)
    with bar, torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(s.seed)
        for begin in range(0, len(items), per_call):
            chunk = items[begin : begin + per_call]
            prompts = [encode_prompt(tokenizer, item, s.system_prompt) for item in chunk]
            generations = engine.generate([p for p in prompts for _ in range(s.samples)], params)
            texts = [tokenizer.decode(g.tokens, skip_special_tokens=True) for g in generations]
            scores = score_responses(task, [i for i in chunk for _ in range(s.samples)], texts)
            for j, item in enumerate(chunk):
                rows = slice(j * s.samples, (j + 1) * s.samples)
                mine, correct = scores[rows], sum(v >= 1.0 for v in scores[rows])
                item_means.append(statistics.fmean(mine))
                lengths += [len(g.tokens) for g in generations[rows]]
                record = {
                    "index": begin + j,
                    "prompt": item.prompt,
                    "answer": item.answer,
                    "responses": texts[rows],
                    "scores": mine,
                    "correct": correct,
                }
                for k in s.ks:
                    record[f"pass@{k}"] = pass_at_k(s.samples, correct, k)
                    passes[k].append(record[f"pass@{k}"])
                if out is not None:
                    with open(out / "results.jsonl", "a") as handle:
                        handle.write(json.dumps(record) + "\n")
            mean = statistics.fmean(item_means)
            bar.update(begin + len(chunk), f"mean {mean:.3f}")
    mean, low, high = mean_with_ci(item_means)
    low, high = max(0.0, low), min(1.0, high)  # scores lie in [0, 1]
    summary: dict[str, Any] = {
        "task": task.name,
        "items": len(items),
        "mean": mean,
        "ci95": [low, high],
        **{f"pass@{k}": statistics.fmean(v) for k, v in passes.items()},
        "response_len": statistics.fmean(lengths),
        "seconds": time.perf_counter() - started,
        "settings": asdict(s),
    }
    if out is not None:
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
