"""A rich progress bar that shows the live metrics a user watches during a run."""

from __future__ import annotations

from typing import Any

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.progress import Progress as RichProgress

SHOWN = {
    "loss": "loss",
    "reward_mean": "r",
    "trust_fraction": "trust",
    "grad_norm": "|g|",
    "eval/accuracy": "acc",
    "eval/reverse_kl": "rkl",
}


class Progress:
    """Context manager; `update(step, record)` advances to `step` and shows its metrics.
    Disabled, it does nothing (other ranks, tests, `run.progress=false`)."""

    def __init__(self, total: int, enabled: bool = True, start: int = 0):
        self.enabled, self.latest = enabled, {}
        self.bar = RichProgress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.description}"),
            disable=not enabled,
        )
        self.task = self.bar.add_task("", total=total, completed=start)

    def __enter__(self) -> Progress:
        self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.stop()

    def update(self, step: int, record: dict[str, Any]) -> None:
        self.latest.update({k: v for k, v in record.items() if k in SHOWN})
        text = "  ".join(f"{SHOWN[k]} {v:.3g}" for k, v in self.latest.items())
        self.bar.update(self.task, completed=step, description=text)
