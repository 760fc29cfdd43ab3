"""What a task is: `Item` (one problem and its reference answer) and the `Task` and
`SFTTask` protocols the trainer, the evaluators and the SFT recipe rely on."""

from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class Item:
    """One problem: the user message text and its reference answer.

    Optional parts, for prompt files and generators: `messages` (a whole chat,
    `({"role": ..., "content": ...}, ...)`, used instead of `prompt` when set),
    `system` (this item's system prompt), `tests` (code a program must pass) and
    `meta` (whatever the task's verifier needs, e.g. a reasoning-gym entry).
    """

    prompt: str
    answer: str
    messages: tuple[dict[str, str], ...] | None = None
    system: str | None = None
    tests: str | None = None
    meta: dict[str, Any] = field(default_factory=dict, compare=False)


class Task(Protocol):
    """What the trainer and the evaluator need from a task."""

    name: str

    def items(self, split: str, n: int, seed: int) -> list[Item]:
        """`n` items from `split` ("train" or "eval"); the splits are disjoint."""
        ...

    def score(self, response: str, item: Item) -> float:
        """1.0 if `response` (text, special tokens removed) is correct, else 0.0
        (some verifiers, e.g. reasoning-gym's, give partial credit in between)."""
        ...


class SFTTask(Task, Protocol):
    """A task the built-in SFT recipe can train a character-level model on."""

    alphabet: str  # every character a prompt or a gold response can contain

    def gold_response(self, item: Item) -> str:
        """The reference response text, without an end-of-sequence token."""
        ...
