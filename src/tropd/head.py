"""The LM head applied by tropd itself instead of inside the model's forward: the one
place that turns final hidden states into logits (soft-capping included).

Chunked for training: log-probs at chosen ids without a `[B, T, V]` tensor.

`HeadLogits` stands in for the student logits `[B, T, V]` of a training forward. It holds
the decoder's final hidden states and the LM head and computes log-probs only at the
response positions (the prompt positions never reach the head), `BLOCK` rows of logits at
a time; the student entropy of the SPEC §2.7 metrics comes out of the same pass. The last
`chunk_size` positions keep their probabilities for the backward and earlier ones are
recomputed there (one more head matmul each), so memory grows with the chunk, not with
B·T·V. The estimators `token_logprobs` and `entropy` accept it in place of a logits
tensor, so every method whose rule reads the student only through them
(`Objective.chunked_head`) runs unchanged on it.

Chunked for scoring: `chunked_head_logits` runs a model's decoder once and yields the fp32
logits at chosen positions `chunk_size` rows at a time (`head_logits`, with the model's
final-logit soft-capping), for the teacher's scores and the exact reverse KL.

Shared prompt prefixes: `last_hidden_states` runs the leading columns that every row of a
batch holds alike (a system prompt, a chat template; `shared_columns`) once, as one row,
and the rest of every row on top of their keys and values; the same states to float
rounding (checked once per model, `prefix_sharing_supported`), with gradients summed over
the rows by autograd.

Direct for sampling: `hidden_only` runs the model without its head and `lm_head` applies
it in the orientation that is fast for a few rows (`tropd.rollout.engine.decode`).
`HeadLogits` and `lm_head` apply a plain linear head, so they are used only where
`chunked_head_supported` has checked that this reproduces the model's own logits (a
soft-capped head is not: such a model keeps its own head in training and sampling).
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from tropd.kernels import OneDNNLinear, mm_nt, routed

BLOCK = 128  # rows of logits formed at once inside a chunk (cache-sized temporaries)


class HeadLogits:
    """Student logits `[B, T, V]` at `positions`, as `hidden [B, T, H]` (the model's last
    hidden states, unshifted: the distribution over token t comes from position t - 1) and
    the head `weight [V, H]` (+ `bias [V]`). `positions [B, T]` bool marks the positions
    whose distribution is needed (never position 0); elsewhere every value is 0.
    `matmul_dtype` (bfloat16 under `model.autocast`): the head's products run in it (its
    inputs rounded to it, fp32 accumulation), everything after them in fp32; None: in the
    weights' dtype."""

    def __init__(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        positions: torch.Tensor,
        chunk_size: int = 1024,
        matmul_dtype: torch.dtype | None = None,
    ):
        if bool(positions[:, 0].any()):
            raise ValueError("HeadLogits: position 0 has no preceding hidden state")
        self.hidden, self.weight, self.bias = hidden, weight, bias
        self.positions, self.chunk_size = positions, chunk_size
        self.matmul_dtype = matmul_dtype
        self.rows, self.cols = positions.nonzero(as_tuple=True)
        self.shape = torch.Size((*positions.shape, weight.shape[0]))
        self._entropy: torch.Tensor | None = None

    def token_logprobs(self, ids: torch.Tensor) -> torch.Tensor:
        """`log softmax(logits)[ids]` for ids `[B, T]` or `[B, T, K]`; the shape of `ids`,
        fp32, differentiable with respect to the hidden states and the head."""
        picked = ids[self.rows, self.cols]
        flat = picked.reshape(len(picked), ids[0, 0].numel())  # [N, K] (N may be 0)
        states = self.hidden[self.rows, self.cols - 1]
        logprobs, entropy = _ChunkedHead.apply(
            states, self.weight, self.bias, flat, self.chunk_size, self.matmul_dtype
        )
        if self._entropy is None:
            self._entropy = self._scatter(entropy, ())
        return self._scatter(logprobs.reshape(picked.shape), ids.shape[2:])

    def entropy(self) -> torch.Tensor:
        """Entropy in nats `[B, T]` at the positions (0 elsewhere), no gradient; taken in
        the first `token_logprobs` pass when there was one."""
        if self._entropy is None:
            with torch.no_grad():
                self.token_logprobs(torch.zeros(self.positions.shape, dtype=torch.long))
        return self._entropy

    def logits(self) -> torch.Tensor:
        """The plain `[B, T, V]` fp32 logits (zeros off the positions), for tests and
        debugging: this is the tensor the class exists to avoid."""
        states = self.hidden[self.rows, self.cols - 1]
        values = torch.nn.functional.linear(states, self.weight, self.bias).float()
        return self._scatter(values, self.shape[2:])

    def _scatter(self, values: torch.Tensor, tail: tuple) -> torch.Tensor:
        out = values.new_zeros((*self.positions.shape, *tail))
        return out.index_put((self.rows, self.cols), values)


