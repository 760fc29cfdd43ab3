"""Prompt sources and exact verifiers.

A task hands out `Item`s (a prompt and its reference answer) and scores a response
with a verifier. The built-in synthetic tasks also write the gold response used for
supervised fine-tuning (`SFTTask`). `get_task` builds a task by name: a built-in one,
a prompt file (`file`, `jsonl:PATH`, ...; see `tropd.tasks.sources`), reasoning-gym
generators (`reasoning_gym:NAME[,NAME...]`) or `humaneval`.
"""

from tropd.tasks.builtin import get_task as get_builtin_task
from tropd.tasks.builtin import list_tasks
from tropd.tasks.gym import ReasoningGymTask
from tropd.tasks.humaneval import HumanEvalTask
from tropd.tasks.reasoning import make_chain_task
from tropd.tasks.sources import make_source_task, source_kind
from tropd.tasks.task import Item, SFTTask, Task


def get_task(name: str, **options: object) -> Task:
    """Build a task by name with keyword `options`.

    `add`/`copy`/`reverse` are built in (`list_tasks`); `chain` is multi-step arithmetic
    with a written chain of thought (`tropd.tasks.reasoning`); `file` (option `path`) or
    `jsonl:PATH`, `parquet:PATH`, `csv:PATH`, `hf:PATH` read prompts from disk;
    `reasoning_gym:NAME[,NAME...]` draws from reasoning-gym generators; `humaneval`
    is the HumanEval code benchmark. An unknown name or option is a `ValueError`.
    """
    if name == "humaneval":
        return HumanEvalTask.from_options(**options)
    if name.startswith("reasoning_gym:"):
        return ReasoningGymTask.from_options(name.removeprefix("reasoning_gym:"), **options)
    if name == "chain":
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
