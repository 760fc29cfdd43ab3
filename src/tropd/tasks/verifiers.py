"""Verifiers: is a response right? Exact match, math answers, and code run against tests.

`get_verifier(name)` returns a function `(response, item) -> float` in [0, 1].

Code runs in an OS-level sandbox (bubblewrap), `tropd.tasks.sandbox.run_program`; see there
for what it does and does not protect against.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable

from tropd.tasks.sandbox import Limits, run_program
from tropd.tasks.task import Item

Verifier = Callable[[str, Item], float]

ANSWER_TAG = re.compile(r"<answer>\s?(.*?)\s?</answer>", re.DOTALL)
CODE_BLOCK = re.compile(r"```(?:python|py|Python)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)


def tagged_answer(response: str) -> str | None:
    """The text of the last `<answer>...</answer>` in `response`, stripped; None if none."""
    found = ANSWER_TAG.findall(response)
    return found[-1].strip() if found else None


def exact_score(response: str, item: Item) -> float:
    """1.0 when the (tagged, else whole) response equals the answer, spaces stripped."""
    answer = tagged_answer(response)
    text = answer if answer is not None else response
    return 1.0 if text.strip() == item.answer.strip() else 0.0


# --- math ------------------------------------------------------------------------


def _math_verify():
    try:
        import math_verify
    except ImportError:
        raise ValueError(
            "the math verifier needs math-verify; install it with pip install 'tropd[tasks]'"
        ) from None
    return math_verify


def math_equal(response: str, answer: str) -> bool:
    """Whether the final answer in `response` equals `answer` mathematically.

    The answer is the `<answer>` tag when there is one, else what math-verify
    extracts (`\\boxed{}` first, then the last expression): `1/2`, `0.5` and
    `\\frac{1}{2}` are all equal. math-verify's own timeouts use `signal.alarm`, which
    works only in the main thread; elsewhere they are off.
    """
    mv = _math_verify()
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    tagged = tagged_answer(response)
    target = mv.parse(tagged if tagged is not None else response, parsing_timeout=timeout)
    gold = mv.parse(answer, parsing_timeout=timeout)
    if not gold or not target:
        return False
    return bool(mv.verify(gold, target, timeout_seconds=timeout))


def math_score(response: str, item: Item) -> float:
    return 1.0 if math_equal(response, item.answer) else 0.0


# --- code ------------------------------------------------------------------------


def extract_code(response: str) -> str:
    """The program in a response: the longest fenced code block, else the whole text."""
    blocks = CODE_BLOCK.findall(response)
    return max(blocks, key=len) if blocks else response


def code_score(response: str, item: Item, limits: Limits | None = None) -> float:
    """1.0 when the program in `response`, followed by `item.tests`, runs to its end in the
    sandbox (`tropd.tasks.sandbox.run_program`: exiting early does not count).

    A response that does not define the item's `entry_point` (in `item.meta`) is
    taken as a completion of the prompt's code, as in HumanEval.
    """
    if item.tests is None:
        raise ValueError("the code verifier needs test code; map a tests field for this task")
    code = extract_code(response)
    entry = item.meta.get("entry_point")
    if entry and not re.search(rf"^\s*def\s+{re.escape(entry)}\s*\(", code, re.MULTILINE):
        code = item.meta.get("code_prompt", item.prompt) + code
    elif "code_prompt" in item.meta:
        # Keep the prompt's imports (HumanEval prompts start with them).
        imports = [
            line
            for line in item.meta["code_prompt"].splitlines()
            if line.startswith(("import ", "from "))
        ]
        code = "\n".join([*imports, code])
    return 1.0 if run_program(f"{code}\n\n{item.tests}\n", limits).passed else 0.0


VERIFIERS: dict[str, Verifier] = {
    "exact": exact_score,
    "math": math_score,
    "code": code_score,
}


def get_verifier(name: str) -> Verifier:
    """The verifier called `name` (exact, math or code)."""
    if name not in VERIFIERS:
        raise ValueError(f"unknown verifier {name!r}; use one of {', '.join(VERIFIERS)}")
    return VERIFIERS[name]
