"""The training progress: the live metrics a user watches during a run
(`tropd.console.StepProgress`: a bar in a terminal, plain lines in a log)."""

from __future__ import annotations

from typing import Any

from tropd.console import StepProgress

SHOWN = {
    "loss": "loss",
    "reward_mean": "r",
    "trust_fraction": "trust",
    "grad_norm": "|g|",
    "eval/accuracy": "acc",
    "eval/reverse_kl": "rkl",
}


class Progress(StepProgress):
    """Context manager; `update(step, record)` advances to `step` and shows its metrics
    (the latest value of each, evaluations included). Disabled, it does nothing (other
    ranks, tests, `run.progress=false`)."""

    def __init__(self, total: int, enabled: bool = True, start: int = 0):
        super().__init__("train", total, start, enabled)
        self.latest: dict[str, float] = {}

    def update(self, step: int, record: dict[str, Any]) -> None:
        self.latest.update({k: v for k, v in record.items() if k in SHOWN})
        super().update(step, "  ".join(f"{SHOWN[k]} {v:.3g}" for k, v in self.latest.items()))
