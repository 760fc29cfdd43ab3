"""Prompt sources and exact verifiers.

A task hands out `Item`s (a prompt and its reference answer) and scores a response
with a verifier. The built-in synthetic tasks also write the gold response used for
supervised fine-tuning (`SFTTask`). `get_task` builds a task by name: a built-in one,
a prompt file (`file`, `jsonl:PATH`, ...; see `tropd.tasks.sources`), reasoning-gym
generators (`reasoning_gym:NAME[,NAME...]`) or `humaneval`.
"""

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


# Imported last: the built-in tasks import `Item` from this module.
from tropd.tasks.builtin import get_task as get_builtin_task  # noqa: E402
from tropd.tasks.builtin import list_tasks  # noqa: E402


def get_task(name: str, **options: object) -> Task:
    """Build a task by name with keyword `options`.

    `add`/`copy`/`reverse` are built in (`list_tasks`); `chain` is multi-step arithmetic
    with a written chain of thought (`tropd.tasks.reasoning`); `file` (option `path`) or
    `jsonl:PATH`, `parquet:PATH`, `csv:PATH`, `hf:PATH` read prompts from disk;
    `reasoning_gym:NAME[,NAME...]` draws from reasoning-gym generators; `humaneval`
    is the HumanEval code benchmark. An unknown name or option is a `ValueError`.
    """
    from tropd.tasks.sources import make_source_task, source_kind

    if name == "humaneval":
        from tropd.tasks.humaneval import HumanEvalTask

        return HumanEvalTask.from_options(**options)
    if name.startswith("reasoning_gym:"):
        from tropd.tasks.gym import ReasoningGymTask

        return ReasoningGymTask.from_options(name.removeprefix("reasoning_gym:"), **options)
    if name == "chain":
        from tropd.tasks.reasoning import make_chain_task

        return make_chain_task(**options)
    if source_kind(name) is not None:
        return make_source_task(name, **options)
    if name in list_tasks():
        return get_builtin_task(name, **options)
    raise ValueError(
        f"unknown task {name!r}; use a built-in task ({', '.join(list_tasks())}), chain, file "
        "(with options.path), jsonl:PATH, parquet:PATH, csv:PATH, hf:PATH, "
        "reasoning_gym:NAME[,NAME...] or humaneval"
    )


__all__ = ["Item", "SFTTask", "Task", "get_task", "list_tasks"]
