"""What the adapter wrappers (LoRA, prompt tuning) share: the base model's attributes that
fastlm's generation and training read, forwarded to the wrapped :class:`fastlm.Model`."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn


class ModelWrapper(nn.Module):
    """Forwards device, dtype, lm_head, layers and gradient_checkpointing to ``self.model``,
    and holds the per-row adapter names set by :meth:`use_adapters`."""

    model: nn.Module
    _row_default: list[str] | None = None  # adapter names per row for calls that give none

    @contextlib.contextmanager
    def use_adapters(self, adapter_names: Sequence[str] | None) -> Iterator[None]:
        """Per-row adapters (LoRA) or prompts (prompt tuning) for calls that give none (e.g.
        inside ``fastlm.generate``; with beam or contrastive search each name covers its
        sequence's consecutive expanded rows)."""
        previous, self._row_default = self._row_default, None if adapter_names is None else list(adapter_names)
        try:
            yield
        finally:
            self._row_default = previous

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def lm_head(self) -> nn.Module:
        return self.model.lm_head

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.layers

    @property
    def gradient_checkpointing(self) -> bool:
        return self.model.gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, value: bool) -> None:
        self.model.gradient_checkpointing = value

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
