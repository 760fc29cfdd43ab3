"""Fixtures for the objective tests (builders live in `enumeration.py`)."""

from __future__ import annotations

import pytest
import torch

from .enumeration import OnePosition, V, one_position


@pytest.fixture
def seeded() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


@pytest.fixture
def random_position(seeded: torch.Generator) -> OnePosition:
    """On-policy enumeration batch with a teacher that disagrees with the student."""
    theta = torch.randn(V, dtype=torch.float64, generator=seeded).requires_grad_()
    teacher_logits = 2.0 * torch.randn(V, dtype=torch.float64, generator=seeded)
    return one_position(theta, teacher_logits)
