"""Small helpers shared by the op families (no op is defined here)."""

from __future__ import annotations

import torch


def wide(t: torch.Tensor) -> torch.Tensor:
    """The accumulation dtype of the references: float32, or float64 for float64 inputs."""
    return t if t.dtype == torch.float64 else t.float()


def or_empty(grads, like) -> list[torch.Tensor]:
    """A backward kernel's list: one tensor per present (not None) differentiable argument in
    ``like``, the gradient where computed, else an empty tensor."""
    return [g if g is not None else t.new_empty((0,)) for g, t in zip(grads, like) if t is not None]
