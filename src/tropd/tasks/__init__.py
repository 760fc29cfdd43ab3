"""Prompt sources and exact verifiers.

A task hands out `Item`s (a prompt and its reference answer), scores a response
with an exact verifier, and writes the gold response used for supervised
fine-tuning. `get_task` builds one of the built-in synthetic tasks by name.
"""

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Item:
    """One problem: the user message text and its reference answer."""

    prompt: str
    answer: str


class Task(Protocol):
    """What the trainer, the evaluator and the SFT recipe need from a task."""

    name: str
    alphabet: str  # every character a prompt or a gold response can contain

    def items(self, split: str, n: int, seed: int) -> list[Item]:
        """`n` items from `split` ("train" or "eval"); the splits are disjoint."""
        ...

    def score(self, response: str, item: Item) -> float:
        """1.0 if `response` (text, special tokens removed) is correct, else 0.0."""
        ...

    def gold_response(self, item: Item) -> str:
        """The reference response text, without an end-of-sequence token."""
        ...


# Imported last: the built-in tasks import `Item` from this module.
from tropd.tasks.builtin import get_task, list_tasks

__all__ = ["Item", "Task", "get_task", "list_tasks"]
