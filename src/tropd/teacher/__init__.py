"""Teacher scoring: fill a `TokenBatch` with the teacher's view of every response token."""

from __future__ import annotations

import torch

from tropd.batch import TokenBatch
from tropd.head import chunked_head_logits


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
    positions = batch.response_mask.nonzero(as_tuple=True)
    targets = batch.tokens[positions]
    n, device = targets.numel(), batch.tokens.device
    token_lp = torch.zeros(n, device=device)
    top_lp = torch.zeros(n, top_k, device=device)
    top_ids = torch.zeros(n, top_k, dtype=torch.long, device=device)
    ent = torch.zeros(n, device=device)
    chunks = chunked_head_logits(model, batch.tokens, batch.attention_mask, positions, chunk_size)
    for part, logits in chunks:
        lse = logits.logsumexp(-1, keepdim=True)
        token_lp[part] = (logits.gather(-1, targets[part, None]) - lse).squeeze(-1)
        if top_k:
            top = logits.topk(top_k, dim=-1)
            top_lp[part], top_ids[part] = top.values - lse, top.indices
        if entropy:
            probs = (logits - lse).exp_()
            ent[part] = lse.squeeze(-1) - torch.linalg.vecdot(probs, logits)
        del logits  # the next chunk is formed before this name would be rebound

    def scatter(values: torch.Tensor, *tail: int, dtype=torch.float32) -> torch.Tensor:
        out = torch.zeros(bsz, length, *tail, dtype=dtype, device=device)
        out[positions] = values
        return out

    return batch.replace(
        teacher_logprobs=scatter(token_lp),
        teacher_topk_ids=scatter(top_ids, top_k, dtype=torch.long) if top_k else None,
        teacher_topk_logprobs=scatter(top_lp, top_k) if top_k else None,
        teacher_entropy=scatter(ent) if entropy else None,
    )
