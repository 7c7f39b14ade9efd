"""Rotate the new queries/keys (RoPE) and append the new keys/values to a static KV cache, in
one Triton launch (the per-layer write of a decode step).

Math, per token (b, t) at position p = positions[b, t] and per head, with x = [x1, x2] split in
halves of D and angle[i] = p · inv_freq[i] (see kernels/rope.py):

    q_out[b, h, t]        = [q1·cos − q2·sin, q2·cos + q1·sin]     (h < H)
    k_cache[b, g, p]      = the same rotation of k[b, g, t]        (g < Hkv)
    v_cache[b, g, p]      = v[b, g, t]

Without rotation (GPT-2: ``rotate=False``) q is not touched and k/v are copied. One program per
(token, head): programs with head < NQ (H when rotating, else 0) write q_out, the others one
k/v head of the cache. Writes at positions outside [0, Lmax) are dropped (the caller checks
capacity on the host). Math in float32 (float64 for float64 inputs); the rotated key is rounded
to k's dtype and then cast to the cache's dtype, as the reference does. Imports nothing of fastlm.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import cast_rne as _cast
from .rope import cos_sin, inv_freq


@triton.jit
def _append_row(SRC, DST, pos, D, L, BLOCK_D: tl.constexpr):
    """DST[pos, :D] = SRC[:D] (cast to DST's dtype); nothing written when pos is outside [0, L)."""
    d = tl.arange(0, BLOCK_D)
    pos_d = pos + tl.zeros_like(d).to(tl.int64)  # a vector mask: the interpreter refuses scalar & vector
    mask = (d < D) & (pos_d >= 0) & (pos_d < L)
    x = tl.load(SRC + d, mask=mask, other=0.0)
    tl.store(DST + d, x.to(DST.dtype.element_ty), mask=mask)


@triton.jit
def _rope_append_kernel(
    Q, K, V, POS, INV_FREQ, Q_OUT, K_CACHE, V_CACHE,
    T, NQ, HALF, D, L,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_ob, stride_oh, stride_ot,
    stride_kcb, stride_kch, stride_kcl,
    stride_vcb, stride_vch, stride_vcl,
    stride_pb, stride_pt,
    ROTATE: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_D: tl.constexpr,
    ACC: tl.constexpr, REDUCE: tl.constexpr,
):
    token = tl.program_id(0)
    head = tl.program_id(1)
    b = (token // T).to(tl.int64)
    t = (token % T).to(tl.int64)
    pos = tl.load(POS + b * stride_pb + t * stride_pt).to(tl.int64)
    g = (head - NQ).to(tl.int64)  # the key/value head of a program with head >= NQ
    k_src = K + b * stride_kb + g * stride_kh + t * stride_kt
    k_dst = K_CACHE + b * stride_kcb + g * stride_kch + pos * stride_kcl
    v_src = V + b * stride_vb + g * stride_vh + t * stride_vt
    v_dst = V_CACHE + b * stride_vcb + g * stride_vch + pos * stride_vcl
    # cos/sin exist only in the rotating build: every use of them sits under `if ROTATE`, which is
    # resolved at compile time (the non-rotating build, GPT-2, must compile without them).
    if ROTATE:
        half = tl.arange(0, BLOCK_HALF)
        half_mask = half < HALF
        freq = tl.load(INV_FREQ + half, mask=half_mask, other=0.0)
        cos, sin = cos_sin(pos.to(ACC) * freq, REDUCE)
        if head < NQ:  # a query head: rotate into q_out
            src = Q + b * stride_qb + head * stride_qh + t * stride_qt + half
            dst = Q_OUT + b * stride_ob + head * stride_oh + t * stride_ot + half
            x1 = tl.load(src, mask=half_mask, other=0.0).to(ACC)
            x2 = tl.load(src + HALF, mask=half_mask, other=0.0).to(ACC)
            tl.store(dst, _cast(x1 * cos - x2 * sin, Q_OUT.dtype.element_ty), mask=half_mask)
            tl.store(dst + HALF, _cast(x2 * cos + x1 * sin, Q_OUT.dtype.element_ty), mask=half_mask)
        else:  # a key/value head: append v, rotate k and append it at position pos
            _append_row(v_src, v_dst, pos, D, L, BLOCK_D)
            pos_h = pos + tl.zeros_like(half).to(tl.int64)
            rot_mask = half_mask & (pos_h >= 0) & (pos_h < L)
            x1 = tl.load(k_src + half, mask=rot_mask, other=0.0).to(ACC)
            x2 = tl.load(k_src + HALF + half, mask=rot_mask, other=0.0).to(ACC)
            y1 = _cast(x1 * cos - x2 * sin, K.dtype.element_ty).to(K_CACHE.dtype.element_ty)
            y2 = _cast(x2 * cos + x1 * sin, K.dtype.element_ty).to(K_CACHE.dtype.element_ty)
            tl.store(k_dst + half, y1, mask=rot_mask)
            tl.store(k_dst + HALF + half, y2, mask=rot_mask)
    else:  # no rotation (NQ = 0): every program appends one k/v head
        _append_row(v_src, v_dst, pos, D, L, BLOCK_D)
        _append_row(k_src, k_dst, pos, D, L, BLOCK_D)


def rope_append_kv(q, k, v, positions, k_cache, v_cache, theta):
    """q (B, H, T, D), k/v (B, Hkv, T, D), positions (B, T) int, caches (B, Hkv, Lmax, D) with
    unit stride on D, theta (None: no rotation) -> q rotated (B, H, T, D), or q itself when
    theta is None; k (rotated) and v are written into the caches in place at their positions."""
    b, h, t, d = q.shape
    hkv = k.shape[1]
    rotate = theta is not None
    q_out = torch.empty_like(q) if rotate else q
    if q.numel() == 0:
        return q_out
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    if rotate and q_out.stride(-1) != 1:
        q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    freqs = inv_freq(d, theta, q.device, acc) if rotate else q.new_empty((1,), dtype=acc)
    num_q = h if rotate else 0
    _rope_append_kernel[(b * t, num_q + hkv)](
        q, k, v, positions, freqs, q_out, k_cache, v_cache,
        t, num_q, d // 2, d, k_cache.shape[2],
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        q_out.stride(0), q_out.stride(1), q_out.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        positions.stride(0), positions.stride(1),
        ROTATE=rotate, BLOCK_HALF=triton.next_power_of_2(max(d // 2, 1)), BLOCK_D=triton.next_power_of_2(d),
        ACC=tl.float64 if acc == torch.float64 else tl.float32, REDUCE=acc == torch.float32,
        num_warps=1 if d <= 128 else 2,
    )
    return q_out
