"""The built-in teacher and student of each built-in task (`builtin:<task>:<role>`).

The teacher trains long enough to solve the task; the student only briefly, so it writes
well-formed answers but gets many wrong: a gap for distillation to close. Builds are
seeded (`tropd.recipes.sft.sft_build`) and keyed by a hash of the recipe and the task
options: a shipped copy with that key is used as is, else the model is built once into
the on-disk cache (`tropd.recipes.cache`).
"""

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from tropd.recipes.cache import ModelSpec, prepare_model, recipe_key, write_record
from tropd.recipes.sft import sft_build
from tropd.tasks import SFTTask
from tropd.tasks.builtin import get_task, task_options

# Bump when the recipe code changes in a way the recipe config does not capture,
# so cached models are rebuilt.
RECIPE_FORMAT = 2


@dataclass(frozen=True)
class BuiltinRecipe:
    """Model size and SFT schedule of one built-in role."""

    hidden_size: int
    num_layers: int
    num_heads: int
    steps: int
    batch_size: int
    lr: float
    warmup_steps: int
    seed: int = 0
    eval_items: int = 500


# Chosen by measurement on `add` (digits=3), one CPU thread, greedy eval on 500 items.
# Teacher: ~98% (seed 1); over other seeds this size and schedule gave 98%, 98% and
# 90% (a run can stall on long carry chains; 3000 steps gave 88-99%). Student: same
# depth at half the width, stopped before it learns carries: ~15% at 800 steps (15-60%
# over seeds), while the architecture reaches ~92% with 3000 steps of SFT, so
# distillation has room to help.
RECIPES: dict[str, BuiltinRecipe] = {
    "teacher": BuiltinRecipe(
        hidden_size=128,
        num_layers=3,
        num_heads=4,
        steps=2000,
        batch_size=64,
        lr=3e-3,
        warmup_steps=100,
        seed=1,
    ),
    "student": BuiltinRecipe(
        hidden_size=64,
        num_layers=3,
        num_heads=4,
        steps=800,
        batch_size=64,
        lr=3e-3,
        warmup_steps=30,
        seed=0,
    ),
}


def _cache_key(task: SFTTask, recipe: BuiltinRecipe) -> str:
    spec = {
        "format": RECIPE_FORMAT,
        "task": task.name,
        "task_options": task_options(task),
        "recipe": dataclasses.asdict(recipe),
    }
    return recipe_key(spec)


def _build(
    task: SFTTask, role: str, recipe: BuiltinRecipe, out_dir: Path, console: Console
) -> None:
    """Train the `role` model for `task` with `recipe` on the CPU and save it into `out_dir`."""
    measured = sft_build(task, recipe, f"{task.name} {role}", out_dir, console)
    record = {
        "task": task.name,
        "task_options": task_options(task),
        "role": role,
        "recipe": dataclasses.asdict(recipe),
        "format": RECIPE_FORMAT,
        **measured,
    }
    write_record(out_dir, _cache_key(task, recipe), record)


def builtin_spec(task_name: str, role: str) -> ModelSpec:
    """The built-in `role` model of `task_name`: cached as `<task>-<role>-<key>`."""
    if role not in RECIPES:
        raise ValueError(f"unknown built-in role {role!r}; use one of {', '.join(RECIPES)}")
    task = get_task(task_name)
    recipe = RECIPES[role]
    key = _cache_key(task, recipe)
    return ModelSpec(
        f"{task_name}-{role}-{key}",
        key,
        lambda out_dir, console: _build(task, role, recipe, out_dir, console),
        f"built-in {task_name} {role}",
    )


def prepare_builtin(task_name: str, role: str, cache_dir: Path | None = None) -> Path:
    """The directory of the built-in `role` model for `task_name`: the shipped copy when
    its recipe key matches (`tropd.recipes.shipped`), else built on first use into
    `<cache_dir>/<task>-<role>-<key>` (`tropd.recipes.cache.prepare_model`).

    The directory holds a `save_pretrained` model (safetensors), its tokenizer and
    `recipe.json` (recipe, key, measured eval accuracy, training time, sha256 of the
    weights).
    """
    return prepare_model(builtin_spec(task_name, role), cache_dir)
