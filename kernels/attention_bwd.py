"""FlashAttention-2-style attention backward in Triton (dense, padded and packed batches).

With the forward's saved output o and logsumexp lse (natural log), for visible (i, j)::

    P_ij  = exp(scale · q_i·k_j - lse_i)          (recomputed tile by tile; 0 where not visible)
    dV_j  = Σ_i P_ij · dO_i
    dP_ij = dO_i · v_j
    Δ_i   = Σ_d dO_id · o_id = rowsum(dO ∘ O)      (_attn_bwd_preprocess)
    dS_ij = P_ij · (dP_ij - Δ_i)
    dQ_i  = scale · Σ_j dS_ij · k_j                 (_attn_bwd_dq: one program per query tile)
    dK_j  = scale · Σ_i dS_ij · q_i                 (_attn_bwd_dkdv: one program per key tile)

With a soft-cap c the scores are s = c·tanh(r / c) of the raw r = scale · q·k, so dS is
multiplied by ds/dr = 1 - tanh²(r / c) before dQ and dK. Sliding window: as the forward, key
and query tiles wholly outside the window are skipped.

Rows with lse = -inf (no visible key) get P = 0, hence zero gradients and no NaN. GQA: dK and
dV of kv head g sum over the query heads g·G .. g·G + G - 1 (G = H / Hkv). The default
(deterministic) scheme loops over the G heads inside one program per (key tile, kv head), so
no atomics are used and results are bit-identical run to run. The split scheme (``split_heads``,
only when non-determinism is allowed) runs one program per (key tile, query head) and adds into
fp32 dK/dV buffers with atomics: G times more programs, for GQA/MQA with few kv heads.

Masking, layouts and tiling conventions are those of :mod:`.attention` (the forward).
"""

from __future__ import annotations

import contextlib
import functools

import torch
import triton
import triton.language as tl

from .attention import (
    HEAVY, PLAIN,
    Problem,
    _configs,
    _key_ranges,
    _mma,
    _rows_mask,
    _rtne,
    _seq_bounds,
    _tanh,
    _visible,
    arch_table,
    check_inputs,
    dense_problem,
    device_major,
    empty_like_rows,
    interpreting,
    last_dim_contiguous,
    seq_bucket,
    tiles_grid,
    varlen_problem,
)


