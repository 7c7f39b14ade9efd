"""KV caches: preallocated per-sequence buffers updated in place (:class:`KVCache`, gpt-fast's
static cache) or fixed-size blocks shared by all sequences (:class:`PagedKVCache`, vLLM's).

The contract (all the model calls; the model owns RoPE and attention):

    positions(T) -> (B, T) int64      positions of the next T tokens of each sequence (the paged
                                      cache allocates their blocks; both raise when they do not fit)
    update(layer, q, k, v, positions, *, theta=None, length=None) -> (q, KVView)
                                      write k, v (B, Hkv, T, D) of ``layer`` at ``positions``; with
                                      ``theta`` (plain RoPE) k and q (B, H, T, D) are rotated first
    advance(T, lens=None)             after every layer wrote: lens += T (or += lens, ragged prefill)

:class:`KVView` (k, v, lens, block_table) is what attention reads after the write, lens (B,)
being each sequence's valid length *including* the T new tokens:

- static: k, v (B, Hkv, L, D) = the layer's buffers over positions [0, L), L = ``length`` (a
  host bound on every length after the write) or max_len when None (one static shape: what a
  compiled decode step uses); block_table None. Attention: ``ops.decode_attention(q, k, v, lens)``,
  or on the prefill of an empty cache, whose positions [0, T) are exactly the new tokens,
  ``ops.attention(q, k, v, causal=True, key_lens=...)`` (the prefill kernel, ragged prompts).
- paged: k, v (num_blocks, Hkv, block_size, D) = the layer's pages and block_table
  (B, max_blocks) int32, exactly the arguments of ``ops.decode_attention_paged``, so the paged
  decode kernel reads the blocks in place (no gather); the prefill goes through it too.

Who rotates: the cache, given the un-rotated q, k and the model's RoPE base (the model decides:
theta None when it rotated q, k itself — scaled or partial RoPE — or has no RoPE). The storage
layout decides which write can fuse the rotation: the static cache's update is one launch of
the fused RoPE+append kernel (``ops.rope_append_kv``: rotate q and k, scatter k and v into the
buffers), the decode step's fast path; the paged cache rotates with ``ops.rope`` and scatters
into its pages. The model thus never sees the layout, and calls one attention op on the view.

Bookkeeping around the contract: ``filled`` (a host-side upper bound of lens: capacity checks
need no device read), ``uniform`` (host-side: every lens equals filled, so an eager decode step
attends over the view [0, filled] without a mask), ``truncate`` (roll back, e.g. rejected
speculative tokens), ``reorder`` (beam and contrastive search: in place, over the filled
positions only) and ``reset``. An eager decode step builds its per-step state once
(:meth:`KVCache.decode_step`, :class:`DecodeStepState`) and writes each layer with
:meth:`KVCache.write`; plain pre-norm RMSNorm models decode through the leaner
:class:`fastlm.decoding.eager.EagerStep`, which shares :func:`step_mask`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from fastlm import ops
from fastlm.config import ModelConfig
from fastlm.ops.common import wide
from fastlm.ops.kv_append import rope_append_kv_layer
from fastlm.ops.rotary import rope_cos_sin, rotate_half


class KVView(NamedTuple):
    """What attention reads after :meth:`KVCache.update` / :meth:`PagedKVCache.update` (see the
    module docstring): k, v buffers (static, (B, Hkv, L, D)) or pages (paged, (num_blocks, Hkv,
    block_size, D)); lens (B,) int64 valid lengths including the new tokens; block_table
    (B, max_blocks) int32 for the paged cache, else None."""

    k: torch.Tensor
    v: torch.Tensor
    lens: torch.Tensor
    block_table: torch.Tensor | None = None


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
        # host-side: every lens[b] == filled (no ragged prefill or truncate since the last reset);
        # whoever writes lens other than through advance/truncate/reorder/reset must clear it
        self.uniform = True

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

    def update(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, *,
               theta: float | None = None, length: int | None = None) -> tuple[torch.Tensor, KVView]:
        """Write k, v (B, Hkv, T, D) of ``layer`` at ``positions`` (B, T); with ``theta``, q
        (B, H, T, D) and k are rotated by RoPE first, in the same launch
        (:func:`fastlm.ops.rope_append_kv`). Returns (q, rotated or as given; the :class:`KVView`
        over positions [0, length) — None: all max_len —, with lens + T). Reads no host-side
        state, so a decode step through it can be compiled or graph-captured."""
        q = rope_append_kv_layer(q, k, v, positions, self.k, self.v, layer, theta=theta)
        k_view, v_view = self.k[layer], self.v[layer]
        if length is not None:
            k_view, v_view = k_view[:, :, :length], v_view[:, :, :length]
        return q, KVView(k_view, v_view, self.lens + k.shape[2])

    def advance(self, num_new: int, lens: torch.Tensor | None = None) -> None:
        """Mark ``num_new`` more positions of every sequence as valid (after all layers wrote);
        with ``lens`` (B,), only lens[b] of them for sequence b (right-padded ragged prompts)."""
        self.lens += num_new if lens is None else lens.to(self.lens)
        self.filled += num_new
        if lens is not None:
            self.uniform = False

    def truncate(self, lens: torch.Tensor, filled: int) -> None:
        """Roll back to ``lens`` (B,) valid positions (e.g. rejected speculative tokens);
        ``filled`` is the new host-side upper bound of lens."""
        self.lens.copy_(lens)
        self.filled = filled
        self.uniform = False

    def decode_step(self, length: int) -> DecodeStepState:
        """The per-step state of an eager decode step of one token per sequence (see
        :class:`DecodeStepState`); ``length`` = filled + 1, the host bound after the step."""
        return DecodeStepState(self, length)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, step: DecodeStepState
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write one decode step's k, v (B, Hkv, 1, D) of ``layer`` at the step's positions;
        returns the layer's k, v views over [0, step.length) (B, Hkv, length, D). The same
        writes as :meth:`update` (the reference's scatter), the index built once per step."""
        k_layer, v_layer = self.k[layer], self.v[layer]
        k_layer.scatter_(2, step.index, k.to(k_layer.dtype))
        v_layer.scatter_(2, step.index, v.to(v_layer.dtype))
        n = step.length
        return k_layer[:, :, :n], v_layer[:, :, :n]

    def reorder(self, index: torch.Tensor) -> None:
        """Keep sequence index[i] as sequence i (beam and contrastive search): index (B,) int64.
        In place and over the filled positions only: per buffer, (L, B, Hkv, filled, D) is
        gathered along B and written back — never the whole buffer up to max_len, and the
        buffers keep their addresses (a captured graph stays valid)."""
        n = self.filled
        if n:
            for buffer in (self.k, self.v):
                part = buffer[:, :, :, :n]  # (L, B, Hkv, filled, D)
                part.copy_(part.index_select(1, index))
        self.lens.copy_(self.lens.index_select(0, index))

    def reset(self) -> None:
        self.lens.zero_()
        self.filled = 0
        self.uniform = True


