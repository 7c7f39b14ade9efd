"""Triton adapters of the decode family (fastlm/ops/decode.py): kernels/decode_attention.py
(split-K over the cache) as the ``triton`` backend of ``decode_attention`` and
``decode_attention_paged`` (kernel module imported on first call)."""

from __future__ import annotations

from fastlm.ops.backend import kernel_module, register_kernel


@register_kernel("decode_attention", "triton")
def decode_attention(q, k_cache, v_cache, cache_lens, scale, window, softcap):
    return kernel_module("decode_attention").decode_attention(q, k_cache, v_cache, cache_lens, scale,
                                                              window=window, softcap=softcap)


@register_kernel("decode_attention_paged", "triton")
def decode_attention_paged(q, k_pages, v_pages, block_table, cache_lens, scale, window, softcap):
    return kernel_module("decode_attention").decode_attention(q, k_pages, v_pages, cache_lens, scale,
                                                              block_table=block_table, window=window, softcap=softcap)
