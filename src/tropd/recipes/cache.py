"""Where built models live: copies shipped with the package, and an on-disk cache of the
ones built here. Both are keyed by a hash of the recipe; a model is built (once,
atomically) only when neither holds its key.

Each model folder holds a `save_pretrained` model (`model.safetensors`), its tokenizer
and `recipe.json`: the recipe, its `key`, the measured eval accuracy, the training time
and the `sha256` of `model.safetensors`.
"""

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

SHIPPED_DIR = Path(__file__).parent / "shipped"
"""The package data folder of the shipped models: `<name>/` per model (`tropd.recipes.shipped`)."""
WEIGHTS = "model.safetensors"
RECORD = "recipe.json"


@dataclass(frozen=True)
class ModelSpec:
    """One buildable model: `cache_name` (`<prefix>-<key>`, its folder in the cache), the
    `key` of its recipe, and `build(out_dir, console)`, which trains it and saves it into
    `out_dir` with `write_record`. `what` names it in log lines."""

    cache_name: str
    key: str
    build: Callable[[Path, Console], None]
    what: str


def default_cache_dir() -> Path:
    """`$TROPD_CACHE` if set, else `~/.cache/tropd/models`."""
    return Path(os.environ.get("TROPD_CACHE") or Path.home() / ".cache" / "tropd" / "models")


def recipe_key(spec: object) -> str:
    """The 12-hex-digit key of a JSON-able recipe description."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_record(out_dir: Path, key: str, record: dict) -> None:
    """Write `recipe.json` (the marker of a complete folder) into `out_dir`: `record` with
    the recipe `key` and the sha256 of the weights saved there."""
    full = {"key": key, **record, "sha256": file_sha256(out_dir / WEIGHTS)}
    (out_dir / RECORD).write_text(json.dumps(full, indent=2) + "\n")


def read_record(model_dir: Path) -> dict | None:
    """The `recipe.json` of a model folder, or None when there is none."""
    path = model_dir / RECORD
    return json.loads(path.read_text()) if path.is_file() else None


def verified(model_dir: Path, key: str) -> bool:
    """Whether `model_dir` holds the model of recipe `key`, its weights intact (sha256)."""
    record = read_record(model_dir)
    if record is None or record.get("key") != key or not (model_dir / WEIGHTS).is_file():
        return False
    return file_sha256(model_dir / WEIGHTS) == record.get("sha256")


def find_shipped(key: str) -> Path | None:
    """The folder in `SHIPPED_DIR` of recipe `key` whose weights match their recorded
    sha256, or None (a shipped copy of an older recipe, or a damaged one, is not used)."""
    if not SHIPPED_DIR.is_dir():
        return None
    for model_dir in sorted(SHIPPED_DIR.iterdir()):
        record = read_record(model_dir)
        if record is not None and record.get("key") == key:
            if verified(model_dir, key):
                return model_dir
            Console(stderr=True).print(
                f"[yellow]warning:[/] the shipped model {model_dir} does not match its "
                "recorded sha256; building it instead (reinstall tropd to repair it)",
                highlight=False,
            )
    return None


def prepare_model(spec: ModelSpec, cache_dir: Path | None = None) -> Path:
    """The folder of `spec`'s model: the shipped copy if its key matches, else the cached
    one, else built into `<cache_dir>/<cache_name>` (default `default_cache_dir()`)."""
    if (shipped := find_shipped(spec.key)) is not None:
        return shipped
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final_dir = cache_dir / spec.cache_name
    if (final_dir / RECORD).is_file():
        return final_dir
    return build_cached(final_dir, spec.build, spec.what)


def build_cached(final_dir: Path, build: Callable[[Path, Console], None], what: str) -> Path:
    """Run `build(tmp_dir, console)` in a temporary sibling of `final_dir`, then move it into
    place with one `os.replace`: an interrupted or concurrent build never leaves a partial
    folder. `build` must write `recipe.json`, the marker of a complete folder."""
    console = Console(stderr=True)
    console.log(f"building {what} into {final_dir}")
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    build_dir = Path(tempfile.mkdtemp(prefix=f".{final_dir.name}.", dir=final_dir.parent))
    try:
        build(build_dir, console)
        build_dir.chmod(0o755)  # mkdtemp makes it private; a cache may be shared
        try:
            os.replace(build_dir, final_dir)
        except OSError:
            # A concurrent build finished first: keep its directory, drop ours.
            if not (final_dir / RECORD).is_file():
                raise
    finally:
        shutil.rmtree(build_dir, ignore_errors=True)
    return final_dir
