"""reasoning-gym tasks: procedurally generated problems scored by the package's own verifiers.

`reasoning_gym:gsm_symbolic` is one generator; `reasoning_gym:gsm_symbolic,basic_arithmetic`
mixes several (multi-domain), each prompt drawn from a generator picked at random by
`weights` (default equal). `configs` passes generator settings, e.g.
`{basic_arithmetic: {min_terms: 2, max_terms: 2, max_digits: 1}}`.

A problem belongs to the eval split when a stable hash of its question says so
(`eval_fraction`), whatever the seed, so train and eval never share a question. The
answer is what the response puts in `<answer>...</answer>` tags; without tags it is
the whole response (`extract: tag`, reasoning-gym's convention) or its last number
(`extract: last_number`, for small chat models that explain instead of tagging).
Scoring is reasoning-gym's `score_answer` of the generator that made the problem
(some give partial credit in [0, 1]).
"""

from __future__ import annotations

import hashlib
import random
import re
from typing import Any

from tropd.tasks.task import Item
from tropd.tasks.verifiers import tagged_answer


def _reasoning_gym():
    try:
        import reasoning_gym
    except ImportError:
        raise ValueError(
            "reasoning_gym tasks need reasoning-gym; install it with pip install 'tropd[tasks]'"
        ) from None
    return reasoning_gym


EXTRACTS = ("tag", "last_number")
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?")


def _split_of(question: str, eval_fraction: float) -> str:
    digest = hashlib.sha256(question.encode()).digest()
    return "eval" if int.from_bytes(digest[:8], "big") / 2**64 < eval_fraction else "train"


class ReasoningGymTask:
    """Problems from one or more reasoning-gym generators (state: the generators)."""

    def __init__(
        self,
        datasets: list[str],
        configs: dict[str, dict[str, Any]] | None = None,
        weights: dict[str, float] | None = None,
        eval_fraction: float = 0.2,
        extract: str = "tag",
    ):
        rg = _reasoning_gym()
        from reasoning_gym.factory import DATASETS

        unknown = [d for d in datasets if d not in DATASETS]
        if not datasets or unknown:
            raise ValueError(
                f"unknown reasoning-gym dataset(s) {', '.join(unknown) or '(none given)'}; "
                "see reasoning_gym.factory.DATASETS for the names"
            )
        extra = sorted(set(configs or {}) - set(datasets)) + sorted(
            set(weights or {}) - set(datasets)
        )
        if extra:
            raise ValueError(f"reasoning_gym options name datasets not in the task: {extra}")
        if extract not in EXTRACTS:
            raise ValueError(f"unknown extract {extract!r}; use one of {', '.join(EXTRACTS)}")
        if not 0 < eval_fraction < 1:
            raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
        self.name = "reasoning_gym:" + ",".join(datasets)
        self.datasets = datasets
        self.configs = configs or {}
        self.weights = [float((weights or {}).get(d, 1.0)) for d in datasets]
        self.eval_fraction = eval_fraction
        self.extract = extract
        self._rg = rg
        for name in datasets:  # bad generator settings fail now, not mid-run
            self._generator(name, 0, 1)

    @classmethod
    def from_options(cls, names: str, **options: Any) -> ReasoningGymTask:
        valid = ("configs", "weights", "eval_fraction", "extract")
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise ValueError(
                f"unknown option(s) {', '.join(unknown)} for reasoning_gym tasks; "
                f"valid options: {', '.join(valid)}"
            )
        return cls([n.strip() for n in names.split(",") if n.strip()], **options)

    def _generator(self, name: str, seed: int, size: int):
        try:
            return self._rg.create_dataset(name, seed=seed, size=size, **self.configs.get(name, {}))
        except (TypeError, ValueError, AssertionError) as err:
            raise ValueError(f"reasoning_gym {name}: bad generator settings ({err})") from None

    def items(self, split: str, n: int, seed: int) -> list[Item]:
        """`n` problems of `split`, the generator of each picked by `weights` (seeded)."""
        if split not in ("train", "eval"):
            raise ValueError(f"unknown split {split!r}; use train or eval")
        rng = random.Random(f"{self.name}:{split}:{seed}")
        # Enough indices that rejection by split never runs out.
        size = max(64, int(4 * n / min(self.eval_fraction, 1 - self.eval_fraction)))
        generators = {d: self._generator(d, seed, size) for d in self.datasets}
        cursor = dict.fromkeys(self.datasets, 0)
        out: list[Item] = []
        while len(out) < n:
            name = rng.choices(self.datasets, weights=self.weights)[0]
            while True:
                if cursor[name] >= size:
                    raise ValueError(f"reasoning_gym {name}: too few {split} problems generated")
                entry = generators[name][cursor[name]]
                cursor[name] += 1
                if _split_of(entry["question"], self.eval_fraction) == split:
                    break
            out.append(Item(prompt=entry["question"], answer=str(entry["answer"]), meta=entry))
        return out

    def score(self, response: str, item: Item) -> float:
        """reasoning-gym's own score of the extracted answer."""
        answer = tagged_answer(response)
        if answer is None and self.extract == "last_number":
            numbers = NUMBER.findall(response)
            answer = numbers[-1].replace(",", "") if numbers else ""
        elif answer is None:
            answer = response.strip()
        source = item.meta["metadata"]["source_dataset"]
        return float(self._rg.get_score_answer_fn(source)(answer, item.meta))
