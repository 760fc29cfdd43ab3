"""The trainer's evaluation hook: the exact reverse KL against full-vocabulary logits."""

from __future__ import annotations

import pytest
import torch

from tropd.batch import align_logits
from tropd.model_names import load_model
from tropd.rollout import Generation, HFEngine, SamplingParams, collect_rollouts
from tropd.tasks import Item
from tropd.tasks.tokenizer import build_char_tokenizer
from tropd.train.heldout import heldout_metrics, reverse_kl


@pytest.mark.parametrize("chunk", [3, 1024])
def test_reverse_kl_is_the_full_vocabulary_kl_on_student_tokens(tiny_pair, chunk: int) -> None:
    teacher = load_model(tiny_pair[0], "float32", "cpu")
    student = load_model(tiny_pair[1], "float32", "cpu")
    torch.manual_seed(0)
    engine = HFEngine(student, pad_token_id=0, eos_token_id=2)
    batch = collect_rollouts(engine, [[5, 6, 7], [8, 9, 10, 11]], SamplingParams(9), 3, 0)
    with torch.no_grad():
        lp_s, lp_t = (
            torch.log_softmax(
                align_logits(m(input_ids=batch.tokens, attention_mask=batch.attention_mask).logits),
                -1,
            )
            for m in (student, teacher)
        )
    per_token = (lp_s.exp() * (lp_s - lp_t)).sum(-1)[batch.student_mask]
    assert per_token.numel() > 0
    expected = float(per_token.mean())
    assert reverse_kl(student, teacher, batch, chunk) == pytest.approx(expected, rel=1e-5)
    assert reverse_kl(student, student, batch, chunk) == pytest.approx(0.0, abs=1e-6)


class _CountingEngine:
    """Answers prompt i with the i-th of `replies` on each call to `generate` (one per
    row, samples of a prompt in a row), so every accuracy below is known exactly."""

    def __init__(self, replies: list[str], tokenizer):
        self.replies, self.tokenizer = replies, tokenizer

    def generate(self, prompts, params):
        per_row = params if isinstance(params, list) else [params] * len(prompts)
        out = []
        for index, _ in enumerate(per_row):
            ids = self.tokenizer.encode(self.replies[index % len(self.replies)])
            out.append(Generation(ids, [0.0] * len(ids), False))
        return out


def test_sampled_and_per_domain_accuracies():
    class Exact:
        def score(self, response: str, item: Item) -> float:
            return float(response == item.answer)

    tokenizer = build_char_tokenizer("0123456789")
    items = [
        Item("a", "1", meta={"domain": "add"}),
        Item("b", "2", meta={"domain": "add"}),
        Item("c", "3", meta={"domain": "sub"}),
    ]
    prompts = [tokenizer.encode(i.prompt) for i in items]
    # greedy: one reply per item ("1", "9", "3"); sampled: 2 per item, rows in order
    # ("1", "9", "3", "1", "9", "3") -> item a: "1", "9"; b: "3", "1"; c: "9", "3"
    engine = _CountingEngine(["1", "9", "3"], tokenizer)
    scores = heldout_metrics(
        None, None, engine, tokenizer, Exact(), items, prompts, 4, 0.0, samples=2
    )
    assert scores["eval/accuracy"] == pytest.approx(2 / 3)
    assert scores["eval/accuracy/add"] == pytest.approx(1 / 2)
    assert scores["eval/accuracy/sub"] == pytest.approx(1.0)
    assert scores["eval/sampled_accuracy"] == pytest.approx(2 / 6)
    assert scores["eval/sampled_accuracy/add"] == pytest.approx(1 / 4)
    assert scores["eval/sampled_accuracy/sub"] == pytest.approx(1 / 2)
    assert "eval/reverse_kl" not in scores  # no teacher
