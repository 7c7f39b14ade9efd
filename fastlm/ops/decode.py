"""Decode attention: the newest Tq tokens of each sequence over its KV cache.

Ops: ``decode_attention`` (a contiguous cache (B, Hkv, Lmax, D)) and
``decode_attention_paged`` (a paged cache addressed through a block table). Inference only
(no backward). Kernel: kernels/decode_attention.py (split-K), adapted in
fastlm/ops/triton/decode.py.

Math: query t of sequence b sits at position p = cache_lens[b] - Tq + t and sees keys j <= p
(and j > p - window with a sliding window); s = scale·q·kᵀ (soft-capped when softcap is
given), o = softmax(s)·v; a query that sees no key gives 0.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fastlm.ops.attn import _attention_core
from fastlm.ops.checks import (
    check_attention_inputs,
    check_floating,
    check_lengths,
    check_ndim,
    check_same_device,
    check_same_dtype,
    check_window_softcap,
)
from fastlm.ops.common import wide
from fastlm.ops.registry import OpSpec, define_op, run

__all__ = ["decode_attention", "decode_attention_paged", "gather_pages"]


# ---- references ---------------------------------------------------------------------------------


def decode_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_lens: torch.Tensor,
    scale: float | None = None,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Attention of the last Tq tokens of each sequence over its cached keys.

    q (B, H, Tq, D); caches (B, Hkv, Lmax, D); cache_lens (B,) valid lengths *including*
    the Tq new tokens, which sit at positions cache_lens[b] - Tq ... cache_lens[b] - 1.
    Query t of sequence b, at position p = cache_lens[b] - Tq + t, sees keys j <= p, and with a
    sliding window only j > p - window. softcap: scores s ← softcap·tanh(s / softcap).
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    tq, lmax = q.shape[2], k_cache.shape[2]
    t = torch.arange(tq, device=q.device)[None, :, None]
    j = torch.arange(lmax, device=q.device)[None, None, :]
    last_visible = cache_lens.to(q.device).view(-1, 1, 1) - tq + t  # (B, Tq, 1)
    visible = j <= last_visible
    if window is not None:
        visible = visible & (j > last_visible - window)
    visible = visible[:, None]  # (B, 1, Tq, Lmax)
    if softcap is not None:  # SDPA has no soft-cap: the materialized reference core
        return _attention_core(q, k_cache, v_cache, visible, scale, softcap)[0]
    # The same float32 softmax as _attention_core, through PyTorch's fused attention (no
    # materialized GQA copies or score matrix: this is also the CPU decode path).
    out = F.scaled_dot_product_attention(wide(q), wide(k_cache), wide(v_cache), attn_mask=visible, scale=scale,
                                         enable_gqa=q.shape[1] != k_cache.shape[1])
    # A query that sees no key (cache_lens < Tq) gets zeros, as in _attention_core.
    return torch.where(last_visible[:, None] >= 0, out, 0.0).to(q.dtype)


def gather_pages(pages: torch.Tensor, block_table: torch.Tensor) -> torch.Tensor:
    """pages (num_blocks, Hkv, block_size, D), block_table (B, max_blocks) -> contiguous
    (B, Hkv, max_blocks · block_size, D); unused entries (-1) read block 0 (masked by the lengths)."""
    blocks = pages[block_table.clamp(min=0).long()]  # (B, max_blocks, Hkv, bs, D)
    b, n, h, bs, d = blocks.shape
    return blocks.permute(0, 2, 1, 3, 4).reshape(b, h, n * bs, d)


def decode_attention_paged_reference(q, k_pages, v_pages, block_table, cache_lens, scale, window=None, softcap=None):
    """Gather each sequence's blocks, then :func:`fastlm.ops.reference.decode_attention`."""
    return decode_attention_reference(q, gather_pages(k_pages, block_table), gather_pages(v_pages, block_table),
                                      cache_lens, scale, window, softcap)


# ---- specs --------------------------------------------------------------------------------------


define_op(OpSpec(
    "decode_attention",
    "Tensor q, Tensor k_cache, Tensor v_cache, Tensor cache_lens, float? scale, int? window, float? softcap",
    "Tensor",
    lambda q, k, v, lens, scale, window, softcap: torch.empty_like(q),
    reference_fn=decode_attention_reference,
))
define_op(OpSpec(
    "decode_attention_paged",
    "Tensor q, Tensor k_pages, Tensor v_pages, Tensor block_table, Tensor cache_lens, float? scale, int? window, "
    "float? softcap",
    "Tensor",
    lambda q, k, v, table, lens, scale, window, softcap: torch.empty_like(q),
    reference_fn=decode_attention_paged_reference,
))


