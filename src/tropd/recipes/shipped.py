"""The models tropd ships as package data, built by its own recipes: the teacher and
student of each built-in task (`<task>-<role>`, `builtin:<task>:<role>`), and the `chain`
teacher with the student of each mismatch cell (`chain-teacher`, `chain-student-<cell>`,
used by `tropd demo` and `bench/claim.py`).

`tropd.recipes.cache.prepare_model` uses a shipped copy whenever its recipe key matches
the current recipe and its weights match their sha256; `build_models` rebuilds them
(`tropd models build`) and `model_rows` describes them (`tropd models list`).
"""

import os
import shutil
import tempfile
from pathlib import Path

from rich.console import Console

from tropd.recipes import builtin, cache, mismatch
from tropd.recipes.cache import RECORD, WEIGHTS, ModelSpec, default_cache_dir, read_record, verified
from tropd.tasks.builtin import list_tasks


def shipped_specs() -> dict[str, ModelSpec]:
    """Name -> spec of every model tropd ships, with today's recipes."""
    specs = {
        f"{task}-{role}": builtin.builtin_spec(task, role)
        for task in list_tasks()
        for role in builtin.RECIPES
    }
    specs["chain-teacher"] = mismatch.chain_spec(mismatch.TEACHER_RECIPE)
    for cell in mismatch.MISMATCH:
        specs[f"chain-student-{cell}"] = mismatch.chain_spec(
            mismatch.student_recipe(cell), mismatch.cell_task(cell)
        )
    return specs


def select(names: list[str]) -> dict[str, ModelSpec]:
    """The specs of `names` (all of them when empty); an unknown name is a ValueError."""
    specs = shipped_specs()
    unknown = [n for n in names if n not in specs]
    if unknown:
        raise ValueError(f"unknown model {unknown[0]!r}; use some of {', '.join(specs)}")
    return {n: specs[n] for n in names} if names else specs


def model_rows(cache_dir: Path | None = None) -> list[dict]:
    """One row per shipped model: `name`, `key` (today's recipe), `accuracy` (recorded
    eval accuracy of the copy in use, None if there is none), `size_bytes` of its
    weights, `shipped` (a verified copy of today's recipe is shipped) and `cached` (one is
    in the cache)."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    rows = []
    for name, spec in shipped_specs().items():
        shipped = verified(cache.SHIPPED_DIR / name, spec.key)
        cached = (cache_dir / spec.cache_name / RECORD).is_file()  # the name holds the key
        in_use = cache.SHIPPED_DIR / name if shipped else cache_dir / spec.cache_name
        record = read_record(in_use) if shipped or cached else None
        rows.append(
            {
                "name": name,
                "key": spec.key,
                "accuracy": record["eval_accuracy"] if record else None,
                "size_bytes": (in_use / WEIGHTS).stat().st_size if record else None,
                "shipped": shipped,
                "cached": cached,
            }
        )
    return rows


def build_models(names: list[str], out_dir: Path | None = None, force: bool = False) -> list[dict]:
    """Build the models `names` (all when empty) with today's recipes into `out_dir/<name>`
    (default: the package data folder, `SHIPPED_DIR`), replacing what is there; one already built
    there with today's recipe is kept unless `force`.

    Returns one row per model: `name`, `key`, `shipped_accuracy` (the recorded accuracy of
    the shipped copy of today's recipe, else None), `accuracy` (measured now, or recorded
    when kept), `train_seconds` and `built` (False when kept).
    """
    out_dir = Path(out_dir) if out_dir is not None else cache.SHIPPED_DIR
    rows = []
    for name, spec in select(names).items():
        shipped_dir = cache.SHIPPED_DIR / name
        shipped = read_record(shipped_dir) if verified(shipped_dir, spec.key) else None
        target = out_dir / name
        built = force or not verified(target, spec.key)
        if built:
            _build_into(target, spec)
        record = read_record(target)
        rows.append(
            {
                "name": name,
                "key": spec.key,
                "shipped_accuracy": shipped["eval_accuracy"] if shipped else None,
                "accuracy": record["eval_accuracy"],
                "train_seconds": record["train_seconds"],
                "built": built,
            }
        )
    return rows


def _build_into(target: Path, spec: ModelSpec) -> None:
    """Build `spec` in a temporary sibling of `target`, then put it in `target`'s place."""
    console = Console(stderr=True)
    console.log(f"building {spec.what} into {target}")
    target.parent.mkdir(parents=True, exist_ok=True)
    build_dir = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        spec.build(build_dir, console)
        build_dir.chmod(0o755)  # mkdtemp makes it private; package data is read by all
        for path in build_dir.iterdir():
            path.chmod(0o644)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(build_dir, target)
    finally:
        shutil.rmtree(build_dir, ignore_errors=True)
