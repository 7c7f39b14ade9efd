"""Decode attention over a paged KV cache (fixed-size blocks addressed through a block table)."""

from __future__ import annotations

import torch

from fastlm.ops import reference
from fastlm.ops.checks import check_floating, check_ndim, check_same_device, check_same_dtype, check_window_softcap
from fastlm.ops.registry import OpSpec, define_op, run


def gather_pages(pages: torch.Tensor, block_table: torch.Tensor) -> torch.Tensor:
    """pages (num_blocks, Hkv, block_size, D), block_table (B, max_blocks) -> contiguous
    (B, Hkv, max_blocks · block_size, D); unused entries (-1) read block 0 (masked by the lengths)."""
    blocks = pages[block_table.clamp(min=0).long()]  # (B, max_blocks, Hkv, bs, D)
    b, n, h, bs, d = blocks.shape
    return blocks.permute(0, 2, 1, 3, 4).reshape(b, h, n * bs, d)


def decode_attention_paged_reference(q, k_pages, v_pages, block_table, cache_lens, scale, window=None, softcap=None):
    """Gather each sequence's blocks, then :func:`fastlm.ops.reference.decode_attention`."""
    return reference.decode_attention(q, gather_pages(k_pages, block_table), gather_pages(v_pages, block_table),
                                      cache_lens, scale, window, softcap)


define_op(OpSpec(
    "decode_attention_paged",
    "Tensor q, Tensor k_pages, Tensor v_pages, Tensor block_table, Tensor cache_lens, float? scale, int? window, "
    "float? softcap",
    "Tensor",
    lambda q, k, v, table, lens, scale, window, softcap: torch.empty_like(q),
    reference_fn=decode_attention_paged_reference,
))


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
    check_ndim("decode_attention_paged", q=(q, 4), k_pages=(k_pages, 4), v_pages=(v_pages, 4),
               block_table=(block_table, 2))
    check_floating("decode_attention_paged", q=q, k_pages=k_pages, v_pages=v_pages)
    check_same_dtype("decode_attention_paged", q=q, k_pages=k_pages, v_pages=v_pages)
    check_same_device("decode_attention_paged", q=q, k_pages=k_pages, v_pages=v_pages, block_table=block_table,
                      cache_lens=cache_lens)
    if k_pages.shape != v_pages.shape:
        raise ValueError(f"decode_attention_paged: k_pages {tuple(k_pages.shape)} and v_pages {tuple(v_pages.shape)} differ")
    if q.shape[1] % k_pages.shape[1] or q.shape[-1] != k_pages.shape[-1]:
        raise ValueError(
            f"decode_attention_paged: q (B, H={q.shape[1]}, Tq, D={q.shape[-1]}) does not fit pages with "
            f"Hkv={k_pages.shape[1]}, D={k_pages.shape[-1]} (H must be a multiple of Hkv, D equal)"
        )
    if block_table.shape[0] != q.shape[0] or cache_lens.shape != (q.shape[0],):
        raise ValueError("decode_attention_paged: block_table and cache_lens need one row per sequence of q")
    if block_table.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"decode_attention_paged: expected an integer block_table, got {block_table.dtype}")
    window, softcap = check_window_softcap("decode_attention_paged", window, softcap)
    return run("decode_attention_paged", q.device, q, k_pages, v_pages, block_table, cache_lens, scale, window,
               softcap)
