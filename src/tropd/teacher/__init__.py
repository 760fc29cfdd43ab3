"""Teacher scoring: fill a `TokenBatch` with the teacher's view of every response token."""

from __future__ import annotations

import torch

from tropd.batch import PROMPT, TokenBatch
from tropd.head import cache_argument, final_hidden_states, head_logits, hidden_only

CHUNK_BYTES = 64 * 2**20  # fp32 logits per scoring chunk at most (a few such temporaries)


def _vocab(model) -> int:
    head = model.get_output_embeddings()
    return head.weight.shape[0] if head is not None else model.config.vocab_size


@torch.no_grad()
def score_batch(
    model,
    batch: TokenBatch,
    top_k: int,
    chunk_size: int = 1024,
    entropy: bool = True,
) -> TokenBatch:
    """Teacher log-prob of each response token, top-k ids/log-probs, and entropy.

    Only response positions (origin > 0) are scored, `chunk_size` positions at a time (fewer
    where `[chunk_size, V]` fp32 logits would pass `CHUNK_BYTES`), so the largest fp32
    tensors are `[chunk, V]`, never `[B, T, V]`. Top-k log-probs are
    full-vocabulary log-probs (not renormalised). Non-response positions hold 0 (ids 0).
    Returns a new batch with `teacher_logprobs [B, T]`, `teacher_topk_ids [B, T, K]`,
    `teacher_topk_logprobs [B, T, K]` and `teacher_entropy [B, T]`; `top_k=0` leaves the
    top-k fields None and `entropy=False` the entropy (a method that reads neither).

    When the batch carries this model's `teacher_cache` (it wrote the prefixes), the
    prompt and prefix of those rows are not run again (`predicting_states`). The batch may
    be on another device than the model: it is scored on the model's and returned on its
    own.
    """
    home = batch.tokens.device
    batch = batch.to(next(model.parameters()).device)
    bsz, length = batch.tokens.shape
    positions = batch.response_mask.nonzero(as_tuple=True)
    targets = batch.tokens[positions]
    n, device = targets.numel(), batch.tokens.device
    token_lp = torch.zeros(n, device=device)
    top_lp = torch.zeros(n, top_k, device=device)
    top_ids = torch.zeros(n, top_k, dtype=torch.long, device=device)
    ent = torch.zeros(n, device=device)
    predicting = predicting_states(model, batch, positions)
    chunk_size = min(chunk_size, max(1, CHUNK_BYTES // (4 * _vocab(model))))
    for start in range(0, n, chunk_size):
        part = slice(start, start + chunk_size)
        logits = head_logits(model, predicting[part])  # fp32 (a bf16 product under autocast)
        with torch.autocast(device.type, enabled=False):  # the rest in fp32
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
        teacher_cache=None,
    ).to(home)


def predicting_states(
    model, batch: TokenBatch, positions: tuple[torch.Tensor, torch.Tensor]
) -> torch.Tensor:
    """The final hidden states `[N, H]` that predict the tokens at `positions` (`(rows
    [N], cols [N])`, token t predicted at t - 1), from one forward over the batch.

    Rows whose prefix `model` wrote (the batch's unused `teacher_cache`) take the states of
    their prompt and prefix from that generation and run only the student's continuation,
    on top of the KV cache: the cache keeps the prompt and all prefix tokens but the last,
    which is fed again with the continuation (so a prefix of any length, 0 included, is
    handled alike). The states agree with a full forward to float rounding."""
    rows, cols = positions
    cache = batch.teacher_cache
    if not _usable(cache, model, batch):
        return final_hidden_states(model, batch.tokens, batch.attention_mask)[rows, cols - 1]
    cache.used = True
    state, device = cache.state, batch.tokens.device
    bsz = len(batch)
    slot = torch.full((bsz,), -1, dtype=torch.long, device=device)  # batch row -> cache row
    slot[cache.rows] = torch.arange(len(cache.rows), device=device)
    out = state.hidden.new_empty(rows.numel(), state.hidden.shape[-1])

    plain = (slot < 0).nonzero(as_tuple=True)[0]
    if plain.numel():
        sub = batch.select(plain).trim()
        hidden = final_hidden_states(model, sub.tokens, sub.attention_mask)
        where = slot[rows] < 0
        index = torch.zeros(bsz, dtype=torch.long, device=device)
        index[plain] = torch.arange(plain.numel(), device=device)
        out[where] = hidden[index[rows[where]], cols[where] - 1]

    guided = torch.tensor(cache.rows, device=device)
    real = batch.attention_mask[guided].bool()
    prompt = (real & (batch.origin[guided] == PROMPT)).sum(-1)  # [G]
    prefix = batch.teacher_mask[guided].sum(-1)
    student = batch.student_mask[guided].sum(-1)
    # Prefix tokens: the generation's own states (step k predicts generated token k).
    where = (slot[rows] >= 0) & batch.teacher_mask[rows, cols]
    j = slot[rows[where]]
    out[where] = state.hidden[j, cols[where] - prompt[j]]
    # Continuations: inputs from the last context token on, positions after it.
    where = (slot[rows] >= 0) & batch.student_mask[rows, cols]
    if where.any():
        start = prompt + prefix - 1  # [G] position of the last prompt/prefix token
        width = int(student.max())
        steps = torch.arange(width, device=device)
        index = (start[:, None] + steps).clamp(max=batch.tokens.shape[1] - 1)
        inputs = batch.tokens[guided].gather(1, index)
        # A row without a continuation still runs one (discarded) token.
        fed = (steps < student.clamp(min=1)[:, None]).long()
        columns = torch.arange(state.attention.shape[1], device=device)
        kept = state.attention * (columns < state.prompt_width + prefix[:, None] - 1)
        hidden = _continue(model, state.cache, inputs, torch.cat([kept, fed], 1), start)
        j = slot[rows[where]]
        out[where] = hidden[j, cols[where] - start[j] - 1]
    return out


def _usable(cache, model, batch: TokenBatch) -> bool:
    """Whether `cache` (a `TeacherCache` or None) was left by `model` for this batch, has not
    been read, and holds one column per token fed (no sliding window dropped any)."""
    if cache is None or cache.used or cache.state.model is not model:
        return False
    state = cache.state
    return (
        state.cache.get_seq_length() == state.attention.shape[1]
        and state.hidden.device == batch.tokens.device
        and max(cache.rows) < len(batch)
    )


def _continue(model, cache, inputs: torch.Tensor, attention: torch.Tensor, start: torch.Tensor):
    """Final hidden states `[G, M, H]` of `inputs [G, M]` at positions `start + 0 .. M-1`,
    attending to the cache columns `attention` marks (its first columns) and to themselves."""
    positions = start[:, None] + torch.arange(inputs.shape[1], device=inputs.device)
    out = hidden_only(
        model,
        input_ids=inputs,
        attention_mask=attention,
        position_ids=positions,
        use_cache=True,
        **{cache_argument(model): cache},
    )
    return out.hidden_states[-1]
