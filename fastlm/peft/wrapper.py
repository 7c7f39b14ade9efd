"""What the adapter wrappers (LoRA, prompt tuning) share: the base model's attributes that
fastlm's generation and training read, forwarded to the wrapped :class:`fastlm.Model`."""

from __future__ import annotations

import torch
from torch import nn


class ModelWrapper(nn.Module):
    """Forwards device, dtype, lm_head, layers and gradient_checkpointing to ``self.model``."""

    model: nn.Module

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
