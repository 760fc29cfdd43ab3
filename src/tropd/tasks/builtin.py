"""Built-in synthetic tasks with exact verifiers: `add`, `copy`, `reverse`.

They are small enough for a model of a few hundred thousand parameters to learn on
a CPU in minutes, which makes them the end-to-end demo and the test bed.

Train and eval are split by a hash of the problem (for `add`, of the unordered
operand pair, so `a+b` and `b+a` share a split), so a problem belongs to exactly
one split whatever the seed; within a split, items are drawn with replacement from
a `random.Random` seeded by (task, split, seed), so the same call gives the same list.
"""

import dataclasses
import hashlib
import random
import string
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from tropd.tasks.task import Item, SFTTask

SPLITS = ("train", "eval")
EVAL_PERCENT = 10  # share of the problem space that belongs to the eval split
MAX_LENGTH = 1000  # longest operand or string (far beyond a small model's context)


def _split_of(problem: str) -> str:
    digest = hashlib.sha256(problem.encode()).digest()
    return "eval" if int.from_bytes(digest[:8], "big") % 100 < EVAL_PERCENT else "train"


def _exact_score(response: str, item: Item) -> float:
    return 1.0 if response.strip() == item.answer else 0.0


def _draw(
    make_item: Callable[[random.Random], tuple[Item, str]],
    name: str,
    split: str,
    n: int,
    seed: int,
) -> list[Item]:
    """Draw `n` items of `split` by rejection.

    `make_item(rng)` proposes an item and the key of its problem, which decides the split.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(f"{name}:{split}:{seed}")
    items: list[Item] = []
    # A split holds about EVAL_PERCENT% (or the rest) of the problems; this many
    # misses in a row means it is (nearly) empty for these task options.
    misses, max_misses = 0, 10_000
    while len(items) < n:
        item, problem = make_item(rng)
        if _split_of(problem) == split:
            items.append(item)
            misses = 0
        else:
            misses += 1
            if misses > max_misses:
                raise ValueError(
                    f"task {name!r} has (almost) no {split} problems with these options; "
                    "allow more problems (longer operands or strings)"
                )
    return items


@dataclass(frozen=True)
class AddTask:
    """Integer addition: prompt "57+384=", answer "441".

    Each operand first draws its number of digits uniformly from 1..`digits`, then
    its value uniformly among numbers of that length, so short and long operands
    are equally common.
    """

    name: ClassVar[str] = "add"
    alphabet: ClassVar[str] = "0123456789+="
    digits: int = 3

    def __post_init__(self) -> None:
        if not 1 <= self.digits <= MAX_LENGTH:
            raise ValueError(f"add: digits must be in 1..{MAX_LENGTH}, got {self.digits}")

    def _operand(self, rng: random.Random) -> int:
        length = rng.randint(1, self.digits)
        return rng.randint(0 if length == 1 else 10 ** (length - 1), 10**length - 1)

    def _make_item(self, rng: random.Random) -> tuple[Item, str]:
        a, b = self._operand(rng), self._operand(rng)
        return Item(prompt=f"{a}+{b}=", answer=str(a + b)), f"{min(a, b)}+{max(a, b)}"

    def items(self, split: str, n: int, seed: int) -> list[Item]:
        return _draw(self._make_item, self.name, split, n, seed)

    def score(self, response: str, item: Item) -> float:
        return _exact_score(response, item)

    def gold_response(self, item: Item) -> str:
        return item.answer


@dataclass(frozen=True)
class StringTask:
    """Copy or reverse a short lowercase string: prompt "reverse:abc=", answer "cba".

    Lengths are uniform in `min_length..max_length`, letters uniform over the
    first `letters` lowercase letters.
    """

    name: str
    min_length: int = 2
    max_length: int = 6
    letters: int = 26

    def __post_init__(self) -> None:
        if self.name not in ("copy", "reverse"):
            raise ValueError(f"string task must be copy or reverse, got {self.name!r}")
        if not 1 <= self.min_length <= self.max_length <= MAX_LENGTH:
            raise ValueError(
                f"{self.name}: need 1 <= min_length <= max_length <= {MAX_LENGTH}, "
                f"got {self.min_length} and {self.max_length}"
            )
        if not 2 <= self.letters <= 26:
            raise ValueError(f"{self.name}: letters must be in 2..26, got {self.letters}")

    @property
    def alphabet(self) -> str:
        return string.ascii_lowercase + ":="

    def _make_item(self, rng: random.Random) -> tuple[Item, str]:
        length = rng.randint(self.min_length, self.max_length)
        text = "".join(rng.choice(string.ascii_lowercase[: self.letters]) for _ in range(length))
        answer = text if self.name == "copy" else text[::-1]
        return Item(prompt=f"{self.name}:{text}=", answer=answer), text

    def items(self, split: str, n: int, seed: int) -> list[Item]:
        return _draw(self._make_item, self.name, split, n, seed)

    def score(self, response: str, item: Item) -> float:
        return _exact_score(response, item)

    def gold_response(self, item: Item) -> str:
        return item.answer


# name -> (class, fixed constructor arguments)
_TASKS: dict[str, tuple[type, dict[str, str]]] = {
    "add": (AddTask, {}),
    "copy": (StringTask, {"name": "copy"}),
    "reverse": (StringTask, {"name": "reverse"}),
}


def _option_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.init and f.name != "name"]


def list_tasks() -> list[str]:
    """Names of the built-in tasks."""
    return sorted(_TASKS)


def task_options(task: SFTTask) -> dict[str, object]:
    """The options a built-in task was made with, e.g. `{"digits": 3}` (for cache keys)."""
    return {name: getattr(task, name) for name in _option_names(type(task))}


def builtin_task_class(name: str) -> type:
    """The class that builds the built-in task `name` (its fields are the options)."""
    return _TASKS[name][0]


def get_task(name: str, **options: object) -> SFTTask:
    """Build the built-in task `name` with keyword `options` (e.g. `digits=2` for add).

    An unknown name or option is a `ValueError` that lists the valid ones.
    """
    if name not in _TASKS:
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(list_tasks())}")
    cls, fixed = _TASKS[name]
    valid = _option_names(cls)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(unknown)} for task {name!r}; "
            f"valid options: {', '.join(valid)}"
        )
    return cls(**fixed, **options)
