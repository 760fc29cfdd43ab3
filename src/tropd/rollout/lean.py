"""Decoding steps for Llama-family models in plain torch ops, with a preallocated KV cache.

A decoding step of a small model at a small batch costs more in Hugging Face's module
machinery (per-layer Python, mask construction, rotary tables, cache concatenation) than
in its matrix products. `LeanDecoder` runs the same arithmetic with a handful of ops per
layer: fused RMSNorm, the projections, rotary embedding from the model's own frequencies,
a write into a preallocated cache, scaled-dot-product attention over the valid positions,
the gated MLP. The prompt itself (prefill) still goes through the model's forward, whose
cache is then copied in. `LeanDecoder.supports` admits only the architectures whose
forward is exactly this (checked against the model's config), so everything else keeps
the model's own forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ARCHITECTURES = {"LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM"}


class LeanDecoder:
    """One model's decoding state for `rows` sequences of at most `capacity` tokens."""

    @staticmethod
    def supports(model) -> bool:
        config = getattr(model, "config", None)
        if config is None or type(model).__name__ not in ARCHITECTURES:
            return False
        rope = getattr(config, "rope_parameters", None) or {}
        return (
            rope.get("rope_type", "default") == "default"
            and getattr(config, "hidden_act", None) == "silu"
            and not getattr(config, "mlp_bias", False)
            and not getattr(config, "use_sliding_window", False)
            and getattr(config, "sliding_window", None) is None
            and getattr(config, "pretraining_tp", 1) == 1
        )

    def __init__(self, model, rows: int, capacity: int):
        config = model.config
        self.model, self.decoder = model, model.model
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.eps = config.rms_norm_eps
        weight = self.decoder.embed_tokens.weight
        shape = (len(self.decoder.layers), rows, self.kv_heads, capacity, self.head_dim)
        self.keys = weight.new_zeros(shape)
        self.values = weight.new_zeros(shape)
        self.length = 0
        rotary = self.decoder.rotary_emb
        self.inv_freq, self.rope_scale = rotary.inv_freq.float(), rotary.attention_scaling

    def prefill(self, **inputs) -> torch.Tensor:
        """The model's own forward over the (left-padded) prompts; keeps its cache and
        returns the last position's final hidden state `[rows, H]`."""
        from tropd.head import hidden_only

        out = hidden_only(self.model, **inputs, use_cache=True)
        for i, layer in enumerate(out.past_key_values.layers):
            n = layer.keys.shape[2]
            self.keys[i, :, :, :n] = layer.keys
            self.values[i, :, :, :n] = layer.values
        self.length = out.past_key_values.layers[0].keys.shape[2]
        return out.hidden_states[-1][:, -1]

    def step(self, tokens: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor):
        """Append `tokens [rows]` at rotary `positions [rows]`; `valid [rows, length + 1]`
        marks the cache entries each row attends to (its prompt padding is not). Returns
        the final hidden states `[rows, H]`."""
        n, d = self.length, self.head_dim
        x = self.decoder.embed_tokens(tokens)
        angles = positions[:, None].float() * self.inv_freq
        angles = torch.cat([angles, angles], dim=-1)
        cos = (angles.cos() * self.rope_scale).to(x.dtype)[:, None]
        sin = (angles.sin() * self.rope_scale).to(x.dtype)[:, None]
        mask = valid[:, None, None, : n + 1].bool()
        rows = x.shape[0]
        for i, layer in enumerate(self.decoder.layers):
            attn, mlp = layer.self_attn, layer.mlp
            h = F.rms_norm(x, x.shape[-1:], layer.input_layernorm.weight, self.eps)
            q = F.linear(h, attn.q_proj.weight, attn.q_proj.bias).view(rows, self.heads, d)
            k = F.linear(h, attn.k_proj.weight, attn.k_proj.bias).view(rows, self.kv_heads, d)
            v = F.linear(h, attn.v_proj.weight, attn.v_proj.bias).view(rows, self.kv_heads, d)
            self.keys[i, :, :, n] = k * cos + _rotate_half(k) * sin
            self.values[i, :, :, n] = v
            q = (q * cos + _rotate_half(q) * sin)[:, :, None]
            out = F.scaled_dot_product_attention(
                q,
                self.keys[i, :, :, : n + 1],
                self.values[i, :, :, : n + 1],
                attn_mask=mask,
                scale=attn.scaling,
                enable_gqa=self.heads != self.kv_heads,
            )
            x = x + F.linear(out.reshape(rows, -1), attn.o_proj.weight, attn.o_proj.bias)
            h = F.rms_norm(x, x.shape[-1:], layer.post_attention_layernorm.weight, self.eps)
            gated = F.silu(F.linear(h, mlp.gate_proj.weight)) * F.linear(h, mlp.up_proj.weight)
            x = x + F.linear(gated, mlp.down_proj.weight)
        self.length = n + 1
        return F.rms_norm(x, x.shape[-1:], self.decoder.norm.weight, self.eps)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)
