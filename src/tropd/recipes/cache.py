"""The on-disk cache of built models: one folder per recipe, built once, atomically."""

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from rich.console import Console


def default_cache_dir() -> Path:
    """`$TROPD_CACHE` if set, else `~/.cache/tropd/models`."""
    return Path(os.environ.get("TROPD_CACHE") or Path.home() / ".cache" / "tropd" / "models")


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
            if not (final_dir / "recipe.json").is_file():
                raise
    finally:
        shutil.rmtree(build_dir, ignore_errors=True)
    return final_dir