class DecodeStepState:
    """What every layer of one eager decode step over a :class:`KVCache` shares, built once per
    step instead of once per layer (the step's host overhead is its op count): the positions
    (B, 1) of the new tokens, the scatter index of their k/v, lens + 1 (B,), RoPE cos/sin per
    base and the attention masks per sliding window. The arithmetic is the reference ops'
    (``fastlm.ops.rope_append_kv`` and ``fastlm.ops.decode_attention`` on the reference backend),
    bit for bit: the model takes this path only where those ops would run their references
    (eager, reference backend; see :meth:`fastlm.model.Model.forward_embeddings`).

    Attention reads positions [0, length), length = filled + 1. With n = lens[b] + 1 (after the
    step), query b sees keys j < n and, with a sliding window w, j > n - 1 - w. When every
    sequence has the same length (``cache.uniform``) and the window covers the view, no mask
    is needed.
    """

    def __init__(self, cache: KVCache, length: int) -> None:
        self.length = length
        self.positions = cache.lens[:, None]  # (B, 1)
        hkv, d = cache.k.shape[2], cache.k.shape[4]
        self.index = self.positions[:, None, :, None].expand(-1, hkv, -1, d)  # (B, Hkv, 1, D)
        self.lens = cache.lens + 1  # (B,) after the step
        self.uniform = cache.uniform
        self._rope: dict[float, tuple[torch.Tensor, torch.Tensor]] = {}
        self._masks: dict[int | None, torch.Tensor | None] = {}

    def rotate(self, x: torch.Tensor, theta: float) -> torch.Tensor:
        """x (B, H, 1, D) or (B, 1, H, D) rotated by plain RoPE with base ``theta`` at the step's
        positions, as the reference does (cos/sin computed once per step and base)."""
        tables = self._rope.get(theta)
        if tables is None:
            cos, sin = rope_cos_sin(self.positions, x.shape[-1], theta, x)  # (B, 1, D)
            tables = self._rope[theta] = (cos[:, None], sin[:, None])  # (B, 1, 1, D)
        return rotate_half(x, *tables)

    def _mask(self, window: int | None) -> torch.Tensor | None:
        """(B, 1, 1, length) bool of the keys each query sees, or None: all of them."""
        if window not in self._masks:
            self._masks[window] = step_mask(self.positions, self.length, window, self.uniform)
        return self._masks[window]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
               window: int | None = None, softcap: float | None = None) -> torch.Tensor:
        """q (B, H, 1, D) over k, v (B, Hkv, length, D) -> (B, H, 1, D): the reference of
        ``ops.decode_attention`` (SDPA in float32) with the step's mask; every sequence holds
        at least its new token, so no query is empty. Soft-capped scores go through the op."""
        if softcap is not None:
            return ops.decode_attention(q, k, v, self.lens, scale=scale, window=window, softcap=softcap)
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
        out = F.scaled_dot_product_attention(wide(q), wide(k), wide(v), attn_mask=self._mask(window), scale=scale,
                                             enable_gqa=q.shape[1] != k.shape[1])
        return out.to(q.dtype)


