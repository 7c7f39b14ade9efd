"""KV cache: preallocated key/value buffers updated in place (gpt-fast's static cache)."""

from __future__ import annotations

import torch
from torch import nn

from fastlm import ops
from fastlm.config import ModelConfig
from fastlm.ops.kv_append import rope_append_kv_layer


def _options(scale: float | None, window: int | None, softcap: float | None) -> dict:
    """The attention options that are set (the ops' defaults otherwise)."""
    return {k: v for k, v in (("scale", scale), ("window", window), ("softcap", softcap)) if v is not None}


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
        if max_len > config.context_length:
            raise ValueError(f"KVCache: max_len {max_len} exceeds the model's context of {config.context_length} tokens")
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

    def attend(
        self,
        layer: int,
        q: torch.Tensor,
        k_new: torch.Tensor,
        v_new: torch.Tensor,
        positions: torch.Tensor,
        key_lens: torch.Tensor | None = None,
        rope_theta: float | None = None,
        *,
        scale: float | None = None,
        window: int | None = None,
        softcap: float | None = None,
    ) -> torch.Tensor:
        """Store the new keys/values (B, Hkv, T, D) of ``layer`` at ``positions`` (B, T) and
        attend the queries (B, H, T, D) over each sequence's cached ones. With ``rope_theta``, q
        and k are first rotated by RoPE at their positions (fused with the cache write, see
        :func:`fastlm.ops.rope_append_kv`). The prefill of an empty cache attends over the new
        tokens only (``key_lens``: right-padded ragged prompts). ``scale``, ``window`` (sliding
        window: the full cache is kept, older keys are masked) and ``softcap`` are the layer's
        attention options (see :func:`fastlm.ops.attention`)."""
        options = _options(scale, window, softcap)
        if self.filled:
            return self.attend_cached(layer, q, k_new, v_new, positions, rope_theta, length=self.filled + q.shape[2],
                                      **options)
        k_cache, v_cache = self.k[layer], self.v[layer]
        q = ops.rope_append_kv(q, k_new, v_new, positions, k_cache, v_cache, theta=rope_theta)
        t = q.shape[2]  # prefill: positions 0 ... T-1 of every sequence
        k, v = k_cache[:, :, :t].to(q.dtype), v_cache[:, :, :t].to(q.dtype)
        return ops.attention(q, k, v, causal=True, key_lens=key_lens, **options)

    def attend_cached(self, layer, q, k_new, v_new, positions, rope_theta=None, length: int | None = None, *,
                      scale: float | None = None, window: int | None = None, softcap: float | None = None
                      ) -> torch.Tensor:
        """:meth:`attend` for a cache that already holds each sequence's earlier tokens: no
        host-side state is read, so a decode step through it can be compiled or graph-captured.
        ``length`` (a host bound on every sequence's length after this step, e.g. filled + T)
        limits attention to the first ``length`` positions instead of all max_len."""
        q = rope_append_kv_layer(q, k_new, v_new, positions, self.k, self.v, layer, theta=rope_theta)
        k_cache, v_cache = self.k[layer], self.v[layer]
        if length is not None:
            k_cache, v_cache = k_cache[:, :, :length], v_cache[:, :, :length]
        return ops.decode_attention(q, k_cache, v_cache, self.lens + q.shape[2], **_options(scale, window, softcap))

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