def _paged_inputs_ok(q, k_pages, v_pages, block_table, cache_lens) -> bool:
    """Whether :func:`_check_paged_inputs` would pass, in one pass of plain comparisons (the
    per-call path; the detailed checks run only when this says no)."""
    tensor = torch.Tensor
    if not (isinstance(q, tensor) and isinstance(k_pages, tensor) and isinstance(v_pages, tensor)
            and isinstance(block_table, tensor) and isinstance(cache_lens, tensor)):
        return False
    qs, ks, dtype, device = q.shape, k_pages.shape, q.dtype, q.device
    return (len(qs) == 4 and len(ks) == 4 and ks == v_pages.shape and block_table.dim() == 2
            and dtype.is_floating_point and k_pages.dtype == dtype and v_pages.dtype == dtype
            and k_pages.device == device and v_pages.device == device and block_table.device == device
            and cache_lens.device == device and ks[1] and not qs[1] % ks[1] and qs[3] == ks[3]
            and block_table.shape[0] == qs[0] and cache_lens.shape == (qs[0],)
            and block_table.dtype in (torch.int32, torch.int64))


def _check_paged_inputs(q, k_pages, v_pages, block_table, cache_lens) -> None:
    """The inputs of :func:`decode_attention_paged`, each fault named."""
    check_ndim("decode_attention_paged", q=(q, 4), k_pages=(k_pages, 4), v_pages=(v_pages, 4),
               block_table=(block_table, 2))
    check_floating("decode_attention_paged", q=q, k_pages=k_pages, v_pages=v_pages)
    check_same_dtype("decode_attention_paged", q=q, k_pages=k_pages, v_pages=v_pages)
    check_same_device("decode_attention_paged", q=q, k_pages=k_pages, v_pages=v_pages, block_table=block_table,
                      cache_lens=cache_lens)
    if k_pages.shape != v_pages.shape:
        raise ValueError(f"decode_attention_paged: k_pages {tuple(k_pages.shape)} and v_pages {tuple(v_pages.shape)} differ")
    if not k_pages.shape[1] or q.shape[1] % k_pages.shape[1] or q.shape[-1] != k_pages.shape[-1]:
        raise ValueError(
            f"decode_attention_paged: q (B, H={q.shape[1]}, Tq, D={q.shape[-1]}) does not fit pages with "
            f"Hkv={k_pages.shape[1]}, D={k_pages.shape[-1]} (H must be a multiple of Hkv, D equal)"
        )
    if block_table.shape[0] != q.shape[0] or cache_lens.shape != (q.shape[0],):
        raise ValueError("decode_attention_paged: block_table and cache_lens need one row per sequence of q")
    if block_table.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"decode_attention_paged: expected an integer block_table, got {block_table.dtype}")


# ---- public functions ---------------------------------------------------------------------------


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_lens: torch.Tensor,
    *,
    scale: float | None = None,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Attention of the newest Tq tokens of each sequence over its KV cache.

    q (B, H, Tq, D) (Tq = 1 for plain decoding, a few for speculative verification);
    k_cache, v_cache (B, Hkv, Lmax, D); cache_lens (B,) int: valid cache length of each
    sequence, *including* the Tq new tokens already written at cache_lens[b] - Tq ... - 1.
    Causal among the new tokens: query t, at position p = cache_lens[b] - Tq + t, sees keys
    j <= p, and with a sliding window (int >= 1) only j > p - window. softcap (float > 0):
    scores s ← softcap·tanh(s / softcap). Returns (B, H, Tq, D).
    """
    check_attention_inputs("decode_attention", q, k_cache, v_cache, ("q", "k_cache", "v_cache"))
    check_lengths("decode_attention cache_lens", cache_lens, q.shape[0], q.device)
    window, softcap = check_window_softcap("decode_attention", window, softcap)
    return run("decode_attention", q.device, q, k_cache, v_cache, cache_lens, scale, window, softcap)


def decode_attention_paged(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    block_table: torch.Tensor,
    cache_lens: torch.Tensor,
    *,
    scale: float | None = None,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Attention of the newest Tq tokens of each sequence over its paged KV cache.

    q (B, H, Tq, D); k_pages, v_pages (num_blocks, Hkv, block_size, D); block_table (B, max_blocks)
    int32: position p of sequence b lives in block block_table[b, p // block_size] at offset
    p % block_size; cache_lens (B,) valid lengths including the Tq new tokens. -> (B, H, Tq, D),
    the same as :func:`fastlm.ops.decode_attention` on the gathered cache (sliding ``window`` and
    ``softcap`` as there).
    """
    if not _paged_inputs_ok(q, k_pages, v_pages, block_table, cache_lens):
        _check_paged_inputs(q, k_pages, v_pages, block_table, cache_lens)
    window, softcap = check_window_softcap("decode_attention_paged", window, softcap)
    return run("decode_attention_paged", q.device, q, k_pages, v_pages, block_table, cache_lens, scale, window,
               softcap)