class _ChunkedHead(torch.autograd.Function):
    """`(states [N, H], weight [V, H], bias [V] | None, ids [N, M], chunk, matmul dtype)` ->
    `(log softmax(states @ weight.T + bias)[ids] [N, M], entropy [N])` in fp32 (or wider).

    The logits are formed `BLOCK` rows at a time, as `weight @ states.T` (`[V, BLOCK]`:
    on CPU a wide-vocabulary product is markedly faster in this orientation than
    `F.linear`'s, and a block's temporaries stay in cache). The probabilities of the last
    `chunk` rows are kept for the backward; the rows before them are recomputed there. So
    up to `chunk` positions cost no recompute, and what is held is at most `[chunk, V]`.
    The products (logits and both gradients) run in the matmul dtype when one is given,
    with the weight cast once per pass; the softmax, entropy and gradient of the logits
    stay fp32.
    """

    @staticmethod
    def forward(ctx, states, weight, bias, ids, chunk, matmul_dtype):
        wide = _wide(states)
        head = weight if matmul_dtype is None else weight.to(matmul_dtype)
        n = len(ids)
        logprobs = states.new_empty(ids.shape, dtype=wide)
        entropy = states.new_empty(n, dtype=wide)
        lse = states.new_empty(n, dtype=wide)
        kept_from = max(n - chunk, 0)  # rows from here on keep their probabilities
        kept = []
        for rows in _blocks(n, kept_from):
            block = _logits_t(states[rows], head, bias, wide)  # [V, rows]
            lse[rows] = block.logsumexp(0)
            block -= lse[rows]  # now log-probs, in place
            logprobs[rows] = block.gather(0, ids[rows].t()).t()
            probs = block.exp()
            entropy[rows] = -torch.linalg.vecdot(probs, block, dim=0)
            if rows.start >= kept_from:
                kept.append(probs)
        ctx.save_for_backward(states, weight, bias, ids, lse, *kept)
        ctx.kept_from, ctx.matmul_dtype = kept_from, matmul_dtype
        ctx.mark_non_differentiable(entropy)
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, _grad_entropy):
        states, weight, bias, ids, lse, *kept = ctx.saved_tensors
        need_states, need_weight, need_bias = ctx.needs_input_grad[:3]
        wide = _wide(states)
        low = ctx.matmul_dtype
        head = weight if low is None else weight.to(low)
        fast = low is None and routed(weight) and states.dtype == weight.dtype
        grad_states = torch.zeros_like(states) if need_states else None
        grad_weight = None  # the first block's product starts it (no [V, H] of zeros)
        grad_bias = torch.zeros_like(bias, dtype=wide) if need_bias else None
        kept_blocks = iter(kept)
        for rows in _blocks(len(ids), ctx.kept_from):
            grad = grad_logprobs[rows].to(wide)
            # d/dlogits of sum_m g_m (logits[id_m] - lse) = onehot-scatter(g) - softmax * sum(g)
            scale = -grad.sum(-1)
            if rows.start >= ctx.kept_from:
                # In place: a second backward through this graph then fails loudly
                # (autograd's version check) instead of reading modified probabilities.
                grad_logits = next(kept_blocks).mul_(scale)
            else:
                logits = _logits_t(states[rows], head, bias, wide)
                grad_logits = (logits - lse[rows]).exp_().mul_(scale)
            grad_logits.scatter_add_(0, ids[rows].t(), grad.t())
            grad_logits = grad_logits.to(head.dtype if low else states.dtype)  # [V, rows]
            if need_states and fast:
                grad_states[rows] = mm_nt(grad_logits.t(), head.t())
            elif need_states:
                grad_states[rows] = grad_logits.t() @ head
            if need_weight and fast:
                part = mm_nt(grad_logits, states[rows].t())
            elif need_weight and low:
                part = (grad_logits @ states[rows].to(low)).to(wide)
            elif need_weight:
                part = grad_logits.to(wide) @ states[rows].to(wide)
            if need_weight:
                grad_weight = part if grad_weight is None else grad_weight.add_(part)
            if need_bias:
                grad_bias += grad_logits.sum(1).to(wide)
        if need_weight and grad_weight is None:  # no positions
            grad_weight = torch.zeros_like(weight)
        elif need_weight:
            grad_weight = grad_weight.to(weight.dtype)
        if need_bias:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_states, grad_weight, grad_bias, None, None, None


