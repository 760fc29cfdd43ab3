"""A lean decoding step for Llama-family causal LMs (Llama, Qwen2): the same
computation as the model's own forward, without its per-call machinery.

A Hugging Face forward builds attention masks, rotary tables, cache objects and output
records at every step, and runs each projection as its own module call; on a CPU, with a
few rows and a small model, that Python work costs a quarter of the loop (the
SmolLM2-135M teacher, 8 rows, 24 tokens: 0.93-1.05 s through its own forward, 0.71-0.78 s
here; what is left is mostly the products, which stream every weight once per step and
are bound by memory bandwidth: 4 rows, 17 ms per step of which 12.5 ms products).
`LeanStepper` runs a decoding loop's steps on the model's own parameters with
a preallocated KV cache, one product for the query/key/value projections and one for
gate and up (their weights concatenated once per loop, and reordered for oneDNN where the
layers use it), the model's own rotary tables and activation, and queries and keys
rotated together. The prompts' step runs each distinct prompt once and a prefix every
prompt shares (a system prompt, a chat template) once, copying keys and values to the
rows that repeat them (several samples per prompt). It is used only where
`lean_supported` holds: the modules are exactly the supported classes, and a check
decoding run once per model agrees with the model's own forward to float rounding.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache

from tropd.head import (
    MIN_SHARED_COLUMNS,
    chunked_head_supported,
    decoding_logits,
    within_rounding,
)
from tropd.kernels import OneDNNLinear, fused_linear

SUPPORTED = {
    "LlamaForCausalLM": ("LlamaDecoderLayer", "LlamaAttention", "LlamaMLP", "LlamaRMSNorm"),
    "Qwen2ForCausalLM": ("Qwen2DecoderLayer", "Qwen2Attention", "Qwen2MLP", "Qwen2RMSNorm"),
}
_LINEAR = (nn.Linear, OneDNNLinear)
_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def lean_supported(model) -> bool:
    """Whether `LeanStepper` computes `model`'s forward: a supported architecture built of
    exactly its own module classes (no adapters), full attention in every layer,
    a plain linear head (`chunked_head_supported`), and a 2-step check decoding within
    float rounding of the model's own logits (run once per model)."""
    if model not in _CHECKED:
        try:
            _CHECKED[model] = _structure_fits(model) and _agrees(model)
        except (RuntimeError, ValueError, AttributeError, TypeError):  # e.g. partial rotary
            _CHECKED[model] = False
    return _CHECKED[model]


def _structure_fits(model) -> bool:
    names = SUPPORTED.get(type(model).__name__)
    inner = getattr(model, "model", None)
    if names is None or inner is None or not chunked_head_supported(model):
        return False
    config = model.config
    if getattr(config, "pretraining_tp", 1) != 1:
        return False
    if any(t != "full_attention" for t in getattr(config, "layer_types", None) or []):
        return False
    if type(inner.embed_tokens) is not nn.Embedding or type(inner.norm).__name__ != names[3]:
        return False
    for layer in inner.layers:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if (
            type(layer).__name__ != names[0]
            or type(attn).__name__ != names[1]
            or type(mlp).__name__ != names[2]
            or type(layer.input_layernorm).__name__ != names[3]
            or type(layer.post_attention_layernorm).__name__ != names[3]
        ):
            return False
        projections = [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj]
        projections += [mlp.gate_proj, mlp.up_proj, mlp.down_proj]
        if any(type(p) not in _LINEAR for p in projections):
            return False
    return True


def _agrees(model) -> bool:
    """A 2-row check decoding (left padding, a 3-token prefill, 2 steps) against the
    model's own forward on the same tokens, to float rounding of its dtype."""
    device = next(model.parameters()).device
    tokens = torch.tensor([[0, 1, 2, 3, 4], [0, 5, 6, 7, 8]], device=device)
    tokens = tokens % model.config.vocab_size
    attention = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]], device=device)
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            theirs = model(input_ids=tokens, attention_mask=attention, position_ids=positions)
            theirs = theirs.logits[:, 2:].float()
            stepper = LeanStepper(model, rows=2, columns=5)
            ours = [stepper(tokens[:, :3], attention[:, :3], positions[:, :3])]
            for c in (3, 4):
                step = (tokens[:, c : c + 1], attention[:, : c + 1], positions[:, c : c + 1])
                ours.append(stepper(*step))
    finally:
        model.train(training)
    return within_rounding(model, torch.stack(ours, 1), theirs)


