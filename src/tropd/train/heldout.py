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
    samples: int = 1,
) -> dict[str, float]:
    """Held-out scores of the student:

    - `eval/accuracy`: the task's verifier on one response per item, sampled at
      `temperature` (0 = greedy);
    - `eval/sampled_accuracy` (when `samples` > 1): the verifier's mean over `samples`
      responses per item at temperature 1;
    - `eval/reverse_kl`: exact per-token reverse KL along those temperature-1 samples; left
      out when `teacher` is None (a teacher server gives no full distributions);
    - `eval/accuracy/<domain>` (and `eval/sampled_accuracy/<domain>`) for items that carry
      a `meta["domain"]`.
    """
    pad = tokenizer.pad_token_id
    answers = engine.generate(prompts, SamplingParams(max_new_tokens, temperature, 1.0))
    correct = score_responses(task, items, [_text(tokenizer, g.tokens) for g in answers])
    result = {
        **_accuracies("eval/accuracy", items, correct),
        "eval/response_len": sum(len(g.tokens) for g in answers) / len(answers),
    }
    if teacher is None and samples <= 1:
        return result
    sampled = collect_rollouts(
        engine, prompts, SamplingParams(max_new_tokens, 1.0, 1.0), samples, pad
    )
    if samples > 1:
        rows = [item for item in items for _ in range(samples)]
        texts = [
            _text(tokenizer, sampled.tokens[i][sampled.student_mask[i]].tolist())
            for i in range(len(sampled))
        ]
        result.update(
            _accuracies("eval/sampled_accuracy", rows, score_responses(task, rows, texts))
        )
    if teacher is not None:
        device = next(student.parameters()).device
        result["eval/reverse_kl"] = reverse_kl(student, teacher, sampled.to(device), chunk_size)
    return result


def _text(tokenizer, tokens: list[int]) -> str:
    return tokenizer.decode(tokens, skip_special_tokens=True)


def _accuracies(name: str, items: list, correct: list[float]) -> dict[str, float]:
    """`name`: mean of `correct`; `name/<domain>`: the mean over items of each domain."""
    out = {name: sum(correct) / len(correct)}
    domains: dict[str, list[float]] = {}
    for item, score in zip(items, correct, strict=True):
        if "domain" in item.meta:
            domains.setdefault(item.meta["domain"], []).append(score)
    out.update({f"{name}/{d}": sum(v) / len(v) for d, v in sorted(domains.items())})
    return out
