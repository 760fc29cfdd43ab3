"""`TokenBatch`: the one structure that carries a training batch through every stage.

All per-token tensors are `[B, T]` and right-padded: row `b` holds its prompt from
position 0, then the response, then padding. Position `t` always means "token t and
the distribution that produced it": `sampler_logprobs[b, t]` is `log q(tokens[b, t] |
tokens[b, :t])`, and the student logits handed to an objective are aligned the same
way (see `align_logits`). Top-k tensors are `[B, T, K]`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

import torch

PROMPT, TEACHER, STUDENT = 0, 1, 2
"""Values of `TokenBatch.origin`: prompt or padding (never trained), teacher-written
prefix (off-policy guidance), student-sampled (on-policy)."""


@dataclass
class TokenBatch:
    tokens: torch.Tensor  # [B, T] int64
    origin: torch.Tensor  # [B, T] int64, PROMPT / TEACHER / STUDENT
    attention_mask: torch.Tensor | None = None  # [B, T] 1 for real tokens, 0 for padding
    sampler_logprobs: torch.Tensor | None = None  # [B, T] log q(x_t), 0 off student tokens
    teacher_logprobs: torch.Tensor | None = None  # [B, T] log pi_T(x_t)
    teacher_topk_ids: torch.Tensor | None = None  # [B, T, K] int64
    teacher_topk_logprobs: torch.Tensor | None = None  # [B, T, K] full-vocab log-softmax values
    teacher_entropy: torch.Tensor | None = None  # [B, T] nats
    trust_mask: torch.Tensor | None = None  # [B, T] bool; overrides the sampled trust gate
    reward: torch.Tensor | None = None  # [B] per-sequence task reward from a verifier
    group: torch.Tensor | None = None  # [B] int64 prompt index, rollouts of one prompt share it
    # The teacher's KV cache from writing the prefixes (`tropd.rollout.TeacherCache`), so
    # that scoring need not recompute prompt and prefix; not a per-token field: `select`
    # and `trim` drop it (their rows and columns no longer match it).
    teacher_cache: Any = None

    def __post_init__(self) -> None:
        if self.tokens.dim() != 2 or self.origin.shape != self.tokens.shape:
            raise ValueError(
                "TokenBatch: tokens and origin must both be [B, T]; got "
                f"{tuple(self.tokens.shape)} and {tuple(self.origin.shape)}"
            )
        if self.attention_mask is None:
            self.attention_mask = torch.ones_like(self.tokens)

    @property
    def response_mask(self) -> torch.Tensor:
        """[B, T] bool: tokens the objectives may train (teacher prefix or student)."""
        return self.origin > PROMPT

    @property
    def student_mask(self) -> torch.Tensor:
        return self.origin == STUDENT

    @property
    def teacher_mask(self) -> torch.Tensor:
        return self.origin == TEACHER

    def replace(self, **changes) -> TokenBatch:
        return replace(self, **changes)

    def to(self, device: torch.device | str) -> TokenBatch:
        moved = {
            f.name: (v.to(device) if isinstance(v, torch.Tensor) else v)
            for f in fields(self)
            if (v := getattr(self, f.name)) is not None
        }
        return TokenBatch(**moved)

    def select(self, rows: slice | torch.Tensor) -> TokenBatch:
        """Rows of the batch (a micro-batch), all fields sliced alike."""
        picked = {f.name: v[rows] for f, v in self._tensors()}
        return TokenBatch(**picked)

    def trim(self) -> TokenBatch:
        """Drop trailing columns that are padding in every row."""
        width = int(self.attention_mask.sum(-1).max())
        trimmed = {f.name: (v[:, :width] if v.dim() >= 2 else v) for f, v in self._tensors()}
        return TokenBatch(**trimmed)

    def _tensors(self):
        """(field, value) of each tensor field that is set."""
        return [
            (f, v) for f in fields(self) if isinstance(v := getattr(self, f.name), torch.Tensor)
        ]

    def __len__(self) -> int:
        return self.tokens.shape[0]


def align_logits(logits: torch.Tensor) -> torch.Tensor:
    """Shift model logits `[B, T, V]` so position t holds the distribution over token t.

    A causal LM's output at position t predicts token t+1; this is the one place where
    that shift happens. Position 0 (always a prompt token) gets zeros.
    """
    return torch.cat([torch.zeros_like(logits[:, :1]), logits[:, :-1]], dim=1)


def right_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists into `[B, T]` tokens and attention mask."""
    width = max(len(r) for r in rows)
    tokens = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return tokens, mask


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists into `[B, T]` tokens and attention mask (for generation)."""
    width = max(len(r) for r in rows)
    tokens = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r) :] = 1
    return tokens, mask
