"""The student's LM head, chunked: log-probs at chosen ids without a `[B, T, V]` tensor.

`HeadLogits` stands in for the student logits `[B, T, V]` of a training forward. It holds
the decoder's final hidden states and the LM head, and computes log-probs only at the
response positions, `chunk_size` positions at a time: the largest temporaries are
`[chunk_size, V]` (forward and backward), the prompt positions never reach the head, and
the student entropy of the SPEC §2.7 metrics comes out of the same pass. The estimators
`token_logprobs` and `entropy` accept it in place of a logits tensor, so every method whose
rule reads the student only through them (`Method.chunked_head`) runs unchanged on it.

The backward recomputes each chunk's logits instead of keeping them: one more head matmul
for memory that grows with the chunk, not with B·T·V.
"""

from __future__ import annotations

import torch


class HeadLogits:
    """Student logits `[B, T, V]` at `positions`, as `hidden [B, T, H]` (the model's last
    hidden states, unshifted: the distribution over token t comes from position t - 1) and
    the head `weight [V, H]` (+ `bias [V]`). `positions [B, T]` bool marks the positions
    whose distribution is needed (never position 0); elsewhere every value is 0."""

    def __init__(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        positions: torch.Tensor,
        chunk_size: int = 1024,
    ):
        if bool(positions[:, 0].any()):
            raise ValueError("HeadLogits: position 0 has no preceding hidden state")
        self.hidden, self.weight, self.bias = hidden, weight, bias
        self.positions, self.chunk_size = positions, chunk_size
        self.rows, self.cols = positions.nonzero(as_tuple=True)
        self.shape = torch.Size((*positions.shape, weight.shape[0]))
        self._entropy: torch.Tensor | None = None

    def token_logprobs(self, ids: torch.Tensor) -> torch.Tensor:
        """`log softmax(logits)[ids]` for ids `[B, T]` or `[B, T, K]`; the shape of `ids`,
        fp32, differentiable with respect to the hidden states and the head."""
        picked = ids[self.rows, self.cols]
        flat = picked.reshape(len(picked), -1)
        states = self.hidden[self.rows, self.cols - 1]
        logprobs, entropy = _ChunkedHead.apply(
            states, self.weight, self.bias, flat, self.chunk_size
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
    """`(states [N, H], weight [V, H], bias [V] | None, ids [N, M], chunk)` ->
    `(log softmax(states @ weight.T + bias)[ids] [N, M], entropy [N])` in fp32 (or
    wider), with the
    logits formed `chunk` rows at a time in the forward and again in the backward."""

    @staticmethod
    def forward(ctx, states, weight, bias, ids, chunk):
        wide = _wide(states)
        logprobs = states.new_empty(ids.shape, dtype=wide)
        entropy = states.new_empty(ids.shape[0], dtype=wide)
        lse = states.new_empty(ids.shape[0], dtype=wide)
        for rows in _chunks(len(ids), chunk):
            logits = torch.nn.functional.linear(states[rows], weight, bias).to(wide)
            lse[rows] = logits.logsumexp(-1)
            probs = (logits - lse[rows, None]).exp_()
            entropy[rows] = lse[rows] - (probs * logits).sum(-1)
            logprobs[rows] = logits.gather(-1, ids[rows]) - lse[rows, None]
        ctx.save_for_backward(states, weight, bias, ids, lse)
        ctx.chunk = chunk
        ctx.mark_non_differentiable(entropy)
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, _grad_entropy):
        states, weight, bias, ids, lse = ctx.saved_tensors
        need_states, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_states = torch.zeros_like(states) if need_states else None
        wide = _wide(states)
        grad_weight = torch.zeros_like(weight, dtype=wide) if need_weight else None
        grad_bias = torch.zeros_like(bias, dtype=wide) if need_bias else None
        for rows in _chunks(len(ids), ctx.chunk):
            logits = torch.nn.functional.linear(states[rows], weight, bias).to(wide)
            grad = grad_logprobs[rows].to(wide)
            # d/dlogits of sum_m g_m (logits[id_m] - lse) = onehot-scatter(g) - softmax * sum(g)
            grad_logits = (logits - lse[rows, None]).exp_().mul_(-grad.sum(-1, keepdim=True))
            grad_logits.scatter_add_(-1, ids[rows], grad)
            grad_logits = grad_logits.to(states.dtype)
            if need_states:
                grad_states[rows] = grad_logits @ weight
            if need_weight:
                grad_weight.addmm_(grad_logits.t().to(wide), states[rows].to(wide))
            if need_bias:
                grad_bias += grad_logits.sum(0).to(wide)
        if need_weight:
            grad_weight = grad_weight.to(weight.dtype)
        if need_bias:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_states, grad_weight, grad_bias, None, None


def _wide(states: torch.Tensor) -> torch.dtype:
    """fp32, or the states' dtype when wider (float64 in tests)."""
    return torch.promote_types(states.dtype, torch.float32)


def _chunks(n: int, size: int) -> list[slice]:
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


def chunked_head_supported(model) -> bool:
    """Whether `model`'s logits are exactly `linear(last hidden state, head)`: checked on
    a 3-token input against the model's own output (catches logit scaling, soft-capping
    and adapters on the head, which `HeadLogits` does not apply)."""
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear) or type(head) is not torch.nn.Linear:
        return False
    device = head.weight.device
    ids = torch.tensor([[1, 2, 3]], device=device)
    try:
        with torch.no_grad():
            out = model(input_ids=ids, output_hidden_states=True, logits_to_keep=1)
            states = out.hidden_states[-1][:, -1]
            mine = torch.nn.functional.linear(states, head.weight, head.bias)
    except (TypeError, AttributeError, IndexError):  # no hidden states / logits_to_keep
        return False
    theirs = out.logits[:, -1]
    return mine.shape == theirs.shape and torch.allclose(
        mine.float(), theirs.float(), rtol=1e-3, atol=1e-4
    )
