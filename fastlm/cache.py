"""KV cache: preallocated key/value buffers updated in place (gpt-fast's static cache)."""

from __future__ import annotations

import torch
from torch import nn

from fastlm.config import ModelConfig


class KVCache(nn.Module):
    """Keys and values of every layer for a batch of sequences.

    k, v: (num_layers, B, Hkv, max_len, D) buffers; lens: (B,) int64 number of valid
    positions of each sequence. A forward pass with the cache writes its new keys/values at
    positions lens[b] ... lens[b] + T - 1 and then advances lens by T.
    """

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        num_kv_heads: int,
        max_len: int,
        head_dim: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("batch_size", batch_size), ("max_len", max_len)):
            if value < 1:
                raise ValueError(f"KVCache: {name} must be >= 1, got {value}")
        shape = (num_layers, batch_size, num_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("lens", torch.zeros(batch_size, dtype=torch.int64, device=device), persistent=False)
        self.max_len = max_len
        self.filled = 0  # host-side upper bound of lens, so capacity checks need no device sync

    @classmethod
    def for_model(
        cls,
        config: ModelConfig,
        batch_size: int,
        max_len: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> KVCache:
        if max_len > config.max_position_embeddings:
            raise ValueError(
                f"KVCache: max_len {max_len} exceeds the model's context of {config.max_position_embeddings} tokens"
            )
        return cls(
            config.num_layers, batch_size, config.num_kv_heads, max_len, config.head_dim, dtype=dtype, device=device
        )

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    def positions(self, num_new: int) -> torch.Tensor:
        """Positions of the next ``num_new`` tokens of each sequence: (B, num_new) int64."""
        if self.filled + num_new > self.max_len:
            raise ValueError(
                f"KVCache: {num_new} new tokens do not fit: {self.filled} of {self.max_len} positions are used"
            )
        return self.lens[:, None] + torch.arange(num_new, device=self.lens.device)

    def update(
        self, layer: int, k_new: torch.Tensor, v_new: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k_new/v_new (B, Hkv, T, D) at ``positions`` (B, T); return the layer's buffers."""
        index = positions[:, None, :, None].expand(-1, k_new.shape[1], -1, k_new.shape[3])
        self.k[layer].scatter_(2, index, k_new.to(self.k.dtype))
        self.v[layer].scatter_(2, index, v_new.to(self.v.dtype))
        return self.k[layer], self.v[layer]

    def advance(self, num_new: int, lens: torch.Tensor | None = None) -> None:
        """Mark ``num_new`` more positions of every sequence as valid (after all layers wrote);
        with ``lens`` (B,), only lens[b] of them for sequence b (right-padded ragged prompts)."""
        self.lens += num_new if lens is None else lens.to(self.lens)
        self.filled += num_new

    def truncate(self, lens: torch.Tensor, filled: int) -> None:
        """Roll back to ``lens`` (B,) valid positions (e.g. rejected speculative tokens);
        ``filled`` is the new host-side upper bound of lens."""
        self.lens.copy_(lens)
        self.filled = filled

    def reorder(self, index: torch.Tensor) -> None:
        """Keep sequence index[i] as sequence i (beam search): index (B,) int64."""
        self.k = self.k.index_select(1, index)
        self.v = self.v.index_select(1, index)
        self.lens = self.lens.index_select(0, index)

    def reset(self) -> None:
        self.lens.zero_()
        self.filled = 0
