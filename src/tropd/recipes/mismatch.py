"""Teacher and students for the `chain` task: a capability gap crossed with a style mismatch.

The teacher is a tiny Llama trained with SFT (`tropd.recipes.sft.sft_train`) on gold
chains in the `forward` style ("7+5=12;12-3=9") until it solves the task. Each student
is a smaller Llama trained to convergence on the same problems with two differences:

- **a capability gap** (`Slip`): in its SFT data, on steps whose operand is at least 7,
  70% of the carries (+) and borrows (-) are dropped ("47+8=45" instead of 55, and the
  chain goes on from 45). The student learns the slip as a habit: greedy, it gets about
  half the problems wrong, and it puts the wrong digit first at exactly the positions
  that decide the answer, where the teacher gives that digit almost no probability. It
  keeps some mass on the right digit, so on-policy learning can find it: the gap closes
  within the benchmark's budget (`bench/claim.py`, the `none` control).
- **a style mismatch**: the student writes most problems in the `backward` style
  ("12=7+5;9=12-3"); a problem is written in the teacher's style only when its start
  value lies in the top `share` of the value range (or, in the multi-domain cell, when
  it is not of the mismatched domain).

| cell | student's SFT data in the teacher's style | the rest |
|---|---|---|
| `none` | 100% | the student writes as the teacher does; only capability differs |
| `mild` | 50% (start value >= 50) | the student starts "12=..." where the teacher starts "7+..." |
| `strong` | 20% (start value >= 80) | the same, on 80% of the prompts |
| `multi` | the `add` domain (chains of `+` only) | the `sub` domain (chains of `-` only) |

Where the student writes `backward`, it gives the teacher's first token almost no
probability and the teacher gives the student's almost none: outliers of style, beside
the slip's outliers of knowledge. `measure_mismatch` reports how far apart a pair
starts. Models are shipped and cached like the other built-in models
(`tropd.recipes.cache`): keyed by a hash of the recipe and task options.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console

from tropd.recipes.cache import ModelSpec, prepare_model, recipe_key, write_record
from tropd.recipes.sft import sft_build
from tropd.rollout import HFEngine, SamplingParams, collect_rollouts
from tropd.tasks import Item
from tropd.tasks.chat import encode_prompt
from tropd.tasks.reasoning import OPERATORS, ChainTask, parse_steps, write_chain
from tropd.teacher import score_batch

TEACHER_STYLE = "forward"
OPENING = 3  # response tokens in which a chain's style shows (`measure_mismatch`)
RECIPE_FORMAT = 2  # bump when the build changes in a way the recipe does not capture


@dataclass(frozen=True)
class Slip:
    """A systematic arithmetic error in a student's SFT data, its capability gap: on steps
    whose operand is at least `min_operand`, a share `rate` of the carries (+) and borrows
    (-) are dropped (decided per step by a hash of the prompt, so the data is fixed), and
    the chain goes on from the wrong value."""

    min_operand: int = 7
    rate: float = 0.7


@dataclass(frozen=True)
class ChainRecipe:
    """Model size, SFT schedule, chain-of-thought style and slip of one chain model."""

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
    slip: Slip | None = None  # the capability gap; None: gold arithmetic
    own_style_domain: str | None = None  # only this domain is written in `style` (multi)


TEACHER_RECIPE = ChainRecipe(
    TEACHER_STYLE, 0.0, hidden_size=128, num_layers=4, num_heads=4, steps=1000
)
STUDENT_SIZE = {"hidden_size": 64, "num_layers": 2, "num_heads": 4}
STUDENT_SLIP = Slip()
MISMATCH = {
    "none": {"style": "forward", "teacher_style_share": 1.0},
    "mild": {"style": "backward", "teacher_style_share": 0.5},
    "strong": {"style": "backward", "teacher_style_share": 0.2},
    "multi": {"style": "backward", "teacher_style_share": 0.0, "own_style_domain": "sub"},
}
"""cell -> the student's own style and where it writes in the teacher's style instead."""
MULTI_DOMAINS = "+-"  # the multi cell's task: chains of `+` only (add) or `-` only (sub)


def student_recipe(mismatch: str) -> ChainRecipe:
    """The student recipe of a cell (none | mild | strong | multi): 1500 SFT steps, to
    convergence on its data, with `STUDENT_SLIP`."""
    if mismatch not in MISMATCH:
        raise ValueError(f"unknown mismatch {mismatch!r}; use one of {', '.join(MISMATCH)}")
    return ChainRecipe(**MISMATCH[mismatch], **STUDENT_SIZE, steps=1500, slip=STUDENT_SLIP)


def cell_task(mismatch: str) -> ChainTask:
    """The prompts of a cell: `ChainTask()`, or the two-domain chains of `multi`."""
    return ChainTask(domains=MULTI_DOMAINS) if mismatch == "multi" else ChainTask()


def chain_spec(
    recipe: ChainRecipe, task: ChainTask | None = None, name: str = "chain"
) -> ModelSpec:
    """The model `recipe` makes for `task` (default `ChainTask()`): cached as
    `<name>-<style>-<hash of recipe and task options>`."""
    task = (task or ChainTask()).with_style(recipe.style)
    spec = {"format": RECIPE_FORMAT, "task": _set_fields(task), "recipe": _set_fields(recipe)}
    key = recipe_key(spec)

    def build(out_dir: Path, console: Console) -> None:
        record = _build(task, recipe, out_dir, console)
        write_record(out_dir, key, {**spec, "recipe": dataclasses.asdict(recipe), **record})

    return ModelSpec(
        f"{name}-{recipe.style}-{key}", key, build, f"{name} model ({recipe.style} style)"
    )


def prepare_chain_model(
    recipe: ChainRecipe,
    task: ChainTask | None = None,
    cache_dir: Path | None = None,
    name: str = "chain",
) -> Path:
    """The directory of the model `recipe` makes for `task` (default `ChainTask()`): the
    shipped copy when its recipe key matches, else built on first use into the cache
    (`tropd.recipes.cache.prepare_model`).

    It holds the model, its tokenizer and `recipe.json` (recipe, key, task options,
    measured eval accuracy, training time, sha256 of the weights). A build happens in a
    temporary sibling moved into place with one `os.replace`, so an interrupted or
    concurrent build never leaves a partial folder.
    """
    return prepare_model(chain_spec(recipe, task, name), cache_dir)


@dataclass(frozen=True)
class StyleMix:
    """SFT data: `task`'s problems in its style, except those whose start value lies in
    the top `share` of `0..max_value` (or, with `own_style_domain`, those of any other
    domain), written in the `other` style; with `slip`, the arithmetic slips."""

    task: ChainTask
    other: str
    share: float
    slip: Slip | None = None
    own_style_domain: str | None = None

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
        if self.own_style_domain is not None:
            other = item.meta.get("domain") != self.own_style_domain
        else:
            other = steps[0][0] >= (1 - self.share) * (self.task.max_value + 1)
        if self.slip is not None:
            steps = slipped_steps(steps, self.slip, item.prompt)
        return write_chain(steps, self.other if other else self.task.style)


def slipped_steps(
    steps: list[tuple[int, str, int, int]], slip: Slip, key: str
) -> list[tuple[int, str, int, int]]:
    """`steps` `(a, op, b, result)` recomputed with `slip`'s dropped carries and borrows,
    each step starting from the previous (possibly wrong) result. `key` (the prompt)
    seeds which slip-prone steps slip."""
    rng = random.Random(hashlib.sha256(key.encode()).hexdigest())
    out, value = [], steps[0][0]
    for _, op, b, _ in steps:
        result = OPERATORS[op](value, b)
        if b >= slip.min_operand and rng.random() < slip.rate:
            if op == "+" and value % 10 + b >= 10:
                result -= 10  # the carry is dropped
            elif op == "-" and value % 10 < b:
                result += 10  # the borrow is dropped
        out.append((value, op, b, result))
        value = result
    return out


def _set_fields(obj: object) -> dict[str, object]:
    """A dataclass's fields for a cache key; unset optional ones (None, "") are left out,
    so models built before those fields existed keep their keys."""
    return {k: v for k, v in dataclasses.asdict(obj).items() if v is not None and v != ""}


def _build(task: ChainTask, recipe: ChainRecipe, out_dir: Path, console: Console) -> dict:
    """SFT a fresh tiny Llama on `task`'s gold chains; save it to `out_dir`; return the
    measured numbers for `recipe.json`."""
    data = StyleMix(
        task, TEACHER_STYLE, recipe.teacher_style_share, recipe.slip, recipe.own_style_domain
    )
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
    - `student_accuracy`: the verifier on those samples (not greedy);
    - `outlier_share_opening` / `outlier_share_digits`: the share of the expected outlier
      mass (`1 − min(1, π_T/q)` summed) on the first `OPENING` response tokens, where a
      style is chosen, and on digit tokens, where arithmetic slips show
      (`digit_token_share`: the share of digits among all student tokens).
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
    # Where the outliers sit: expected outlier mass 1 - min(1, e^r) per token, its share on
    # the first `OPENING` response tokens (where a style is chosen) and on digits.
    outlier = 1 - torch.exp(reward.clamp(max=0))
    position = (torch.cumsum(mask.long(), -1) - 1)[mask]
    digits = torch.tensor(
        [tokenizer.convert_ids_to_tokens(i).isdigit() for i in range(len(tokenizer))]
    )
    on_digit = digits.to(mask.device)[batch.tokens[mask]]
    total = outlier.sum().clamp(min=1e-12)
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
        "outlier_share_opening": float(outlier[position < OPENING].sum() / total),
        "outlier_share_digits": float(outlier[on_digit].sum() / total),
        "digit_token_share": float(on_digit.float().mean()),
    }
