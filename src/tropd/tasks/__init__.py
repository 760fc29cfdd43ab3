"""Prompt sources and exact verifiers.

A task hands out `Item`s (a prompt and its reference answer) and scores a response
with a verifier. The built-in synthetic tasks also write the gold response used for
supervised fine-tuning (`SFTTask`). `get_task` builds a task by name: a built-in one,
a prompt file (`file`, `jsonl:PATH`, ...; see `tropd.tasks.sources`), reasoning-gym
generators (`reasoning_gym:NAME[,NAME...]`) or `humaneval`.
"""

import inspect
import typing
from collections.abc import Callable

from pydantic import TypeAdapter, ValidationError

from tropd.tasks.builtin import builtin_task_class, list_tasks
from tropd.tasks.builtin import get_task as get_builtin_task
from tropd.tasks.gym import ReasoningGymTask
from tropd.tasks.humaneval import HumanEvalTask
from tropd.tasks.reasoning import ChainTask, make_chain_task
from tropd.tasks.sources import make_source_task, source_kind
from tropd.tasks.task import Item, SFTTask, Task


def get_task(name: str, **options: object) -> Task:
    """Build a task by name with keyword `options`.

    `add`/`copy`/`reverse` are built in (`list_tasks`); `chain` is multi-step arithmetic
    with a written chain of thought (`tropd.tasks.reasoning`); `file` (option `path`) or
    `jsonl:PATH`, `parquet:PATH`, `csv:PATH`, `hf:PATH` read prompts from disk;
    `reasoning_gym:NAME[,NAME...]` draws from reasoning-gym generators; `humaneval`
    is the HumanEval code benchmark. An unknown name or option, or an option of the wrong
    type, is a `ValueError`.
    """
    if name == "humaneval":
        check_options(name, options, HumanEvalTask.from_options)
        return HumanEvalTask.from_options(**options)
    if name.startswith("reasoning_gym:"):
        check_options(name, options, ReasoningGymTask)
        return ReasoningGymTask.from_options(name.removeprefix("reasoning_gym:"), **options)
    if name == "chain":
        check_options(name, options, ChainTask)
        return make_chain_task(**options)
    if source_kind(name) is not None:
        check_options(name, options, make_source_task, strict_names=True)
        return make_source_task(name, **options)
    if name in list_tasks():
        check_options(name, options, builtin_task_class(name))
        return get_builtin_task(name, **options)
    raise ValueError(
        f"unknown task {name!r}; use a built-in task ({', '.join(list_tasks())}), chain, file "
        "(with options.path), jsonl:PATH, parquet:PATH, csv:PATH, hf:PATH, "
        "reasoning_gym:NAME[,NAME...] or humaneval"
    )


def check_options(
    name: str, options: dict[str, object], factory: Callable, strict_names: bool = False
) -> None:
    """Each option of task `name` is checked against the type annotation of the `factory`
    parameter of the same name (strictly: `digits: "3"` or `digits: true` is not 3), so a
    wrong value is one line naming `task.options.<key>`. With `strict_names`, an option
    the factory does not take is refused here (other factories list their own)."""
    parameters = inspect.signature(factory).parameters
    valid = [
        n
        for n, p in parameters.items()
        if n != "name" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]
    unknown = sorted(set(options) - set(valid))
    if strict_names and unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(unknown)} for task {name!r}; "
            f"valid options: {', '.join(valid)}"
        )
    hints = typing.get_type_hints(factory.__init__ if inspect.isclass(factory) else factory)
    for key, value in options.items():
        if key not in valid or key not in hints:
            continue
        try:
            TypeAdapter(hints[key]).validate_python(value, strict=True)
        except ValidationError as err:
            shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
            raise ValueError(
                f"task.options.{key}: {err.errors()[0]['msg'].lower()} for task {name!r} "
                f"(got {shown})"
            ) from None


__all__ = ["Item", "SFTTask", "Task", "get_task", "list_tasks"]
