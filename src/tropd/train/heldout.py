"""The trainer's evaluation hook on held-out prompts: verifier accuracy and the exact
reverse KL to the teacher (`eval/*` in metrics.jsonl)."""

from __future__ import annotations

import torch

from tropd.batch import TokenBatch
from tropd.head import chunked_head_logits
from tropd.rollout import Engine, SamplingParams, collect_rollouts
from tropd.task_eval import score_responses


@torch.no_grad()
def reverse_kl(student, teacher, batch: TokenBatch, chunk_size: int = 1024) -> float:
    """Mean over student tokens of the exact `KL(pi_S || pi_T)` over the full vocabulary
    at each position (not the sampled K1 estimate), in nats per token."""
    positions = batch.student_mask.nonzero(as_tuple=True)
    if positions[0].numel() == 0:
        return 0.0
    both = [
        chunked_head_logits(model, batch.tokens, batch.attention_mask, positions, chunk_size)
        for model in (student, teacher)
    ]
    total = 0.0
    for (_, student_logits), (_, teacher_logits) in zip(*both, strict=True):
        lp_s = torch.log_softmax(student_logits, -1)
        lp_t = torch.log_softmax(teacher_logits, -1)
        total += float((lp_s.exp() * (lp_s - lp_t)).sum())
    return total / positions[0].numel()


def heldout_metrics(
    student,
    teacher,
    engine: Engine,
    tokenizer,
    task,
    items: list,
    prompts: list[list[int]],
    max_new_tokens: int,
    temperature: float,
    chunk_size: int = 1024,
) -> dict[str, float]:
    """`eval/accuracy`: the task's verifier on one response per held-out item, sampled at
    `temperature` (0 = greedy). `eval/reverse_kl`: exact per-token reverse KL along
    temperature-1 student samples of the same prompts; left out when `teacher` is None (a
    teacher server gives no full distributions)."""
    pad = tokenizer.pad_token_id
    answers = engine.generate(prompts, SamplingParams(max_new_tokens, temperature, 1.0))
    texts = [tokenizer.decode(g.tokens, skip_special_tokens=True) for g in answers]
    correct = score_responses(task, items, texts)
    result = {
        "eval/accuracy": sum(correct) / len(correct),
        "eval/response_len": sum(len(g.tokens) for g in answers) / len(answers),
    }
    if teacher is not None:
        sampled = collect_rollouts(
            engine, prompts, SamplingParams(max_new_tokens, 1.0, 1.0), 1, pad
        )
        device = next(student.parameters()).device
        result["eval/reverse_kl"] = reverse_kl(student, teacher, sampled.to(device), chunk_size)
    return result