class PagedKVCache(nn.Module):
    """Keys and values in fixed-size blocks shared by all sequences (vLLM's paged attention).

    k, v: (num_layers, num_blocks, Hkv, block_size, D); block_table (B, max_blocks) int32 maps
    position p of sequence b to block block_table[b, p // block_size], offset p % block_size.
    Blocks are taken from a free list as sequences grow and returned by :meth:`free`, so
    sequences of very different lengths share the memory. Block 0 is kept as scratch: writes of
    freed sequences land there and are never read.
    """

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        num_blocks: int,
        block_size: int = 16,
        max_len: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if block_size < 1 or num_blocks < 2:
            raise ValueError(f"PagedKVCache: need block_size >= 1 and num_blocks >= 2, got {block_size}, {num_blocks}")
        shape = (num_layers, num_blocks, num_kv_heads, block_size, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        max_blocks = -(-max_len // block_size)
        self.register_buffer("block_table", torch.full((batch_size, max_blocks), -1, dtype=torch.int32, device=device),
                             persistent=False)
        self.register_buffer("lens", torch.zeros(batch_size, dtype=torch.int64, device=device), persistent=False)
        self.block_size, self.max_len = block_size, max_len
        self.free_blocks = list(range(num_blocks - 1, 0, -1))  # block 0 is scratch
        self.seq_blocks: list[list[int]] = [[] for _ in range(batch_size)]
        self.reserved = [0] * batch_size  # positions each sequence has blocks for (host side)
        self.released = [False] * batch_size
        self.filled = 0

    @classmethod
    def for_model(cls, config: ModelConfig, batch_size: int, max_len: int, *, num_blocks: int | None = None,
                  block_size: int = 16, dtype: torch.dtype = torch.float32,
                  device: torch.device | str | None = None) -> PagedKVCache:
        """num_blocks None: enough for every sequence to reach max_len (plus the scratch block)."""
        if max_len > config.context_length:
            raise ValueError(
                f"PagedKVCache: max_len {max_len} exceeds the model's context of {config.context_length} tokens"
            )
        num_blocks = batch_size * -(-max_len // block_size) + 1 if num_blocks is None else num_blocks
        return cls(config.num_layers, batch_size, config.num_kv_heads, config.head_dim, num_blocks=num_blocks,
                   block_size=block_size, max_len=max_len, dtype=dtype, device=device)

    @property
    def batch_size(self) -> int:
        return self.block_table.shape[0]

    @property
    def blocks_in_use(self) -> int:
        return sum(map(len, self.seq_blocks))

    def positions(self, num_new: int) -> torch.Tensor:
        """Positions of the next ``num_new`` tokens (B, num_new), allocating blocks for them."""
        if self.filled + num_new > self.max_len:
            raise ValueError(
                f"PagedKVCache: {num_new} new tokens do not fit: {self.filled} of {self.max_len} positions are used"
            )
        needed = self.filled + num_new
        for seq in range(self.batch_size):
            while not self.released[seq] and self.reserved[seq] < needed:
                if not self.free_blocks:
                    raise RuntimeError(
                        f"PagedKVCache: out of blocks ({self.blocks_in_use} in use); free finished sequences "
                        "or create the cache with more num_blocks"
                    )
                block = self.free_blocks.pop()
                self.block_table[seq, len(self.seq_blocks[seq])] = block
                self.seq_blocks[seq].append(block)
                self.reserved[seq] += self.block_size
        return self.lens[:, None] + torch.arange(num_new, device=self.lens.device)

    def update(self, layer: int, k_new: torch.Tensor, v_new: torch.Tensor, positions: torch.Tensor) -> None:
        """Write k_new/v_new (B, Hkv, T, D) at ``positions`` (B, T) of each sequence."""
        table = self.block_table.long()
        slot = torch.gather(table, 1, (positions // self.block_size).clamp(max=table.shape[1] - 1))
        block = slot.clamp(min=0)  # released sequences (-1) write to the scratch block 0
        offset = positions % self.block_size
        # pages[layer][block, :, offset, :] = k_new[b, :, t, :]
        self.k[layer][block, :, offset] = k_new.permute(0, 2, 1, 3).to(self.k.dtype)
        self.v[layer][block, :, offset] = v_new.permute(0, 2, 1, 3).to(self.v.dtype)

    def attend(self, layer, q, k_new, v_new, positions, key_lens=None, rope_theta=None, *,
               scale: float | None = None, window: int | None = None, softcap: float | None = None) -> torch.Tensor:
        """As :meth:`KVCache.attend`, through :func:`fastlm.ops.decode_attention_paged`."""
        if rope_theta is not None:
            q, k_new = ops.rope(q, positions, theta=rope_theta), ops.rope(k_new, positions, theta=rope_theta)
        self.update(layer, k_new, v_new, positions)
        options = _options(scale, window, softcap)
        if self.filled == 0:
            return ops.attention(q, k_new, v_new, causal=True, key_lens=key_lens, **options)
        return ops.decode_attention_paged(q, self.k[layer], self.v[layer], self.block_table, self.lens + q.shape[2],
                                          **options)

    def advance(self, num_new: int, lens: torch.Tensor | None = None) -> None:
        self.lens += num_new if lens is None else lens.to(self.lens)
        self.filled += num_new

    def free(self, seq: int) -> None:
        """Return the blocks of finished sequence ``seq`` to the free list."""
        self.free_blocks.extend(reversed(self.seq_blocks[seq]))
        self.seq_blocks[seq] = []
        self.block_table[seq] = -1
        self.released[seq] = True
