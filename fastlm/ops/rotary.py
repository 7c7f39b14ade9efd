"""Rotary position embedding: ``rope``, and ``rope_append_kv`` (RoPE on the new queries and keys
fused with their write into a static KV cache — the per-layer cache write of a decode step).

    angle[p, i] = p · theta^(-2i/D) (i < D/2), cos/sin duplicated over both halves of D,
    rope(x)     = x·cos + [-x2, x1]·sin          (Llama's rotate-half; x = [x1, x2])

Kernels: kernels/rope.py (rope forward and backward) and kernels/kv_append.py
(rope_append_kv), adapted in fastlm/ops/triton/rotary.py. ``rope_append_kv`` mutates the two
caches and is inference-only (no autograd).
"""

from __future__ import annotations

import functools
import weakref

import torch

from fastlm.ops.backend import select
from fastlm.ops.checks import check_floating, check_ndim, check_same_device, check_same_dtype
from fastlm.ops.common import wide
from fastlm.ops.registry import OpSpec, define_op, run

__all__ = ["rope", "rope_append_kv", "rope_append_kv_layer"]


# ---- references ---------------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _inv_freq(head_dim: int, theta: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """theta^(-2i/head_dim) for i < head_dim / 2 (cached: the same for every layer and step)."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=dtype) / head_dim))


def rope_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float, like: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of angle[p, i] = p · theta^(-2i/head_dim), duplicated over both halves.

    positions (..., T) -> cos/sin (..., T, head_dim) on like's device, in float32 (float64 if
    ``like`` is float64).
    """
    dtype = wide(like).dtype
    if torch.compiler.is_compiling():  # traced: the frequencies become constants of the graph
        inv_freq = _inv_freq.__wrapped__(head_dim, float(theta), dtype, like.device)
    else:
        inv_freq = _inv_freq(head_dim, float(theta), dtype, like.device)
    angles = positions.to(device=like.device, dtype=dtype)[..., None] * inv_freq
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def rope_reference(x: torch.Tensor, positions: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """Rotary embedding, Llama's rotate-half convention.

    x (B, H, T, D) with D even; positions (T,) or (B, T). With x = [x1, x2] split in halves,
    y = x·cos + [-x2, x1]·sin, angles from :func:`rope_cos_sin`.
    """
    cos, sin = rope_cos_sin(positions, x.shape[-1], theta, x)
    if positions.dim() == 2:  # (B, T, D) -> broadcast over heads
        cos, sin = cos[:, None], sin[:, None]
    return rotate_half(x, cos, sin)


def rotate_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x·cos + [-x2, x1]·sin in x's accumulation dtype, cast back to x's dtype; cos/sin
    broadcastable to x (..., D)."""
    xf = wide(x)
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)