def _logits_t(states: torch.Tensor, weight: torch.Tensor, bias, dtype) -> torch.Tensor:
    """`(states @ weight.T + bias).T` as `[V, N]` in `dtype`, the product in the weight's
    dtype (by oneDNN for a `routed` weight)."""
    states = states.to(weight.dtype)
    logits = mm_nt(weight, states) if routed(weight) else weight @ states.t()
    if bias is not None:
        logits = logits + bias[:, None]
    return logits.to(dtype)


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast runs matmuls in on `device` here, None where it is off."""
    kind = device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None


def decoding_logits(head: torch.nn.Linear, states: torch.Tensor) -> torch.Tensor:
    """fp32 next-token logits `[N, V]` of a decoding step's final hidden states `[N, H]`:
    the oneDNN layer's own product (its weight reordered for the loop), else `lm_head`."""
    if isinstance(head, OneDNNLinear):
        return head(states).float()
    return lm_head(states, head.weight, head.bias).float()


def lm_head(states: torch.Tensor, weight: torch.Tensor, bias=None) -> torch.Tensor:
    """`states [N, H] @ weight.T + bias` as a contiguous `[N, V]`, computed as
    `weight @ states.T`: for the few rows of a decoding step over a wide vocabulary this
    runs about twice as fast as `F.linear` on CPU (bench/throughput.py)."""
    logits = (weight @ states.t()).t().contiguous()
    return logits if bias is None else logits + bias


def _wide(states: torch.Tensor) -> torch.dtype:
    """fp32, or the states' dtype when wider (float64 in tests)."""
    return torch.promote_types(states.dtype, torch.float32)


def _blocks(n: int, split: int) -> list[slice]:
    """Slices of at most `BLOCK` rows covering `[0, split)` and then `[split, n)`."""
    return [
        slice(start, min(start + BLOCK, end))
        for begin, end in ((0, split), (split, n))
        for start in range(begin, end, BLOCK)
    ]


