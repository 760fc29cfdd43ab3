"""`chain`: multi-step arithmetic solved with a written chain of thought.

Prompt "7+5-3=" (operations applied left to right), gold response in the default
`forward` style::

    7+5=12;12-3=9
    answer: 9

The verifier reads only the final line `answer: N`; how the steps are written is
free. That is what makes the task a test bed for teacher/student mismatch: a teacher
trained on one chain-of-thought style and a student trained on another agree on the
answers but not on the tokens that lead there (`tropd.recipes.mismatch`).

Difficulty knobs: the number of operations (`min_steps..max_steps`), the operand size
(`max_operand`), the range every intermediate value stays in (`0..max_value`) and the
operators (`ops`, any of `+-*`). Splits and seeding work as for the other built-in
tasks (`tropd.tasks.builtin`): a problem belongs to one split by a hash of its prompt.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
import re
from dataclasses import dataclass
from typing import ClassVar

from tropd.tasks.task import Item

SPLITS = ("train", "eval")
EVAL_PERCENT = 10  # share of the problem space that belongs to the eval split
OPERATORS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
DOMAINS = {"+": "add", "-": "sub", "*": "mul"}  # a one-operator chain's domain name
ANSWER_PREFIX = "answer: "
_ANSWER = re.compile(r"answer:\s*(-?\d+)\s*$")


def _forward(steps: list[tuple[int, str, int, int]]) -> str:
    return ";".join(f"{a}{op}{b}={c}" for a, op, b, c in steps)


def _backward(steps: list[tuple[int, str, int, int]]) -> str:
    return ";".join(f"{c}={a}{op}{b}" for a, op, b, c in steps)


def _spaced(steps: list[tuple[int, str, int, int]]) -> str:
    return ", ".join(f"{a} {op} {b} = {c}" for a, op, b, c in steps)


STYLES = {"forward": _forward, "backward": _backward, "spaced": _spaced}
"""Chain-of-thought styles, each a function of the steps `(a, op, b, result)`:
`forward` "7+5=12;12-3=9", `backward` (result first) "12=7+5;9=12-3", `spaced`
"7 + 5 = 12, 12 - 3 = 9". Every style ends with the line "answer: N"."""


@dataclass(frozen=True)
class ChainTask:
    """Left-to-right arithmetic chains with a written chain of thought.

    Each problem draws a start value in `0..max_value`, then `min_steps..max_steps`
    operations, each an operator from `ops` and an operand in `1..max_operand`
    (`2..max_operand` for `*`) chosen so every intermediate value stays in
    `0..max_value`. `style` picks how `gold_response` writes the steps (`STYLES`).
    With `domains` (e.g. "+-"), each problem first draws one operator of `domains` and
    uses only it (a domain: `add`, `sub` or `mul`, recorded in `item.meta["domain"]`),
    so a model can be trained or evaluated per domain.
    """

    name: ClassVar[str] = "chain"
    min_steps: int = 2
    max_steps: int = 4
    max_operand: int = 9
    max_value: int = 99
    ops: str = "+-"
    style: str = "forward"
    domains: str = ""

    def __post_init__(self) -> None:
        if not 1 <= self.min_steps <= self.max_steps:
            raise ValueError(
                f"chain: need 1 <= min_steps <= max_steps, got {self.min_steps} and "
                f"{self.max_steps}"
            )
        if not 2 <= self.max_operand <= self.max_value:
            raise ValueError(
                f"chain: need 2 <= max_operand <= max_value, got {self.max_operand} and "
                f"{self.max_value}"
            )
        if not self.ops or set(self.ops) - set(OPERATORS) or len(set(self.ops)) != len(self.ops):
            raise ValueError(f"chain: ops must be distinct characters of +-*, got {self.ops!r}")
        if set(self.domains) - set(OPERATORS) or len(set(self.domains)) != len(self.domains):
            raise ValueError(
                f"chain: domains must be distinct characters of +-*, got {self.domains!r}"
            )
        if self.style not in STYLES:
            raise ValueError(f"chain: unknown style {self.style!r}; use one of {', '.join(STYLES)}")

    @property
    def alphabet(self) -> str:
        """Every character of every style, so models trained on different styles share
        one tokenizer."""
        return "0123456789+-*=;, \n" + ANSWER_PREFIX

    def _step(self, value: int, ops: str, rng: random.Random) -> tuple[str, int]:
        """An operator of `ops` and an operand that keep `value` inside `0..max_value`."""
        for _ in range(100):
            op = rng.choice(ops)
            operand = rng.randint(2 if op == "*" else 1, self.max_operand)
            if 0 <= OPERATORS[op](value, operand) <= self.max_value:
                return op, operand
        # Only reached with ops="*" from a large value, or "-" alone from 0: add/subtract.
        return ("-", 1) if value > 0 else ("+", 1)

    def _make_item(self, rng: random.Random) -> Item:
        ops = rng.choice(self.domains) if self.domains else self.ops
        value = rng.randint(0, self.max_value)
        prompt = str(value)
        for _ in range(rng.randint(self.min_steps, self.max_steps)):
            op, operand = self._step(value, ops, rng)
            prompt += f"{op}{operand}"
            value = OPERATORS[op](value, operand)
        meta = {"domain": DOMAINS[ops]} if self.domains else {}
        return Item(prompt=prompt + "=", answer=str(value), meta=meta)

    def items(self, split: str, n: int, seed: int) -> list[Item]:
        """`n` items of `split`, drawn by rejection on the split of each prompt."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
        rng = random.Random(f"{self.name}:{split}:{seed}")
        items: list[Item] = []
        for _ in range(max(0, n) * 1000 + 10_000):
            if len(items) >= n:
                return items
            item = self._make_item(rng)
            if split_of(item.prompt) == split:
                items.append(item)
        raise ValueError(
            f"task 'chain' has (almost) no {split} problems with these options; allow more "
            "problems (more steps, larger operands or values)"
        )

    def score(self, response: str, item: Item) -> float:
        """1.0 if the response's last line is `answer: <the right number>`, else 0.0."""
        match = _ANSWER.search(response.strip())
        return 1.0 if match is not None and match.group(1) == item.answer else 0.0

    def gold_response(self, item: Item) -> str:
        return write_chain(parse_steps(item.prompt), self.style)

    def with_style(self, style: str) -> ChainTask:
        """The same problems written in another chain-of-thought style."""
        return dataclasses.replace(self, style=style)