@triton.jit
def _attn_bwd_preprocess(
    O, DO, DELTA, CU_Q,
    stride_ob, stride_oh, stride_ot,
    stride_dob, stride_doh, stride_dot,
    stride_lb, stride_lh, stride_lt,
    num_heads, seqlen_q,
    HEAD_DIM_REAL: tl.constexpr, HEAD_DIM: tl.constexpr, EVEN_D: tl.constexpr,
    IS_VARLEN: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Δ_i = Σ_d dO_id · O_id in float32, stored in lse's layout. Grid as the forward's (1-D)."""
    tiles = tl.cdiv(seqlen_q, BLOCK_M)
    start_m = tl.program_id(0) % tiles
    bh = tl.program_id(0) // tiles
    b = bh // num_heads
    h = bh % num_heads
    q_start, q_len, _, _, _ = _seq_bounds(b, CU_Q, CU_Q, CU_Q, seqlen_q, seqlen_q, IS_VARLEN, False)
    if start_m * BLOCK_M >= q_len:
        return
    b64 = b.to(tl.int64)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    mask = _rows_mask(offs_m, q_len, offs_d, HEAD_DIM_REAL, EVEN_D)
    o_base = O + b64 * stride_ob + h.to(tl.int64) * stride_oh + q_start.to(tl.int64) * stride_ot
    do_base = DO + b64 * stride_dob + h.to(tl.int64) * stride_doh + q_start.to(tl.int64) * stride_dot
    o = tl.load(o_base + offs_m[:, None] * stride_ot + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    do = tl.load(do_base + offs_m[:, None] * stride_dot + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    delta = tl.sum(o * do, 1)
    l_base = DELTA + b64 * stride_lb + h.to(tl.int64) * stride_lh + q_start.to(tl.int64) * stride_lt
    tl.store(l_base + offs_m * stride_lt, delta, mask=offs_m < q_len)


@triton.jit
def _attn_bwd_dkdv_inner(
    dk, dv, k, v, qT_ptrs, do_ptrs, lse_ptr, delta_ptr, stride_qt, stride_dot, stride_lt,
    start_m, end_m, q_len, offs_n, offs_d, k_vis, causal_offset, window, qk_scale, cap,
    HEAD_DIM_REAL: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_M: tl.constexpr, MASKED: tl.constexpr,
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Accumulate dK, dV of one key tile over the query tiles start_m .. end_m of one head.
    Works transposed (key rows × query columns) so that dK, dV accumulate in registers."""
    for start in range(start_m, end_m, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M)
        if EVEN_D:
            qT_mask = offs_m[None, :] < q_len
        else:
            qT_mask = (offs_m[None, :] < q_len) & (offs_d[:, None] < HEAD_DIM_REAL)
        qT = tl.load(qT_ptrs + start * stride_qt, mask=qT_mask, other=0.0)  # (HEAD_DIM, BLOCK_M)
        lse = tl.load(lse_ptr + offs_m * stride_lt, mask=offs_m < q_len, other=float("inf"))
        lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634  # base 2; P = 0 on empty rows
        sT = _mma(k, qT, None, DOT_PRECISION, UPCAST) * qk_scale  # (BLOCK_N, BLOCK_M)
        if SOFTCAP:
            tT = _tanh(sT)
            sT = cap * tT
        pT = tl.math.exp2(sT - lse[None, :])
        if MASKED:  # _visible of the transposed tile
            visible = tl.trans(_visible(offs_m, offs_n, k_vis, causal_offset, window, CAUSAL, WINDOW))
            pT = tl.where(visible, pT, 0.0)
        do = tl.load(do_ptrs + start * stride_dot, mask=_rows_mask(offs_m, q_len, offs_d, HEAD_DIM_REAL, EVEN_D),
                     other=0.0)  # (BLOCK_M, HEAD_DIM)
        dv = _mma(_rtne(pT, UPCAST).to(do.dtype), do, dv, DOT_PRECISION, UPCAST)
        delta = tl.load(delta_ptr + offs_m * stride_lt, mask=offs_m < q_len, other=0.0)
        dpT = _mma(v, tl.trans(do), None, DOT_PRECISION, UPCAST)
        dsT = pT * (dpT - delta[None, :])
        if SOFTCAP:
            dsT = dsT * (1.0 - tT * tT)
        dk = _mma(_rtne(dsT, UPCAST).to(qT.dtype), tl.trans(qT), dk, DOT_PRECISION, UPCAST)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(
    Q, K, V, DO, LSE, DELTA, DK, DV, CU_Q, CU_K, KEY_LENS,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_dob, stride_doh, stride_dot,
    stride_dkb, stride_dkh, stride_dkt,
    stride_dvb, stride_dvh, stride_dvt,
    stride_lb, stride_lh, stride_lt,
    num_heads, num_kv_heads, group, seqlen_q, seqlen_k, window, qk_scale, cap, scale,
    seq_bucket_q, seq_bucket_k,  # autotune keys only
    HEAD_DIM_REAL: tl.constexpr, HEAD_DIM: tl.constexpr, EVEN_D: tl.constexpr,
    CAUSAL: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_KEY_LENS: tl.constexpr,
    WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, ATOMIC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dK, dV of BLOCK_N key rows. Grid: (cdiv(max_seqlen_k, BLOCK_N) · num_seqs · Hkv,) (key
    tiles fastest), looping over the G query heads of the kv head; with ATOMIC, one program per
    query head (· H instead of · Hkv) and fp32 atomics."""
    tiles = tl.cdiv(seqlen_k, BLOCK_N)
    start_n = tl.program_id(0) % tiles
    bh = tl.program_id(0) // tiles
    if ATOMIC:
        b = bh // num_heads
        h_first = bh % num_heads
        kvh = h_first // group
        num_q_heads = 1
    else:
        b = bh // num_kv_heads
        kvh = bh % num_kv_heads
        h_first = kvh * group
        num_q_heads = group
    q_start, q_len, k_start, k_len, k_vis = _seq_bounds(
        b, CU_Q, CU_K, KEY_LENS, seqlen_q, seqlen_k, IS_VARLEN, HAS_KEY_LENS)
    if start_n * BLOCK_N >= k_len:
        return
    causal_offset = k_len - q_len
    b64 = b.to(tl.int64)
    offs_n = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    kv_mask = _rows_mask(offs_n, k_len, offs_d, HEAD_DIM_REAL, EVEN_D)
    k_base = K + b64 * stride_kb + kvh.to(tl.int64) * stride_kh + k_start.to(tl.int64) * stride_kt
    v_base = V + b64 * stride_vb + kvh.to(tl.int64) * stride_vh + k_start.to(tl.int64) * stride_vt
    k = tl.load(k_base + offs_n[:, None] * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(v_base + offs_n[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)

    # Query tiles [m_lo, full_lo) need masks; [full_lo, q_len) see every key of this tile.
    n_lo = start_n * BLOCK_N
    q_ceil = tl.cdiv(q_len, BLOCK_M) * BLOCK_M
    if CAUSAL:  # first query that sees key n_lo / sees key n_lo + BLOCK_N - 1
        m_lo = (tl.maximum(n_lo - causal_offset, 0) // BLOCK_M) * BLOCK_M
        full_lo = tl.cdiv(tl.maximum(n_lo + BLOCK_N - 1 - causal_offset, 0), BLOCK_M) * BLOCK_M
    else:
        m_lo = n_lo * 0
        full_lo = n_lo * 0
    full_lo = tl.where(n_lo + BLOCK_N <= k_vis, full_lo, q_ceil)  # tile crosses key_lens: mask all
    m_lo = tl.minimum(tl.where(n_lo < k_vis, m_lo, q_ceil), q_ceil)  # tile past key_lens: no query
    full_lo = tl.minimum(tl.maximum(full_lo, m_lo), q_ceil)
    if WINDOW:  # query i sees key n iff n > p_i - window: rows [full_lo, full_hi) see the whole tile,
        # rows [full_hi, m_hi) part of it, later rows none of it
        m_hi = tl.minimum(tl.maximum(n_lo + BLOCK_N - 1 + window - causal_offset, 0), q_len)
        full_hi = (tl.maximum(n_lo + window - causal_offset, 0) // BLOCK_M) * BLOCK_M
        full_hi = tl.minimum(tl.maximum(full_hi, full_lo), q_ceil)
    else:
        m_hi = q_len
        full_hi = q_ceil
    masked_end = tl.minimum(full_lo, m_hi)

    for g in range(num_q_heads):
        h64 = (h_first + g).to(tl.int64)
        q_base = Q + b64 * stride_qb + h64 * stride_qh + q_start.to(tl.int64) * stride_qt
        do_base = DO + b64 * stride_dob + h64 * stride_doh + q_start.to(tl.int64) * stride_dot
        l_off = b64 * stride_lb + h64 * stride_lh + q_start.to(tl.int64) * stride_lt
        offs_m = tl.arange(0, BLOCK_M)
        qT_ptrs = q_base + offs_m[None, :] * stride_qt + offs_d[:, None]
        do_ptrs = do_base + offs_m[:, None] * stride_dot + offs_d[None, :]
        dk, dv = _attn_bwd_dkdv_inner(
            dk, dv, k, v, qT_ptrs, do_ptrs, LSE + l_off, DELTA + l_off, stride_qt, stride_dot, stride_lt,
            m_lo, masked_end, q_len, offs_n, offs_d, k_vis, causal_offset, window, qk_scale, cap,
            HEAD_DIM_REAL, EVEN_D, BLOCK_M, True, CAUSAL, WINDOW, SOFTCAP, DOT_PRECISION, UPCAST)
        dk, dv = _attn_bwd_dkdv_inner(
            dk, dv, k, v, qT_ptrs, do_ptrs, LSE + l_off, DELTA + l_off, stride_qt, stride_dot, stride_lt,
            full_lo, tl.minimum(full_hi, q_len), q_len, offs_n, offs_d, k_vis, causal_offset, window, qk_scale, cap,
            HEAD_DIM_REAL, EVEN_D, BLOCK_M, False, CAUSAL, WINDOW, SOFTCAP, DOT_PRECISION, UPCAST)
        if WINDOW:
            dk, dv = _attn_bwd_dkdv_inner(
                dk, dv, k, v, qT_ptrs, do_ptrs, LSE + l_off, DELTA + l_off, stride_qt, stride_dot, stride_lt,
                full_hi, m_hi, q_len, offs_n, offs_d, k_vis, causal_offset, window, qk_scale, cap,
                HEAD_DIM_REAL, EVEN_D, BLOCK_M, True, CAUSAL, WINDOW, SOFTCAP, DOT_PRECISION, UPCAST)

    dk = dk * scale
    dk_base = DK + b64 * stride_dkb + kvh.to(tl.int64) * stride_dkh + k_start.to(tl.int64) * stride_dkt
    dv_base = DV + b64 * stride_dvb + kvh.to(tl.int64) * stride_dvh + k_start.to(tl.int64) * stride_dvt
    dk_ptrs = dk_base + offs_n[:, None] * stride_dkt + offs_d[None, :]
    dv_ptrs = dv_base + offs_n[:, None] * stride_dvt + offs_d[None, :]
    if ATOMIC:
        tl.atomic_add(dk_ptrs, dk, mask=kv_mask)
        tl.atomic_add(dv_ptrs, dv, mask=kv_mask)
    else:
        tl.store(dk_ptrs, _rtne(dk, UPCAST).to(DK.dtype.element_ty), mask=kv_mask)
        tl.store(dv_ptrs, _rtne(dv, UPCAST).to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _attn_bwd_dq_inner(
    dq, q, do, lse, delta, kT_ptrs, vT_ptrs, stride_kt, stride_vt, start_n, end_n, offs_m, offs_n, offs_d,
    k_vis, causal_offset, window, qk_scale, cap,
    HEAD_DIM_REAL: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Accumulate dQ of one query tile over the key tiles start_n .. end_n."""
    for start in range(start_n, end_n, BLOCK_N):
        cols = start + offs_n
        if MASKED:
            kmask = cols[None, :] < k_vis
            if not EVEN_D:
                kmask = kmask & (offs_d[:, None] < HEAD_DIM_REAL)
            kT = tl.load(kT_ptrs + start * stride_kt, mask=kmask, other=0.0)
            vT = tl.load(vT_ptrs + start * stride_vt, mask=kmask, other=0.0)
        elif EVEN_D:
            kT = tl.load(kT_ptrs + start * stride_kt)
            vT = tl.load(vT_ptrs + start * stride_vt)
        else:
            kT = tl.load(kT_ptrs + start * stride_kt, mask=offs_d[:, None] < HEAD_DIM_REAL, other=0.0)
            vT = tl.load(vT_ptrs + start * stride_vt, mask=offs_d[:, None] < HEAD_DIM_REAL, other=0.0)
        s = _mma(q, kT, None, DOT_PRECISION, UPCAST) * qk_scale
        if SOFTCAP:
            t = _tanh(s)
            s = cap * t
        p = tl.math.exp2(s - lse[:, None])
        if MASKED:
            p = tl.where(_visible(offs_m, cols, k_vis, causal_offset, window, CAUSAL, WINDOW), p, 0.0)
        dp = _mma(do, vT, None, DOT_PRECISION, UPCAST)
        ds = p * (dp - delta[:, None])
        if SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq = _mma(_rtne(ds, UPCAST).to(kT.dtype), tl.trans(kT), dq, DOT_PRECISION, UPCAST)
    return dq


@triton.jit
def _attn_bwd_dq(
    Q, K, V, DO, LSE, DELTA, DQ, CU_Q, CU_K, KEY_LENS,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_dob, stride_doh, stride_dot,
    stride_dqb, stride_dqh, stride_dqt,
    stride_lb, stride_lh, stride_lt,
    num_heads, group, seqlen_q, seqlen_k, window, qk_scale, cap, scale,
    seq_bucket_q, seq_bucket_k,  # autotune keys only
    HEAD_DIM_REAL: tl.constexpr, HEAD_DIM: tl.constexpr, EVEN_D: tl.constexpr,
    CAUSAL: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_KEY_LENS: tl.constexpr,
    WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dQ of BLOCK_M query rows of one head. Grid: (cdiv(max_seqlen_q, BLOCK_M) · num_seqs · H,)."""
    tiles = tl.cdiv(seqlen_q, BLOCK_M)
    start_m = tl.program_id(0) % tiles
    bh = tl.program_id(0) // tiles
    b = bh // num_heads
    h = bh % num_heads
    q_start, q_len, k_start, k_len, k_vis = _seq_bounds(
        b, CU_Q, CU_K, KEY_LENS, seqlen_q, seqlen_k, IS_VARLEN, HAS_KEY_LENS)
    if start_m * BLOCK_M >= q_len:
        return
    causal_offset = k_len - q_len
    kvh = h // group
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q_mask = _rows_mask(offs_m, q_len, offs_d, HEAD_DIM_REAL, EVEN_D)
    q_base = Q + b64 * stride_qb + h64 * stride_qh + q_start.to(tl.int64) * stride_qt
    do_base = DO + b64 * stride_dob + h64 * stride_doh + q_start.to(tl.int64) * stride_dot
    q = tl.load(q_base + offs_m[:, None] * stride_qt + offs_d[None, :], mask=q_mask, other=0.0)
    do = tl.load(do_base + offs_m[:, None] * stride_dot + offs_d[None, :], mask=q_mask, other=0.0)
    l_off = b64 * stride_lb + h64 * stride_lh + q_start.to(tl.int64) * stride_lt + offs_m * stride_lt
    lse = tl.load(LSE + l_off, mask=offs_m < q_len, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634  # base 2; P = 0 on empty rows
    delta = tl.load(DELTA + l_off, mask=offs_m < q_len, other=0.0)
    k_base = K + b64 * stride_kb + kvh.to(tl.int64) * stride_kh + k_start.to(tl.int64) * stride_kt
    v_base = V + b64 * stride_vb + kvh.to(tl.int64) * stride_vh + k_start.to(tl.int64) * stride_vt
    kT_ptrs = k_base + offs_n[None, :] * stride_kt + offs_d[:, None]
    vT_ptrs = v_base + offs_n[None, :] * stride_vt + offs_d[:, None]

    first_row = start_m * BLOCK_M  # key ranges as in the forward
    last_row = tl.minimum(first_row + BLOCK_M, q_len) - 1
    lo, full_lo, full_hi, tail, hi = _key_ranges(first_row, last_row, k_vis, causal_offset, window,
                                                 CAUSAL, WINDOW, BLOCK_N)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    if WINDOW:
        dq = _attn_bwd_dq_inner(
            dq, q, do, lse, delta, kT_ptrs, vT_ptrs, stride_kt, stride_vt, lo, full_lo, offs_m, offs_n, offs_d,
            k_vis, causal_offset, window, qk_scale, cap, HEAD_DIM_REAL, EVEN_D, BLOCK_N, True, CAUSAL, WINDOW,
            SOFTCAP, DOT_PRECISION, UPCAST)
    dq = _attn_bwd_dq_inner(
        dq, q, do, lse, delta, kT_ptrs, vT_ptrs, stride_kt, stride_vt, full_lo, full_hi, offs_m, offs_n, offs_d,
        k_vis, causal_offset, window, qk_scale, cap, HEAD_DIM_REAL, EVEN_D, BLOCK_N, False, CAUSAL, WINDOW,
        SOFTCAP, DOT_PRECISION, UPCAST)
    dq = _attn_bwd_dq_inner(
        dq, q, do, lse, delta, kT_ptrs, vT_ptrs, stride_kt, stride_vt, tail, hi, offs_m, offs_n, offs_d,
        k_vis, causal_offset, window, qk_scale, cap, HEAD_DIM_REAL, EVEN_D, BLOCK_N, True, CAUSAL, WINDOW,
        SOFTCAP, DOT_PRECISION, UPCAST)
    dq = dq * scale
    dq_base = DQ + b64 * stride_dqb + h64 * stride_dqh + q_start.to(tl.int64) * stride_dqt
    dq = _rtne(dq, UPCAST).to(DQ.dtype.element_ty)
    tl.store(dq_base + offs_m[:, None] * stride_dqt + offs_d[None, :], dq, mask=q_mask)


# --------------------------------------------------------------------------------------------
# Launch configuration
# --------------------------------------------------------------------------------------------

# (BLOCK_M, BLOCK_N, num_warps, num_stages) by padded head dim. dK/dV: a tall key tile
# (BLOCK_N) held in registers, short query tiles streamed; dQ: the transpose. Pruned to the configs
# that compile without spills for their arch (scripts/compile_kernels.py): dK/dV keeps two fp32
# (BLOCK_N, D) accumulators and the K/V tile in registers, so large D needs 8 warps or short tiles.
_DKDV_TABLES = {
    9: {
        64: [(64, 128, 8, 3, PLAIN), (32, 64, 4, 3, PLAIN), (32, 128, 8, 3)],
        128: [(32, 64, 8, 3, PLAIN), (32, 32, 4, 3), (16, 128, 8, 2, PLAIN)],
        256: [(32, 32, 8, 2)],
    },
    8: {  # D=64: 32×64 on 4 warps spills (sm_80), on 8 warps only with window/soft-cap
        64: [(32, 64, 8, 2, PLAIN), (32, 32, 4, 2)],
        128: [(32, 64, 8, 2, PLAIN), (32, 32, 4, 2)],
        256: [(32, 32, 8, 2, PLAIN), (16, 32, 8, 2)],
    },
    0: {
        64: [(16, 32, 4, 2, PLAIN), (16, 16, 4, 2)],  # 16×32 spills with window/soft-cap (sm_80)
        128: [(16, 16, 8, 1)],
        256: [(16, 16, 8, 1, PLAIN), (16, 16, 4, 1, HEAVY)],  # 8 warps spill with window/soft-cap (sm_80), 4 without
    },
}
_DQ_TABLES = {
    9: {
        64: [(128, 32, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3)],
        128: [(128, 64, 8, 2), (64, 64, 4, 3), (64, 32, 4, 3), (128, 32, 8, 3), (64, 32, 8, 3)],
        256: [(64, 16, 4, 2), (32, 32, 4, 2), (64, 32, 8, 2), (32, 32, 8, 2)],
    },
    8: {  # D=64: 128×32 on 4 warps spills on sm_80; 8 warps do not
        64: [(128, 32, 8, 2), (64, 32, 4, 2)],
        128: [(64, 32, 4, 2), (64, 32, 8, 2)],
        256: [(32, 32, 4, 2), (32, 32, 8, 2)],
    },
    0: {
        64: [(32, 32, 4, 2), (64, 16, 4, 2), (64, 32, 8, 2)],
        # 16×32 on 8 warps, 2 stages spills on sm_80 with window/soft-cap; 1 stage does not
        128: [(32, 16, 4, 2, PLAIN), (16, 32, 8, 2, PLAIN), (32, 32, 8, 2, PLAIN), (16, 32, 8, 1)],
        256: [(16, 16, 8, 1)],
    },
}
INTERPRET_DKDV = {"BLOCK_M": 16, "BLOCK_N": 32}
INTERPRET_DQ = {"BLOCK_M": 32, "BLOCK_N": 16}
_PREPROCESS_BLOCK_M = 64
_BWD_KEY = ["seq_bucket_q", "seq_bucket_k", "CAUSAL", "group", "IS_VARLEN", "WINDOW"]


@functools.lru_cache(maxsize=None)
def _tuned_dkdv(head_dim: int, dtype: torch.dtype, atomic: bool, heavy: bool, major: int):
    configs = _configs(arch_table(_DKDV_TABLES, dtype, major), head_dim, heavy)
    # The atomic variant accumulates into DK/DV: zero them before each timed trial (and after).
    reset = ["DK", "DV"] if atomic else None
    return triton.autotune(configs, key=_BWD_KEY + ["ATOMIC"], reset_to_zero=reset)(_attn_bwd_dkdv)


@functools.lru_cache(maxsize=None)
def _tuned_dq(head_dim: int, dtype: torch.dtype, heavy: bool, major: int):
    return triton.autotune(_configs(arch_table(_DQ_TABLES, dtype, major), head_dim, heavy), key=_BWD_KEY)(_attn_bwd_dq)


def _use_split_heads(p: Problem, device: torch.device, deterministic: bool, split_heads: bool | None) -> bool:
    """Split GQA dK/dV over query heads (atomics) only when allowed and the kv-head grid would
    leave the GPU underfilled (fewer than 2 programs per SM with 128-row key tiles)."""
    if deterministic or p.group == 1:
        return False
    if split_heads is not None:
        return split_heads
    if device.type != "cuda":
        return False
    programs = p.num_seqs * p.num_kv_heads * triton.cdiv(p.max_seqlen_k, 128)
    return programs < 2 * torch.cuda.get_device_properties(device).multi_processor_count


def bwd_grid(kernel_name: str, p: Problem, meta: dict, atomic: bool = False) -> tuple[int]:
    """1-D launch grid of ``_attn_bwd_dkdv`` (key tiles x sequence-kv-heads, or sequence-heads
    with atomics) or ``_attn_bwd_dq`` (query tiles x sequence-heads) for a config."""
    if kernel_name == "dkdv":
        heads = p.num_seqs * (p.num_heads if atomic else p.num_kv_heads)
        return tiles_grid(p.max_seqlen_k, heads, meta["BLOCK_N"])
    return tiles_grid(p.max_seqlen_q, p.num_seqs * p.num_heads, meta["BLOCK_M"])


def _launch(kernel_name: str, p: Problem, args: tuple, consts: dict, interp_cfg: dict, tuned,
            device: torch.device) -> None:
    atomic = consts.get("ATOMIC", False)
    if interpreting():
        kernel = _attn_bwd_dkdv if kernel_name == "dkdv" else _attn_bwd_dq
        kernel[bwd_grid(kernel_name, p, interp_cfg, atomic)](*args, **consts, **interp_cfg)
    else:
        with torch.cuda.device(device):
            tuned[lambda meta: bwd_grid(kernel_name, p, meta, atomic)](*args, **consts)


def _backward(p: Problem, do, q, k, v, out, lse, needs, deterministic: bool, split_heads: bool | None):
    """(dq, dk, dv) (an empty tensor where not needed) for a Problem's q/k/v/out/lse/do."""
    needs = [bool(n) for n in needs] + [True] * (3 - len(needs))
    q, k, v, out, do = (last_dim_contiguous(t) for t in (q, k, v, out, do))
    consts = p.constexprs(q.dtype)
    cu_q, cu_k, key_lens = p.pointers(q.device)
    score_args, buckets = p.score_args(), (seq_bucket(p.max_seqlen_q), seq_bucket(p.max_seqlen_k))
    dq = dk = dv = None
    run_q = needs[0] and q.numel() > 0
    run_kv = (needs[1] or needs[2]) and k.numel() > 0
    delta = torch.empty_like(lse)
    if (run_q or run_kv) and p.num_seqs > 0 and p.max_seqlen_q > 0:
        block = _PREPROCESS_BLOCK_M if not interpreting() else 32
        grid = tiles_grid(p.max_seqlen_q, p.num_seqs * p.num_heads, block)
        with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
            _attn_bwd_preprocess[grid](
                out, do, delta, cu_q, *p.strides(out), *p.strides(do), *p.lse_strides(delta),
                p.num_heads, p.max_seqlen_q, HEAD_DIM_REAL=consts["HEAD_DIM_REAL"], HEAD_DIM=consts["HEAD_DIM"],
                EVEN_D=consts["EVEN_D"], IS_VARLEN=p.varlen, BLOCK_M=block)
    if run_kv:
        atomic = _use_split_heads(p, q.device, deterministic, split_heads)
        if atomic:
            dk_buf = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
            dv_buf = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
        else:
            dk_buf, dv_buf = empty_like_rows(k), empty_like_rows(v)
        args = (q, k, v, do, lse, delta, dk_buf, dv_buf, cu_q, cu_k, key_lens,
                *p.strides(q), *p.strides(k), *p.strides(v), *p.strides(do), *p.strides(dk_buf),
                *p.strides(dv_buf), *p.lse_strides(lse),
                p.num_heads, p.num_kv_heads, p.group, p.max_seqlen_q, p.max_seqlen_k, *score_args, p.scale,
                *buckets)
        tuned = None if interpreting() else _tuned_dkdv(p.head_dim, q.dtype, atomic, p.heavy, device_major(q.device))
        _launch("dkdv", p, args, {**consts, "ATOMIC": atomic}, INTERPRET_DKDV, tuned, q.device)
        # fp32 sums of the atomic path: cast into the layout the fake implementation promises.
        dk, dv = (_like(dk_buf, k), _like(dv_buf, v)) if atomic else (dk_buf, dv_buf)
    if run_q:
        dq = empty_like_rows(q)
        args = (q, k, v, do, lse, delta, dq, cu_q, cu_k, key_lens,
                *p.strides(q), *p.strides(k), *p.strides(v), *p.strides(do), *p.strides(dq), *p.lse_strides(lse),
                p.num_heads, p.group, p.max_seqlen_q, p.max_seqlen_k, *score_args, p.scale,
                *buckets)
        tuned = None if interpreting() else _tuned_dq(p.head_dim, q.dtype, p.heavy, device_major(q.device))
        _launch("dq", p, args, consts, INTERPRET_DQ, tuned, q.device)

    def result(grad, need, like):
        if not need:
            return like.new_empty(0)
        return torch.zeros_like(like) if grad is None else grad  # empty inputs: nothing to run

    return result(dq, needs[0], q), result(dk, needs[1], k), result(dv, needs[2], v)


def _like(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """t copied (and cast) into torch.empty_like(like)'s layout and dtype."""
    out = empty_like_rows(like)
    out.copy_(t)
    return out


def attention_backward(
    grad: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    scale: float | None,
    key_lens: torch.Tensor | None,
    out: torch.Tensor,
    lse: torch.Tensor,
    needs=(True, True, True),
    *,
    window: int | None = None,
    softcap: float | None = None,
    deterministic: bool = True,
    split_heads: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dense backward: grad = dL/do (B, H, Tq, D), the forward's inputs and its (out, lse) ->
    (dq, dk, dv) shaped like q, k, v; an empty tensor for each one not in ``needs``.
    ``deterministic=False`` allows the split-heads GQA path with fp32 atomics."""
    check_inputs("attention backward", q, k, v)
    p = dense_problem(q, k, causal, scale, key_lens, window, softcap)
    return _backward(p, grad.to(q.dtype), q, k, v, out, lse.float().contiguous(), needs, deterministic, split_heads)


def attention_varlen_backward(
    grad: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool,
    scale: float | None,
    out: torch.Tensor,
    lse: torch.Tensor,
    needs=(True, True, True),
    *,
    window: int | None = None,
    softcap: float | None = None,
    deterministic: bool = True,
    split_heads: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Packed backward: q/out/grad (total_q, H, D), k/v (total_k, Hkv, D), lse (H, total_q) ->
    (dq, dk, dv) shaped like q, k, v (empty where not in ``needs``)."""
    check_inputs("attention_varlen backward", q, k, v)
    p = varlen_problem(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, window, softcap)
    return _backward(p, grad.to(q.dtype), q, k, v, out, lse.float().contiguous(), needs, deterministic, split_heads)
