"""Teacher and students for the `chain` task, with a controllable style mismatch.

The teacher is a tiny Llama trained with SFT (`tropd.recipes.sft.sft_train`) on gold
chains in the `forward` style ("7+5=12;12-3=9") until it solves the task. Each student
is a smaller Llama trained on the same problems, but writing most of them in the
`backward` style ("12=7+5;9=12-3"): a problem is written in the teacher's style only
when its start value lies in the top `share` of the value range, so the student learns
both styles and a rule for choosing between them. The `mismatch` knob sets `share`:

| mismatch | share in the teacher's style | on the other prompts |
|---|---|---|
| `none` | 100% | the student writes as the teacher does; only capability differs |
| `mild` | 50% (start value >= 50) | the student starts "12=..." where the teacher starts "7+..." |
| `strong` | 20% (start value >= 80) | the same, on 80% of the prompts |

Where the rule says `backward`, the student gives the teacher's first token almost no
probability and the teacher gives the student's almost none: the outliers TrOPD routes
away from the reverse-KL gradient. Yet the student can solve those problems in the
teacher's style; it just never samples it. `measure_mismatch` reports how far apart a
pair starts. Models are cached like the other built-in models (`tropd.recipes.cache`):
under a hash of the recipe and task options, built in a temporary folder and renamed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console

from tropd.recipes.cache import build_cached, default_cache_dir
from tropd.recipes.sft import sft_build
from tropd.rollout import HFEngine, SamplingParams, collect_rollouts
from tropd.tasks import Item
from tropd.tasks.chat import encode_prompt
from tropd.tasks.reasoning import ChainTask, parse_steps, write_chain
from tropd.teacher import score_batch

TEACHER_STYLE = "forward"
MISMATCH = {
    "none": ("forward", 1.0, 1500),
    "mild": ("backward", 0.5, 1500),
    "strong": ("backward", 0.2, 1500),
}
"""mismatch -> (the student's own style, share of its SFT problems written in the teacher's
style instead, SFT steps). The steps bring each student to a similar starting accuracy."""
RECIPE_FORMAT = 2  # bump when the build changes in a way the recipe does not capture


@dataclass(frozen=True)
class ChainRecipe:
    """Model size, SFT schedule and chain-of-thought style of one chain model."""

    style: str
    teacher_style_share: float  # share of the problems written in the teacher's style instead
    hidden_size: int
    num_layers: int
    num_heads: int
    steps: int
    batch_size: int = 64
    lr: float = 3e-3
    warmup_steps: int = 50
    seed: int = 0
    eval_items: int = 200


TEACHER_RECIPE = ChainRecipe(
    TEACHER_STYLE, 0.0, hidden_size=128, num_layers=4, num_heads=4, steps=1000
)
STUDENT_SIZE = {"hidden_size": 64, "num_layers": 2, "num_heads": 4}


def student_recipe(mismatch: str) -> ChainRecipe:
    """The student recipe of a `mismatch` setting (none | mild | strong)."""
    if mismatch not in MISMATCH:
        raise ValueError(f"unknown mismatch {mismatch!r}; use one of {', '.join(MISMATCH)}")
    style, share, steps = MISMATCH[mismatch]
    return ChainRecipe(style, share, **STUDENT_SIZE, steps=steps)


def prepare_chain_model(
    recipe: ChainRecipe,
    task: ChainTask | None = None,
    cache_dir: Path | None = None,
    name: str = "chain",
) -> Path:
    """The directory of the model `recipe` makes for `task` (default `ChainTask()`),
    built on first use.

    `<cache_dir>/<name>-<style>-<hash of recipe and task options>` holds the model, its
    tokenizer and `recipe.json` (recipe, task options, measured eval accuracy and
    training time). It is built in a temporary sibling and moved into place with one
    `os.replace`, so an interrupted or concurrent build never leaves a partial folder.
    """
    task = (task or ChainTask()).with_style(recipe.style)
    spec = {"format": RECIPE_FORMAT, "task": _options(task), "recipe": dataclasses.asdict(recipe)}
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final_dir = cache_dir / f"{name}-{recipe.style}-{key}"
    if (final_dir / "recipe.json").is_file():
        return final_dir

    def build(out_dir: Path, console: Console) -> None:
        record = _build(task, recipe, out_dir, console)
        (out_dir / "recipe.json").write_text(json.dumps({**spec, **record}, indent=2) + "\n")

    return build_cached(final_dir, build, f"{name} model ({recipe.style} style)")


@dataclass(frozen=True)
class StyleMix:
    """SFT data: `task`'s problems in its style, except those whose start value lies in
    the top `share` of `0..max_value`, written in the `other` style."""

    task: ChainTask
    other: str
    share: float

    @property
    def name(self) -> str:
        return self.task.name

    @property
    def alphabet(self) -> str:
        return self.task.alphabet

    def items(self, split: str, n: int, seed: int) -> list[Item]:
        return self.task.items(split, n, seed)

    def score(self, response: str, item: Item) -> float:
        return self.task.score(response, item)

    def gold_response(self, item: Item) -> str:
        steps = parse_steps(item.prompt)
        other = steps[0][0] >= (1 - self.share) * (self.task.max_value + 1)
        return write_chain(steps, self.other if other else self.task.style)


def _options(task: ChainTask) -> dict[str, object]:
    return dataclasses.asdict(task)


def _build(task: ChainTask, recipe: ChainRecipe, out_dir: Path, console: Console) -> dict:
    """SFT a fresh tiny Llama on `task`'s gold chains; save it to `out_dir`; return the
    measured numbers for `recipe.json`."""
    data = StyleMix(task, TEACHER_STYLE, recipe.teacher_style_share)
    return sft_build(data, recipe, f"chain {recipe.style}", out_dir, console)


def measure_mismatch(
    teacher,
    student,
    tokenizer,
    task: ChainTask,
    num_prompts: int = 64,
    samples_per_prompt: int = 4,
    max_new_tokens: int = 48,
    seed: int = 0,
) -> dict[str, float]:
    """How far apart a teacher and a student start, on student samples (temperature 1) of
    `num_prompts` eval-split prompts, over student tokens:

    - `reverse_kl_k1`: mean of `log q(x_t) − log π_T(x_t)` (the K1 estimate OPD trains on);
    - `outlier_fraction`: `1 − E[min(1, π_T/q)]`, the share TrOPD's gate expects to route
      to the outlier loss;
    - `near_zero_fraction`: share of tokens with `π_T(x_t) < 1e-3`;
    - `student_accuracy`: the verifier on those samples (not greedy).
    The caller's torch RNG is left untouched.
    """
    items = task.items("eval", num_prompts, seed)
    prompts = [encode_prompt(tokenizer, item) for item in items]
    engine = HFEngine(student, tokenizer.pad_token_id, tokenizer.eos_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        batch = collect_rollouts(
            engine,
            prompts,
            SamplingParams(max_new_tokens),
            samples_per_prompt,
            tokenizer.pad_token_id,
        )
    batch = score_batch(teacher, batch.to(next(teacher.parameters()).device), top_k=1)
    mask = batch.student_mask
    reward = (batch.teacher_logprobs - batch.sampler_logprobs.to(mask.device))[mask]
    texts = [
        tokenizer.decode(batch.tokens[row][mask[row]].tolist(), skip_special_tokens=True)
        for row in range(len(batch))
    ]
    per_row = [item for item in items for _ in range(samples_per_prompt)]
    return {
        "reverse_kl_k1": float(-reward.mean()),
        "outlier_fraction": float(1 - torch.exp(reward.clamp(max=0)).mean()),
        "near_zero_fraction": float((batch.teacher_logprobs[mask] < math.log(1e-3)).float().mean()),
        "student_accuracy": sum(map(task.score, texts, per_row)) / len(texts),
    }