def rope_append_kv_reference(q, k, v, positions, k_cache, v_cache, theta):
    """Rotate q and k with :func:`fastlm.ops.reference.rope` (cos/sin computed once), scatter k
    and v into the caches at ``positions``; returns rotated q (an empty tensor without theta)."""
    if theta is None:
        q_out = q.new_empty((0,))
    else:
        cos, sin = rope_cos_sin(positions, q.shape[-1], theta, q)
        q_out = rotate_half(q, cos[:, None], sin[:, None])
        k = rotate_half(k, cos[:, None], sin[:, None])
    index = positions[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
    k_cache.scatter_(2, index, k.to(k_cache.dtype))
    v_cache.scatter_(2, index, v.to(v_cache.dtype))
    return q_out


# ---- backward formula ---------------------------------------------------------------------------


def rope_backward(grad, x, positions, theta):
    """y = x·cos + R(x)·sin with R([x1, x2]) = [-x2, x1], so dx = dy·cos + Rᵀ(dy·sin), Rᵀ([a, b]) = [b, -a]."""
    cos, sin = rope_cos_sin(positions, x.shape[-1], theta, x)
    if positions.dim() == 2:
        cos, sin = cos[:, None], sin[:, None]
    dy = wide(grad)
    a, b = (dy * sin).chunk(2, dim=-1)
    return ((dy * cos + torch.cat((b, -a), dim=-1)).to(x.dtype),)


# ---- the reference backend's eager path -----------------------------------------------------------

# Tables of rope_eager, per positions tensor: the layers of one forward pass the same positions
# tensor to every rope call, so its tables are computed once per forward instead of once per call.
# key: (id(positions), head_dim, theta, dtype, device, inference mode) -> (weakref to positions,
# its version, cos, signed sin).
# An entry leaves when its positions tensor is freed; a stale id or an in-place change never hits.
_TABLES: dict[tuple, tuple] = {}
_TABLES_MAX = 16


def _drop_tables(key: tuple, ref: weakref.ref) -> None:
    entry = _TABLES.get(key)
    if entry is not None and entry[0] is ref:
        del _TABLES[key]


def _signed_tables(positions: torch.Tensor, head_dim: int, theta: float, like: torch.Tensor):
    """cos and signed sin [-sin, sin] (halves of D) of :func:`rope_cos_sin`, broadcastable to
    like (B, H, T, D): (T, D), or (B, 1, T, D) for (B, T) positions, in like's accumulation dtype."""
    cos, sin = rope_cos_sin(positions, head_dim, theta, like)
    half = head_dim // 2
    signed = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
    if positions.dim() == 2:  # (B, T, D) -> broadcast over heads
        cos, signed = cos[:, None], signed[:, None]
    return cos, signed


def _cached_signed_tables(positions: torch.Tensor, head_dim: int, theta: float, like: torch.Tensor):
    """:func:`_signed_tables`, memoized on the positions tensor's identity and version counter;
    tables made in inference mode are kept apart (they cannot be saved for a backward)."""
    key = (id(positions), head_dim, theta, wide(like).dtype, like.device, torch.is_inference_mode_enabled())
    entry = _TABLES.get(key)
    version = positions._version
    if entry is not None and entry[0]() is positions and entry[1] == version:
        return entry[2], entry[3]
    cos, signed = _signed_tables(positions, head_dim, theta, like)
    if len(_TABLES) >= _TABLES_MAX:
        _TABLES.clear()
    ref = weakref.ref(positions, lambda r, key=key: _drop_tables(key, r))
    _TABLES[key] = (ref, version, cos, signed)
    return cos, signed


def rope_eager(x: torch.Tensor, positions: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """What the reference backend runs: :func:`rope_reference`'s values (bit for bit, forward and
    backward) in fewer operations. With the halves swapped, P([x1, x2]) = [x2, x1] (a roll by D/2),
    and the signed sin s' = [-sin, sin]:

        y = x·cos + P(x)·s'            (= [x1·cos - x2·sin, x2·cos + x1·sin])

    so autograd's backward is dx = dy·cos + P(dy·s') (P is its own inverse): no split, negation or
    concatenation of x or dy. cos and s' are computed once per positions tensor (the layers of a
    forward share it). Under torch.compile, and for inference-tensor positions (no version
    counter to tell an in-place change), this is :func:`rope_reference` itself.
    x (B, H, T, D); positions (T,) or (B, T)."""
    if torch.compiler.is_compiling() or positions.is_inference() or type(positions) is not torch.Tensor:
        return rope_reference(x, positions, theta)
    cos, signed = _cached_signed_tables(positions, x.shape[-1], float(theta), x)
    xf = wide(x)
    return (xf * cos + xf.roll(x.shape[-1] // 2, dims=-1) * signed).to(x.dtype)


# ---- specs --------------------------------------------------------------------------------------


define_op(OpSpec(
    "rope",
    "Tensor x, Tensor positions, float theta",
    "Tensor",
    lambda x, positions, theta: torch.empty_like(x),
    differentiable=(0,),
    reference_fn=rope_reference,
    reference_backward_fn=rope_backward,
    reference_eager=rope_eager,
))
define_op(OpSpec(
    "rope_append_kv",
    "Tensor q, Tensor k, Tensor v, Tensor positions, Tensor(a!) k_cache, Tensor(b!) v_cache, float? theta",
    "Tensor",  # rope(q) (B, H, T, D), or an empty tensor without theta
    lambda q, k, v, positions, k_cache, v_cache, theta: torch.empty_like(q) if theta is not None else q.new_empty((0,)),
    mutates=("k_cache", "v_cache"),
    reference_fn=rope_append_kv_reference,
))


# ---- public functions ---------------------------------------------------------------------------


def rope(x: torch.Tensor, positions: torch.Tensor, *, theta: float = 10000.0) -> torch.Tensor:
    """Rotary position embedding (Llama's rotate-half convention).

    x (B, H, T, D), D even; positions (T,) or (B, T) integer positions. With x = [x1, x2]
    (halves of D) and angle[p, i] = p · theta^(-2i/D) for i < D/2:
    y = [x1·cos - x2·sin, x2·cos + x1·sin].
    """
    check_ndim("rope", x=(x, 4))
    check_floating("rope", x=x)
    if x.shape[-1] % 2:
        raise ValueError(f"rope: head dim must be even, got D={x.shape[-1]}")
    if positions.dtype.is_floating_point or positions.dtype == torch.bool:
        raise TypeError(f"rope: positions must be an integer tensor, got {positions.dtype}")
    if positions.device != x.device:
        raise ValueError(f"rope: positions on {positions.device} but x on {x.device}")
    b, _, t, _ = x.shape
    if positions.shape not in ((t,), (b, t)):
        raise ValueError(f"rope: positions must have shape ({t},) or ({b}, {t}), got {tuple(positions.shape)}")
    if theta <= 0:
        raise ValueError(f"rope: theta must be > 0, got {theta}")
    return run("rope", x.device, x, positions, float(theta))


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
    theta = _check_args(q, k, v, positions, k_cache, v_cache, theta)
    out = run("rope_append_kv", q.device, q, k, v, positions, k_cache, v_cache, theta)
    return q if theta is None else out


def _check_args(q, k, v, positions, k_cache, v_cache, theta) -> float | None:
    """Shapes, dtypes and devices of :func:`rope_append_kv`'s arguments; returns theta as a float.
    Valid arguments pass one pass of plain comparisons (:func:`_args_ok`, the per-call path); the
    checks below, which name the fault, run only when it says no."""
    if _args_ok(q, k, v, positions, k_cache, v_cache, theta):
        return None if theta is None else float(theta)
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


def _args_ok(q, k, v, positions, k_cache, v_cache, theta) -> bool:
    """Whether :func:`_check_args` passes (the same conditions, without naming the fault)."""
    tensor = torch.Tensor
    if not (isinstance(q, tensor) and isinstance(k, tensor) and isinstance(v, tensor) and isinstance(positions, tensor)
            and isinstance(k_cache, tensor) and isinstance(v_cache, tensor)):
        return False
    qs, ks, cs = q.shape, k.shape, k_cache.shape
    dtype, cache_dtype, device = q.dtype, k_cache.dtype, q.device
    if len(qs) != 4 or len(ks) != 4 or len(cs) != 4 or ks != v.shape or cs != v_cache.shape:
        return False
    b, h, t, d = qs
    return (dtype.is_floating_point and k.dtype == dtype and v.dtype == dtype and cache_dtype.is_floating_point
            and v_cache.dtype == cache_dtype and k.device == device and v.device == device
            and positions.device == device and k_cache.device == device and v_cache.device == device
            and ks[0] == b and ks[2] == t and ks[3] == d and not h % max(ks[1], 1)
            and cs[0] == b and cs[1] == ks[1] and cs[3] == d and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
            and positions.shape == (b, t) and not positions.dtype.is_floating_point and positions.dtype != torch.bool
            and (theta is None or (not d % 2 and theta > 0)))


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
        out = run("rope_append_kv", q.device, q, k, v, positions, k_caches[layer], v_caches[layer], theta)
        return q if theta is None else out
    if theta is not None:
        cos, sin = rope_cos_sin(positions, q.shape[-1], theta, q)
        q = rotate_half(q, cos[:, None], sin[:, None])
        k = rotate_half(k, cos[:, None], sin[:, None])
    b, hkv = k.shape[:2]
    rows = torch.arange(b, device=positions.device)[:, None, None]  # (B, 1, 1)
    heads = torch.arange(hkv, device=positions.device)[None, :, None]  # (1, Hkv, 1)
    # [layer, b, g, positions[b, t]] for every (b, g, t): (B, Hkv, T) row indices, like k
    index = (torch.full_like(rows, layer), rows, heads, positions.long()[:, None, :])
    k_caches.index_put_(index, k.to(k_caches.dtype))
    v_caches.index_put_(index, v.to(v_caches.dtype))
    return q
