"""``rope_append_kv``: rotate the new queries and keys (RoPE) and append keys and values to a
static KV cache — the per-layer cache write of a decode step, fused into one launch.

The op is ``fastlm::rope_append_kv`` (mutating the two caches) with a reference and a Triton
kernel (kernels/kv_append.py). It is inference-only: no autograd.
"""

from __future__ import annotations

import torch

from fastlm.ops import reference
from fastlm.ops.backend import kernel_for, kernel_module, register_kernel, select
from fastlm.ops.checks import check_floating, check_ndim, check_same_device, check_same_dtype


@register_kernel("rope_append_kv", "reference")
def rope_append_kv_reference(q, k, v, positions, k_cache, v_cache, theta):
    """Rotate q and k with :func:`fastlm.ops.reference.rope` (cos/sin computed once), scatter k
    and v into the caches at ``positions``; returns rotated q (an empty tensor without theta)."""
    if theta is None:
        q_out = q.new_empty((0,))
    else:
        cos, sin = reference.rope_cos_sin(positions, q.shape[-1], theta, q)
        q_out = reference.rotate_half(q, cos[:, None], sin[:, None])
        k = reference.rotate_half(k, cos[:, None], sin[:, None])
    index = positions[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
    k_cache.scatter_(2, index, k.to(k_cache.dtype))
    v_cache.scatter_(2, index, v.to(v_cache.dtype))
    return q_out


@register_kernel("rope_append_kv", "triton")
def _rope_append_kv_triton(q, k, v, positions, k_cache, v_cache, theta):
    q_out = kernel_module("kv_append").rope_append_kv(q, k, v, positions, k_cache, v_cache, theta)
    return q_out if theta is not None else q.new_empty((0,))


@torch.library.custom_op("fastlm::rope_append_kv", mutates_args=("k_cache", "v_cache"))
def _rope_append_kv_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                       k_cache: torch.Tensor, v_cache: torch.Tensor, theta: float | None, backend: str) -> torch.Tensor:
    return kernel_for("rope_append_kv", backend)(q, k, v, positions, k_cache, v_cache, theta)


@_rope_append_kv_op.register_fake
def _(q, k, v, positions, k_cache, v_cache, theta, backend):
    return torch.empty_like(q) if theta is not None else q.new_empty((0,))


def rope_append_kv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    *,
    theta: float | None = None,
) -> torch.Tensor:
    """Rotate q and k by RoPE and write k and v into the cache at their positions.

    q (B, H, T, D); k, v (B, Hkv, T, D); positions (B, T) integer, each < Lmax (the caller
    checks capacity: the reference raises on an out-of-range position, the kernel drops the
    write); k_cache, v_cache (B, Hkv, Lmax, D) with unit stride on D, updated in place:
    k_cache[b, g, positions[b, t]] = rope(k)[b, g, t] and likewise v (cast to the cache dtype).
    theta: the RoPE base, or None for no rotation (GPT-2). Returns rope(q) (B, H, T, D), or q
    itself when theta is None. Equal to :func:`fastlm.ops.rope` on q and k followed by a scatter.
    """
    return _run(q, k, v, positions, k_cache, v_cache, _check_args(q, k, v, positions, k_cache, v_cache, theta))


def _run(q, k, v, positions, k_cache, v_cache, theta: float | None) -> torch.Tensor:
    """:func:`rope_append_kv` on checked arguments, through the selected backend."""
    backend = select("rope_append_kv", q.device)
    if backend == "reference":
        out = rope_append_kv_reference(q, k, v, positions, k_cache, v_cache, theta)
    else:
        out = torch.ops.fastlm.rope_append_kv(q, k, v, positions, k_cache, v_cache, theta, backend)
    return q if theta is None else out


def _check_args(q, k, v, positions, k_cache, v_cache, theta) -> float | None:
    """Shapes, dtypes and devices of :func:`rope_append_kv`'s arguments; returns theta as a float."""
    name = "rope_append_kv"
    check_ndim(name, q=(q, 4), k=(k, 4), v=(v, 4), k_cache=(k_cache, 4), v_cache=(v_cache, 4),
               positions=(positions, 2))
    check_floating(name, q=q, k=k, v=v, k_cache=k_cache, v_cache=v_cache)
    check_same_dtype(name, q=q, k=k, v=v)
    check_same_dtype(name, k_cache=k_cache, v_cache=v_cache)
    check_same_device(name, q=q, k=k, v=v, positions=positions, k_cache=k_cache, v_cache=v_cache)
    b, h, t, d = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[2] != t or k.shape[3] != d or h % max(k.shape[1], 1):
        raise ValueError(f"{name}: k and v must be (B={b}, Hkv, T={t}, D={d}) with H={h} a multiple of Hkv, "
                         f"got k {tuple(k.shape)} and v {tuple(v.shape)}")
    if k_cache.shape != v_cache.shape or k_cache.shape[:2] != k.shape[:2] or k_cache.shape[3] != d:
        raise ValueError(f"{name}: caches must be (B={b}, Hkv={k.shape[1]}, Lmax, D={d}), "
                         f"got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError(f"{name}: the caches need a unit stride on D (they are written in place)")
    if positions.shape != (b, t) or positions.dtype.is_floating_point or positions.dtype == torch.bool:
        raise ValueError(f"{name}: positions must be a ({b}, {t}) integer tensor, got "
                         f"{tuple(positions.shape)} {positions.dtype}")
    if theta is not None and (d % 2 or theta <= 0):
        raise ValueError(f"{name}: RoPE needs an even head dim and theta > 0, got D={d}, theta={theta}")
    return None if theta is None else float(theta)


def rope_append_kv_layer(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    k_caches: torch.Tensor,
    v_caches: torch.Tensor,
    layer: int,
    *,
    theta: float | None = None,
) -> torch.Tensor:
    """:func:`rope_append_kv` into layer ``layer`` of stacked caches k_caches, v_caches
    (L, B, Hkv, Lmax, D): the same result as ``rope_append_kv(..., k_caches[layer],
    v_caches[layer])``. Under torch.compile on the reference backend the rotation is traced
    and the write is one ``index_put_`` into the stacked buffers, which the compiler keeps in
    place; a ``scatter_`` into a layer's view would become a copy of the whole cache each step
    (functionalization of a mutated view of a graph input)."""
    theta = _check_args(q, k, v, positions, k_caches[layer], v_caches[layer], theta)
    if not (torch.compiler.is_compiling() and select("rope_append_kv", q.device) == "reference"):
        return _run(q, k, v, positions, k_caches[layer], v_caches[layer], theta)
    if theta is not None:
        cos, sin = reference.rope_cos_sin(positions, q.shape[-1], theta, q)
        q = reference.rotate_half(q, cos[:, None], sin[:, None])
        k = reference.rotate_half(k, cos[:, None], sin[:, None])
    b, hkv = k.shape[:2]
    rows = torch.arange(b, device=positions.device)[:, None, None]  # (B, 1, 1)
    heads = torch.arange(hkv, device=positions.device)[None, :, None]  # (1, Hkv, 1)
    # [layer, b, g, positions[b, t]] for every (b, g, t): (B, Hkv, T) row indices, like k
    index = (torch.full_like(rows, layer), rows, heads, positions.long()[:, None, :])
    k_caches.index_put_(index, k.to(k_caches.dtype))
    v_caches.index_put_(index, v.to(v_caches.dtype))
    return q