def final_hidden_states(model, tokens: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The decoder's last hidden states `[B, T, H]` over right-padded `tokens`, without the
    LM head; columns every row shares run once (`last_hidden_states`) where the model
    allows it (`prefix_sharing_supported`)."""
    if shared := sharable_columns(model, tokens, attention_mask):
        return last_hidden_states(model, tokens, attention_mask, shared)
    return model.base_model(input_ids=tokens, attention_mask=attention_mask).last_hidden_state


def head_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """LM-head logits in fp32 for hidden states `[N, H]` -> `[N, V]`, with the model's
    final-logit soft-capping when it has one (Gemma-style)."""
    logits = model.get_output_embeddings()(hidden).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def chunked_head_logits(
    model,
    tokens: torch.Tensor,
    attention_mask: torch.Tensor,
    positions: tuple[torch.Tensor, torch.Tensor],
    chunk_size: int,
) -> Iterator[tuple[slice, torch.Tensor]]:
    """Run the decoder over `tokens [B, T]` once, then yield the fp32 logits `[C, V]`
    (`head_logits`) of the distributions over the tokens at `positions` (`(rows [N],
    cols [N])`, cols >= 1: token t is predicted at t - 1), `chunk_size` of them at a time,
    each with the slice of the N positions it covers. No `[B, T, V]` tensor is formed; a
    caller that keeps no reference to a chunk holds one `[chunk_size, V]` at a time."""
    rows, cols = positions
    predicting = final_hidden_states(model, tokens, attention_mask)[rows, cols - 1]
    for start in range(0, rows.numel(), chunk_size):
        part = slice(start, start + chunk_size)
        yield part, head_logits(model, predicting[part])


def hidden_only(model, **inputs):
    """`model(**inputs)` returning the hidden states of every layer and no logits (an
    empty `logits_to_keep`), for callers that apply the head themselves."""
    given = inputs["input_ids"] if "input_ids" in inputs else inputs["inputs_embeds"]
    none = torch.empty(0, dtype=torch.long, device=given.device)
    return model(**inputs, output_hidden_states=True, logits_to_keep=none)


MIN_SHARED_COLUMNS = 4  # fewer shared columns are not worth a forward of their own
_SHARING: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def cache_argument(model) -> str:
    """The name of `model.forward`'s KV-cache argument: transformers 5 names it `cache`
    (`past_key_values` is a deprecated alias there, with a warning per call); 4.x knows
    only `past_key_values`."""
    accepted = inspect.signature(model.forward).parameters
    return "cache" if "cache" in accepted else "past_key_values"


def shared_columns(tokens: torch.Tensor, attention: torch.Tensor) -> int:
    """How many leading columns of right-padded `tokens [B, T]` hold the same real token
    in every row (at most T - 1: each row keeps a column of its own); 0 for one row or
    below `MIN_SHARED_COLUMNS`. Their states are the same in every row (causal)."""
    rows, width = tokens.shape
    if rows < 2 or width <= MIN_SHARED_COLUMNS:
        return 0
    same = (tokens[:, : width - 1] == tokens[:1, : width - 1]) & attention[:, : width - 1].bool()
    n = int(same.all(0).long().cumprod(0).sum())
    return n if n >= MIN_SHARED_COLUMNS else 0


def last_hidden_states(
    model, tokens: torch.Tensor, attention: torch.Tensor, shared: int = 0, sparse: bool = False
) -> torch.Tensor:
    """The last hidden states `[B, T, H]` of `model` (`hidden_only`) over right-padded
    `tokens`. With `shared` > 0 (`shared_columns`; only where `prefix_sharing_supported`)
    the first `shared` columns run once, as one row, and the rest of every row attends to
    their keys and values repeated over the rows; the shared columns' states are that
    row's, repeated. `sparse`: look the tokens up with a sparse gradient where the
    embedding allows (`sparse_lookup`; `model` itself, not a DDP/FSDP wrapper)."""
    if shared == 0 and not sparse:
        return hidden_only(model, input_ids=tokens, attention_mask=attention).hidden_states[-1]
    embeds = sparse_lookup(model, tokens) if sparse else model.get_input_embeddings()(tokens)
    if shared == 0:
        return hidden_only(model, inputs_embeds=embeds, attention_mask=attention).hidden_states[-1]
    rows, width = tokens.shape
    name = cache_argument(model)
    # One embedding lookup for both forwards: one embedding backward.
    first = hidden_only(
        model,
        inputs_embeds=embeds[:1, :shared],
        attention_mask=attention[:1, :shared],
        use_cache=True,
    )
    cache = first[name]
    cache.batch_repeat_interleave(rows)
    positions = torch.arange(shared, width, device=tokens.device).expand(rows, -1)
    rest = hidden_only(
        model,
        inputs_embeds=embeds[:, shared:],
        attention_mask=attention,
        position_ids=positions,
        use_cache=True,
        **{name: cache},
    )
    return torch.cat([first.hidden_states[-1].expand(rows, -1, -1), rest.hidden_states[-1]], 1)


def sparse_lookup(model, tokens: torch.Tensor) -> torch.Tensor:
    """The input embeddings of `tokens`. Where the embedding is a plain `nn.Embedding`
    tied to the LM head, with a sparse gradient: the head's dense `[V, H]` gradient reaches
    the shared weight first in the backward and the looked-up rows are added into it in
    place, instead of forming a second dense `[V, H]` gradient."""
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and head.weight is embed.weight
    if type(embed) is not torch.nn.Embedding or not tied or embed.max_norm is not None:
        return embed(tokens)
    return F.embedding(tokens, embed.weight, embed.padding_idx, sparse=True)


def prefix_sharing_supported(model) -> bool:
    """Whether `last_hidden_states` may share columns for `model`: no dropout (a shared
    column would draw one mask for all rows), and a 2-row check (one right-padded) agrees
    with the plain forward to float rounding of its dtype (run once per model)."""
    if model not in _SHARING:
        _SHARING[model] = _dropout_free(model) and _sharing_agrees(model)
    return _SHARING[model]


def _dropout_free(model) -> bool:
    rates = [
        value
        for key, value in vars(model.config).items()
        if key.endswith(("dropout", "pdrop")) and isinstance(value, int | float)
    ]
    modules = [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    return not any(r > 0 for r in rates + modules)


def _sharing_agrees(model) -> bool:
    device = next(model.parameters()).device
    tokens = torch.tensor([[1, 2, 3, 4, 5, 6, 7], [1, 2, 3, 4, 8, 9, 0]], device=device)
    tokens = tokens % model.config.vocab_size
    attention = torch.tensor([[1] * 7, [1] * 6 + [0]], device=device)
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            theirs = last_hidden_states(model, tokens, attention).float()
            ours = last_hidden_states(model, tokens, attention, shared=4).float()
    except (RuntimeError, ValueError, AttributeError, TypeError, KeyError, IndexError):
        return False
    finally:
        model.train(training)
    real = attention.bool()
    return within_rounding(model, ours[real], theirs[real])


def within_rounding(model, ours: torch.Tensor, theirs: torch.Tensor) -> bool:
    """Whether two computations of the same outputs of `model` (another summation order,
    fused products, another attention kernel) agree to float rounding: a few units of its
    dtype's rounding of their scale per layer. A structural mistake (a wrong mask,
    position or head grouping) moves them by O(1)."""
    scale = theirs.abs().amax().clamp(min=1.0)
    eps = torch.finfo(next(model.parameters()).dtype).eps
    layers = getattr(model.config, "num_hidden_layers", 1)
    return bool((ours - theirs).abs().amax() <= 64 * eps * scale * layers)


def sharable_columns(model, tokens: torch.Tensor, attention: torch.Tensor) -> int:
    """`shared_columns` where `model` allows sharing them (`prefix_sharing_supported`),
    else 0: what `last_hidden_states` may be given."""
    shared = shared_columns(tokens, attention)
    return shared if shared and prefix_sharing_supported(model) else 0


_SUPPORTED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def chunked_head_supported(model) -> bool:
    """Whether `model`'s logits are exactly `linear(last hidden state, head)` and it can
    skip its own head (`hidden_only`): checked once per model on a 3-token input against
    its own output (catches logit scaling, soft-capping and adapters on the head, which
    `HeadLogits` and `lm_head` do not apply)."""
    if model not in _SUPPORTED:
        _SUPPORTED[model] = _check_head(model)
    return _SUPPORTED[model]


def _check_head(model) -> bool:
    head = model.get_output_embeddings()
    if type(head) not in (torch.nn.Linear, OneDNNLinear):
        return False
    ids = torch.tensor([[1, 2, 3]], device=head.weight.device)
    training = model.training
    model.eval()  # no dropout: the two forwards must agree
    try:
        with torch.no_grad():
            theirs = model(input_ids=ids).logits[:, -1]
            out = hidden_only(model, input_ids=ids)
            states = out.hidden_states[-1][:, -1]
    except (TypeError, AttributeError, IndexError):  # no hidden states / logits_to_keep
        return False
    finally:
        model.train(training)
    if out.logits is not None and out.logits.numel() > 0:
        return False
    mine = torch.nn.functional.linear(states, head.weight, head.bias)
    return mine.shape == theirs.shape and torch.allclose(
        mine.float(), theirs.float(), rtol=1e-3, atol=1e-4
    )