class LeanStepper:
    """One model in `tropd.rollout.engine.decode`'s loop, like its `_Stepper`: next-token
    fp32 logits `[N, V]` from the tokens appended since the last call, the final hidden
    states kept when `hidden` is a list, and `cache` the model's KV cache (a transformers
    `DynamicCache`, built when read) for scoring on top of it.

    `rows`, `columns`: the loop's rows and the most cache columns it will fill (prompt
    width plus token budget)."""

    def __init__(self, model, rows: int, columns: int):
        inner = model.model
        config = model.config
        self.hidden: list[torch.Tensor] | None = None
        self.head = model.get_output_embeddings()
        self.embed, self.rotary = inner.embed_tokens, inner.rotary_emb
        first = inner.layers[0].self_attn
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = first.head_dim
        self.scaling = first.scaling
        weight = self.head.weight
        shape = (len(inner.layers), rows, self.kv_heads, columns, self.head_dim)
        self.keys = weight.new_empty(shape)  # in the weights' dtype (also under autocast)
        self.values = weight.new_empty(shape)
        self.filled = 0
        self.shared = 0  # leading columns the same in every row (`shared_prefix`)
        self.layers = []
        for layer in inner.layers:
            attn, mlp = layer.self_attn, layer.mlp
            self.layers.append(
                (
                    _norm(layer.input_layernorm),
                    fused_linear([attn.q_proj, attn.k_proj, attn.v_proj]),
                    fused_linear([attn.o_proj]),
                    _norm(layer.post_attention_layernorm),
                    fused_linear([mlp.gate_proj, mlp.up_proj]),
                    _activation(mlp.act_fn),
                    fused_linear([mlp.down_proj]),
                )
            )
        self.norm = _norm(inner.norm)

    @property
    def cache(self):
        """The filled columns as a transformers `DynamicCache` (a copy)."""
        end = self.filled
        return DynamicCache(
            ddp_cache_data=[
                (k[:, :, :end], v[:, :, :end]) for k, v in zip(self.keys, self.values, strict=True)
            ]
        )

    def __call__(self, inputs, attention, positions) -> torch.Tensor:
        if self.filled == 0:
            last = self._prefill(inputs, attention, positions)
        else:
            last = self.norm(self._layers(inputs, attention, positions, slice(None))[:, -1])
        if self.hidden is not None:
            self.hidden.append(last)
        return decoding_logits(self.head, last)

    def _prefill(self, inputs, attention, positions) -> torch.Tensor:
        """The prompts' step, each distinct prompt run once: the first `shared` columns
        (the same in every row, `shared_prefix`) for row 0, the rest for the first row of
        each distinct prompt; their keys and values copied to the other rows. Returns
        the final hidden state of every row's last column `[N, H]`."""
        width, p = inputs.shape[1], self.shared
        if 0 < p < width:
            self._layers(inputs[:1, :p], attention[:1, :p], positions[:1, :p], slice(0, 1))
            self.keys[:, 1:, :, :p] = self.keys[:, :1, :, :p]
            self.values[:, 1:, :, :p] = self.values[:, :1, :, :p]
        else:
            p = 0
        _, inverse = torch.unique(inputs, dim=0, return_inverse=True)
        first = torch.full_like(inverse[: int(inverse.max()) + 1], len(inverse))
        first.scatter_reduce_(0, inverse, torch.arange(len(inverse), device=inverse.device), "amin")
        if len(first) == len(inverse):  # all distinct
            return self.norm(
                self._layers(inputs[:, p:], attention, positions[:, p:], slice(None))[:, -1]
            )
        x = self._layers(inputs[first, p:], attention[first], positions[first, p:], first)
        source = first[inverse]  # each row's first row with the same prompt
        self.keys[:, :, :, p:width] = self.keys[:, source, :, p:width]
        self.values[:, :, :, p:width] = self.values[:, source, :, p:width]
        return self.norm(x[:, -1])[inverse]

    def _layers(self, inputs, attention, positions, rows) -> torch.Tensor:
        """The decoder layers over `inputs [n, new]` (cache rows `rows`: a slice or an index
        tensor, columns from `filled` on); returns the last layer's output `[n, new, H]`,
        before the final norm."""
        count, new = inputs.shape
        start, end = self.filled, self.filled + new
        x = self.embed(inputs)
        cos, sin = (t.unsqueeze(2) for t in self.rotary(x, positions))  # [N, new, 1, D]
        mask = _mask(attention.bool(), start, new)
        heads, kv_heads, dim = self.heads, self.kv_heads, self.head_dim
        half, group = dim // 2, heads // kv_heads
        for i, (norm1, qkv, out, norm2, gate_up, act, down) in enumerate(self.layers):
            h = qkv(norm1(x)).view(count, new, heads + 2 * kv_heads, dim)
            qk, v = h[:, :, : heads + kv_heads], h[:, :, heads + kv_heads :]
            # rotary embedding of queries and keys at once: x cos + rotate_half(x) sin
            qk = qk * cos + torch.cat((-qk[..., half:], qk[..., :half]), -1) * sin
            q, k = qk[:, :, :heads], qk[:, :, heads:]
            self.keys[i, rows, :, start:end] = k.transpose(1, 2).to(self.keys.dtype)
            self.values[i, rows, :, start:end] = v.transpose(1, 2).to(self.values.dtype)
            keys, values = self.keys[i, rows, :, :end], self.values[i, rows, :, :end]
            if new == 1 and group > 1:  # the query heads of a group as one group's queries
                q = q.reshape(count, kv_heads, group, dim)
                a = F.scaled_dot_product_attention(q, keys, values, mask, scale=self.scaling)
            else:
                if group > 1:
                    keys = keys.repeat_interleave(group, 1)
                    values = values.repeat_interleave(group, 1)
                q = q.transpose(1, 2)
                a = F.scaled_dot_product_attention(q, keys, values, mask, scale=self.scaling)
                a = a.transpose(1, 2)
            x.add_(out(a.reshape(count, new, heads * dim)))
            g, u = gate_up(norm2(x)).chunk(2, -1)
            x.add_(down(act(g).mul_(u)))
        self.filled = end
        return x


