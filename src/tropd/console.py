"""Progress that reads well both in a terminal and in a log file.

In a terminal, a rich bar with the live text. Anywhere else (a redirected stdout, a CI
log) a bar only shows at the end, so `StepProgress` prints one plain line about every
tenth of the run instead, as it happens, never cut at the log's width.
"""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

PLAIN_LINES = 10  # lines a run prints when the output is not a terminal


class StepProgress:
    """`with StepProgress(label, total) as progress: progress.update(step, text)`.

    `start`: the step a resumed run starts from. Disabled, it shows nothing."""

    def __init__(
        self,
        label: str,
        total: int,
        start: int = 0,
        enabled: bool = True,
        console: Console | None = None,
    ):
        self.console = console or Console(stderr=True)
        self.label, self.total = label, total
        self.plain = enabled and not self.console.is_terminal
        self.every = max(1, total // PLAIN_LINES)
        self.started = time.perf_counter()
        self.bar = Progress(
            TextColumn(f"[bold]{label}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.description}"),
            console=self.console,
            disable=not enabled or self.plain,
        )
        self.task = self.bar.add_task("", total=total, completed=start)

    def __enter__(self) -> StepProgress:
        self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.stop()

    def update(self, step: int, text: str) -> None:
        """Advance to `step` (1-based) and show `text` beside it."""
        self.bar.update(self.task, completed=step, description=text)
        if self.plain and (step % self.every == 0 or step == self.total):
            elapsed = time.perf_counter() - self.started
            line = f"{self.label} {step}/{self.total} ({elapsed:.0f}s)  {text}"
            self.console.print(line, markup=False, highlight=False, soft_wrap=True)