def step_mask(positions: torch.Tensor, length: int, window: int | None, uniform: bool) -> torch.Tensor | None:
    """The attention mask of a decode step over a static cache's first ``length`` positions:
    positions (B, 1) of the new tokens (each sequence's length before the step) -> (B, 1, 1,
    length) bool, key j visible to sequence b iff j <= positions[b] and, with a sliding window
    w, j > positions[b] - w; None (every key visible) when all lengths are equal (``uniform``)
    and the window covers the view."""
    if uniform and (window is None or window >= length):
        return None
    j = torch.arange(length, device=positions.device)[None, :]  # (1, L)
    mask = j <= positions
    if window is not None:
        mask = mask & (j > positions - window)
    return mask[:, None, None]


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
        self.refs: dict[int, int] = {}  # block -> how many sequences hold it (shared after a reorder)
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
        return len(self.refs)

    def _take_block(self) -> int:
        if not self.free_blocks:
            raise RuntimeError(
                f"PagedKVCache: out of blocks ({self.blocks_in_use} in use); free finished sequences "
                "or create the cache with more num_blocks"
            )
        block = self.free_blocks.pop()
        self.refs[block] = 1
        return block

    def _drop(self, block: int) -> None:
        self.refs[block] -= 1
        if not self.refs[block]:
            del self.refs[block]
            self.free_blocks.append(block)

    def positions(self, num_new: int) -> torch.Tensor:
        """Positions of the next ``num_new`` tokens (B, num_new), allocating blocks for them."""
        if self.filled + num_new > self.max_len:
            raise ValueError(
                f"PagedKVCache: {num_new} new tokens do not fit: {self.filled} of {self.max_len} positions are used"
            )
        needed = self.filled + num_new
        for seq in range(self.batch_size):
            while not self.released[seq] and self.reserved[seq] < needed:
                block = self._take_block()
                self.block_table[seq, len(self.seq_blocks[seq])] = block
                self.seq_blocks[seq].append(block)
                self.reserved[seq] += self.block_size
        return self.lens[:, None] + torch.arange(num_new, device=self.lens.device)

    def update(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, *,
               theta: float | None = None, length: int | None = None) -> tuple[torch.Tensor, KVView]:
        """As :meth:`KVCache.update`: k, v (B, Hkv, T, D) written at ``positions`` (B, T) of each
        sequence (q and k rotated by RoPE first with ``theta``); the view is the layer's pages
        with the block table, as :func:`fastlm.ops.decode_attention_paged` takes them
        (``length`` is not needed: the block table bounds what is read)."""
        if theta is not None:
            q, k = ops.rope(q, positions, theta=theta), ops.rope(k, positions, theta=theta)
        table = self.block_table.long()
        slot = torch.gather(table, 1, (positions // self.block_size).clamp(max=table.shape[1] - 1))
        block = slot.clamp(min=0)  # released sequences (-1) write to the scratch block 0
        offset = positions % self.block_size
        # pages[layer][block, :, offset, :] = k[b, :, t, :]
        self.k[layer][block, :, offset] = k.permute(0, 2, 1, 3).to(self.k.dtype)
        self.v[layer][block, :, offset] = v.permute(0, 2, 1, 3).to(self.v.dtype)
        return q, KVView(self.k[layer], self.v[layer], self.lens + k.shape[2], self.block_table)

    def advance(self, num_new: int, lens: torch.Tensor | None = None) -> None:
        self.lens += num_new if lens is None else lens.to(self.lens)
        self.filled += num_new

    def free(self, seq: int) -> None:
        """Return the blocks of finished sequence ``seq`` to the free list (those no other
        sequence shares)."""
        for block in reversed(self.seq_blocks[seq]):
            self._drop(block)
        self.seq_blocks[seq] = []
        self.block_table[seq] = -1
        self.released[seq] = True

    def reorder(self, index: torch.Tensor) -> None:
        """Keep sequence index[i] as sequence i (beam and contrastive search): index (B,) int64.
        The block tables are permuted and blocks shared (reference-counted), no page is copied
        except copy on write: a sequence kept more than once gets private copies of its blocks
        at or after its length (the partly filled block its next tokens are written to, and
        the reserved ones after it). Reads index and lens on the host (one read), where the
        block ownership lives."""
        if index.shape != (self.batch_size,):
            raise ValueError(f"PagedKVCache.reorder: index must have shape ({self.batch_size},), "
                             f"got {tuple(index.shape)}")
        order, lens = torch.stack((index.to(self.lens), self.lens)).tolist()
        if any(not 0 <= src < self.batch_size for src in order):
            raise ValueError(f"PagedKVCache.reorder: index must hold sequence numbers in [0, {self.batch_size}), "
                             f"got {order}")
        blocks = [list(self.seq_blocks[src]) for src in order]
        for row in blocks:
            for block in row:
                self.refs[block] += 1
        for row in self.seq_blocks:
            for block in row:
                self._drop(block)
        src, dst = [], []
        for i, row in enumerate(blocks):
            for j in range(lens[order[i]] // self.block_size, len(row)):
                if self.refs[row[j]] > 1:  # written next by more than one sequence: a private copy
                    self.refs[row[j]] -= 1
                    src.append(row[j])
                    row[j] = self._take_block()
                    dst.append(row[j])
        if src:
            src_t, dst_t = (torch.tensor(x, device=self.k.device) for x in (src, dst))
            for pages in (self.k, self.v):  # (L, num_blocks, Hkv, block_size, D)
                pages.index_copy_(1, dst_t, pages.index_select(1, src_t))
        self.seq_blocks = blocks
        self.reserved = [self.reserved[s] for s in order]
        self.released = [self.released[s] for s in order]
        table = torch.full(tuple(self.block_table.shape), -1, dtype=self.block_table.dtype)
        for i, row in enumerate(blocks):
            table[i, : len(row)] = torch.tensor(row, dtype=table.dtype)
        self.block_table.copy_(table)
        self.lens.copy_(self.lens.index_select(0, index.to(self.lens.device)))
