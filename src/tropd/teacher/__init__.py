"""Teacher scoring: fill a `TokenBatch` with the teacher's view of every response token."""

from __future__ import annotations

import torch

from tropd.batch import TokenBatch


def final_hidden_states(model, tokens: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The decoder's last hidden states `[B, T, H]`, without the LM head."""
    return model.base_model(input_ids=tokens, attention_mask=attention_mask).last_hidden_state


def head_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """LM-head logits in fp32 for hidden states `[N, H]` -> `[N, V]`, with the model's
    final-logit soft-capping when it has one (Gemma-style)."""
    logits = model.get_output_embeddings()(hidden).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


@torch.no_grad()
def score_batch(
    model,
    batch: TokenBatch,
    top_k: int,
    chunk_size: int = 1024,
    entropy: bool = True,
) -> TokenBatch:
    """Teacher log-prob of each response token, top-k ids/log-probs, and entropy.

    Only response positions (origin > 0) are scored, `chunk_size` positions at a time, so
    the largest fp32 tensors are `[chunk_size, V]`, never `[B, T, V]`. Top-k log-probs are
    full-vocabulary log-probs (not renormalised). Non-response positions hold 0 (ids 0).
    Returns a new batch with `teacher_logprobs [B, T]`, `teacher_topk_ids [B, T, K]`,
    `teacher_topk_logprobs [B, T, K]` and `teacher_entropy [B, T]`; `top_k=0` leaves the
    top-k fields None and `entropy=False` the entropy (a method that reads neither).
    """
    bsz, length = batch.tokens.shape
    hidden = final_hidden_states(model, batch.tokens, batch.attention_mask)
    rows, cols = batch.response_mask.nonzero(as_tuple=True)
    # The distribution over token t is produced at position t - 1 (responses never start at 0).
    predicting = hidden[rows, cols - 1]
    targets = batch.tokens[rows, cols]
    n = rows.numel()
    token_lp = torch.zeros(n, device=hidden.device)
    top_lp = torch.zeros(n, top_k, device=hidden.device)
    top_ids = torch.zeros(n, top_k, dtype=torch.long, device=hidden.device)
    ent = torch.zeros(n, device=hidden.device)
    for start in range(0, n, chunk_size):
        part = slice(start, start + chunk_size)
        logits = head_logits(model, predicting[part])
        lse = logits.logsumexp(-1, keepdim=True)
        token_lp[part] = (logits.gather(-1, targets[part, None]) - lse).squeeze(-1)
        if top_k:
            top = logits.topk(top_k, dim=-1)
            top_lp[part], top_ids[part] = top.values - lse, top.indices
        if entropy:
            probs = (logits - lse).exp_()
            ent[part] = lse.squeeze(-1) - torch.linalg.vecdot(probs, logits)
        del logits

    def scatter(values: torch.Tensor, *tail: int, dtype=torch.float32) -> torch.Tensor:
        out = torch.zeros(bsz, length, *tail, dtype=dtype, device=hidden.device)
        out[rows, cols] = values
        return out

    return batch.replace(
        teacher_logprobs=scatter(token_lp),
        teacher_topk_ids=scatter(top_ids, top_k, dtype=torch.long) if top_k else None,
        teacher_topk_logprobs=scatter(top_lp, top_k) if top_k else None,
        teacher_entropy=scatter(ent) if entropy else None,
    )
