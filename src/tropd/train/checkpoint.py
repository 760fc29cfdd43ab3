"""Checkpoints that survive a kill at any moment: each is written to a temporary folder
and renamed into place, so a checkpoint folder either exists whole or not at all."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model

PREFIX = "step_"


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def save_checkpoint(
    run_dir: Path, step: int, model, optimizer, scheduler, state: dict[str, Any], keep: int
) -> Path:
    """Write model (safetensors), optimizer, scheduler, RNG states and `state` (JSON).

    Keeps the newest `keep` checkpoints. Returns the checkpoint folder.
    """
    tmp = staging_dir(run_dir, step)
    save_model(model, str(tmp / "model.safetensors"))
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng_torch": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        },
        tmp / "trainer.pt",
    )
    return publish(tmp, run_dir, step, state, keep)


def staging_dir(run_dir: Path, step: int) -> Path:
    """A fresh, empty temporary folder for the checkpoint of `step`."""
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp_{PREFIX}{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def publish(tmp: Path, run_dir: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Write `state` (JSON) into the staged folder `tmp`, flush it to disk and rename it into
    place as the checkpoint of `step`; keep the newest `keep`. Returns the checkpoint folder."""
    root = checkpoint_dir(run_dir)
    final = root / f"{PREFIX}{step:07d}"
    (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=1))
    _fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders are ignored)."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def load_checkpoint(path: Path, model, optimizer, scheduler) -> dict[str, Any]:
    """Restore everything `save_checkpoint` wrote; returns the saved `state` with `step`."""
    load_model(model, str(path / "model.safetensors"), device=str(next(model.parameters()).device))
    trainer = torch.load(path / "trainer.pt", weights_only=False)
    optimizer.load_state_dict(trainer["optimizer"])
    scheduler.load_state_dict(trainer["scheduler"])
    torch.set_rng_state(trainer["rng_torch"])
    if trainer["rng_cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(trainer["rng_cuda"])
    return json.loads((path / "state.json").read_text())


def _fsync_dir(path: Path) -> None:
    for f in path.iterdir():
        if f.is_file():
            with open(f, "rb") as handle:
                os.fsync(handle.fileno())
