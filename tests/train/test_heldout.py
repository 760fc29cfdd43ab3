"""The trainer's evaluation hook: the exact reverse KL against full-vocabulary logits."""

from __future__ import annotations

import pytest
import torch

from tropd.batch import align_logits
from tropd.model_names import load_model
from tropd.rollout import HFEngine, SamplingParams, collect_rollouts
from tropd.train.heldout import reverse_kl


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