def shared_prefix(prompts: list[list[int]]) -> int:
    """How many leading tokens every prompt shares (a system prompt, a chat template, or
    the same prompt sampled several times), kept one short of the shortest prompt so each
    row has a token of its own to predict from; 0 below `MIN_SHARED_COLUMNS` or for one prompt."""
    if len(prompts) < 2:
        return 0
    shortest = min(len(p) for p in prompts)
    first, n = prompts[0], 0
    while n < shortest - 1 and all(p[n] == first[n] for p in prompts):
        n += 1
    return n if n >= MIN_SHARED_COLUMNS else 0


def pad_after_prefix(
    prompts: list[list[int]], shared: int, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """`[B, T]` tokens and attention mask like `tropd.batch.left_pad`, but with the padding
    after the `shared` first tokens: row = shared tokens, padding, the rest of the prompt.
    Positions counted over the real tokens are those of left padding."""
    width = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        rest = len(p) - shared
        tokens[i, :shared] = torch.tensor(p[:shared], dtype=torch.long)
        tokens[i, width - rest :] = torch.tensor(p[shared:], dtype=torch.long)
        mask[i, :shared] = 1
        mask[i, width - rest :] = 1
    return tokens, mask


def _mask(attention: torch.Tensor, start: int, new: int) -> torch.Tensor:
    """`[N, 1, new, C]` boolean: query t (cache column start + t) sees the real columns up
    to itself, and always itself (so a padding query's row is never empty)."""
    if new == 1:
        return attention[:, None, None, :]
    columns = torch.arange(attention.shape[1], device=attention.device)
    query = torch.arange(start, start + new, device=attention.device)[:, None]
    seen = (columns <= query) & (attention[:, None, :] | (columns == query))
    return seen[:, None]


def _norm(module):
    """An RMSNorm module as a function (`weight * x / rms(x)`, as the module computes it)."""
    weight, eps = module.weight, module.variance_epsilon
    shape = tuple(weight.shape)
    return lambda x: F.rms_norm(x, shape, weight, eps)


def _activation(module):
    """The MLP's activation as a function: SiLU as `F.silu` (skipping a module call)."""
    return F.silu if type(module).__name__ in {"SiLU", "SiLUActivation"} else module