def split_of(prompt: str) -> str:
    """The split a prompt belongs to, by a hash of its text (whatever the seed)."""
    digest = hashlib.sha256(prompt.encode()).digest()
    return "eval" if int.from_bytes(digest[:8], "big") % 100 < EVAL_PERCENT else "train"


def parse_steps(prompt: str) -> list[tuple[int, str, int, int]]:
    """The steps `(a, op, b, result)` of a prompt like "7+5-3=", applied left to right."""
    tokens = re.findall(r"\d+|[+\-*]", prompt.removesuffix("="))
    value, steps = int(tokens[0]), []
    for op, operand in zip(tokens[1::2], tokens[2::2], strict=True):
        result = OPERATORS[op](value, int(operand))
        steps.append((value, op, int(operand), result))
        value = result
    return steps


def write_chain(steps: list[tuple[int, str, int, int]], style: str) -> str:
    """The chain of thought of `steps` in `style`, then the line "answer: N"."""
    if style not in STYLES:
        raise ValueError(f"chain: unknown style {style!r}; use one of {', '.join(STYLES)}")
    return f"{STYLES[style](steps)}\n{ANSWER_PREFIX}{steps[-1][3]}"


def option_names() -> list[str]:
    return [f.name for f in dataclasses.fields(ChainTask)]


def make_chain_task(**options: object) -> ChainTask:
    """`ChainTask(**options)`; an unknown option is a `ValueError` listing the valid ones."""
    unknown = sorted(set(options) - set(option_names()))
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(unknown)} for task 'chain'; "
            f"valid options: {', '.join(option_names())}"
        )
    return ChainTask(**options)
