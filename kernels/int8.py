"""Int8 matmul kernels: weight-only int8 (dequantized in registers) and W8A8 (int8 × int8 → int32).

Weight-only, x (M, K) fp16/bf16/fp32, q (N, K) int8, scales s (N,) per output channel or
(N, K / GS) per group of GS inputs, optional bias b (N,):

    y[m, n] = Σ_k x[m, k] · q[n, k] · s[n, k // GS]  (+ b[n])

int8 values are exact in fp16/bf16, so the products x·q are exact and summed in fp32; the scale
multiplies fp32 partial sums: once in the epilogue (per channel), once per K tile when a tile
lies inside one group (GS a multiple of BLOCK_K), or per element otherwise. Two launch shapes:

* prefill (M > 16): BLOCK_M × BLOCK_N tiles with tl.dot, programs ordered in groups of GROUP_M
  row blocks so that consecutive programs reuse weight tiles from L2;
* decode (M ≤ 16, memory-bound): all rows in one tile, narrow BLOCK_N and long BLOCK_K so the
  int8 weight is streamed once; M = 1 is a GEMV (multiply + row sum, no tensor cores) and the K
  loop can be split over SPLIT_K programs (fp32 partials summed by the launcher — deterministic,
  no atomics) to put enough programs on the GPU for small N.

W8A8, with optional SmoothQuant factors c (K,) (the weight was quantized as W·diag(c)):

    sx[m]     = max_k |x[m, k] / c[k]| / 127        (1 for an all-zero row)
    xq[m, k]  = round_half_even(x[m, k] / c[k] / sx[m])  ∈ [-127, 127]
    y[m, n]   = sx[m] · sw[n] · Σ_k xq[m, k] · q[n, k]  (+ b[n])      int32 accumulation, exact

The fused kernel quantizes the activation tile by tile inside the matmul (a first pass over K
finds each row's max); the unfused path runs :func:`quantize_per_token` first and then the int8
GEMM. Divisions use IEEE rounding (tl.div_rn; Triton's ``/`` is approximate) and rounding is
half-to-even, so the int8 activations match ``torch.round(x / s)`` bit for bit.

This module imports nothing of fastlm: launchers take and return torch tensors (2-D).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from .int8_configs import DECODE_MAX_ROWS, FUSED_QUANT_MAX_ROWS  # noqa: F401 (tables: int8_configs.py,
# imported with the other launch helpers in the launch configuration section below)


def interpreting() -> bool:
    """True under the Triton interpreter (CPU tests): fixed small tiles, no autotuning."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def upcast(dtype: torch.dtype) -> bool:
    """UPCAST: bf16 under the interpreter, whose bf16 dot and int8 → bf16 cast (triton 3.9) are
    not value operations, so the kernels widen to fp32 there. ``FASTLM_INTERPRET_UPCAST=0``
    turns it off so tests run the GPU's own bf16 path (with an interpreter that handles bf16:
    tests/ops/interp_bf16.py)."""
    return dtype == torch.bfloat16 and interpreting() and os.environ.get("FASTLM_INTERPRET_UPCAST", "1") != "0"


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


@triton.jit
def _round_half_even(x):
    """round(x) to the nearest integer, ties to even (torch.round), for fp32 |x| < 2^22: adding
    1.5·2^23 leaves no fraction bits, so the fp32 addition itself rounds (to nearest even)."""
    return (x + 12582912.0) - 12582912.0


@triton.jit
def _store_cast(x, DTYPE: tl.constexpr, UPCAST: tl.constexpr):
    """x (fp32) cast to DTYPE. UPCAST (interpreter + bf16 only): the interpreter truncates
    fp32 → bf16 where GPUs round to nearest even, so round on the bits first."""
    if UPCAST:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(DTYPE)


@triton.jit
def _mma(a, b, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """tl.dot(a, b) in fp32. UPCAST (interpreter + bf16): the interpreter multiplies bf16 operands
    as raw bits, so both are widened to fp32 first (exact: int8 values and bf16 fit fp32)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=DOT_PRECISION)


@triton.jit
def _as_operand(q, x, UPCAST: tl.constexpr):
    """int8 tile q as a dot operand next to x: x's dtype (exact for |q| ≤ 127), or fp32 under
    UPCAST (the interpreter's int8 → bf16 cast is not a value conversion)."""
    if UPCAST:
        return q.to(tl.float32)
    else:
        return q.to(x.dtype)


@triton.jit
def _grouped_pid(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) with programs walking GROUP_M row blocks per column block (L2 reuse)."""
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    return pid_m, pid_n


# --------------------------------------------------------------------------------------------
# Weight-only int8: y = x · (q · s)ᵀ + b
# --------------------------------------------------------------------------------------------


@triton.jit
def _w8_tile(acc, x, Q, S, offs_n, offs_k, k0, K, N, stride_qn, stride_qk, stride_sn, stride_sg,
             GS: tl.constexpr, BLOCK_K: tl.constexpr, GEMV: tl.constexpr,
             DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc += x · (q · s)ᵀ over the K tile starting at k0. x (BLOCK_M, BLOCK_K) in the compute
    dtype (GEMV: (BLOCK_K,) fp32). GS = 0: per-channel scales, applied later in the epilogue."""
    ks = k0 + offs_k
    n_mask = offs_n < N
    if GEMV:
        # q tile (BLOCK_N, BLOCK_K): contiguous along K, one row per output.
        q = tl.load(Q + offs_n[:, None] * stride_qn + ks[None, :] * stride_qk,
                    mask=n_mask[:, None] & (ks[None, :] < K), other=0).to(tl.float32)
        if GS > 0:
            s = tl.load(S + offs_n[:, None] * stride_sn + (ks[None, :] // GS) * stride_sg,
                        mask=n_mask[:, None] & (ks[None, :] < K), other=0.0)
            q = q * s
        acc += tl.sum(q * x[None, :], axis=1)
    else:
        # q tile as (BLOCK_K, BLOCK_N), i.e. qᵀ.
        q = tl.load(Q + offs_n[None, :] * stride_qn + ks[:, None] * stride_qk,
                    mask=n_mask[None, :] & (ks[:, None] < K), other=0)
        if GS == 0:
            acc += _mma(x, _as_operand(q, x, UPCAST), DOT_PRECISION, UPCAST)
        elif GS % BLOCK_K == 0:  # the tile lies inside one group: scale the partial sum
            s = tl.load(S + offs_n * stride_sn + (k0 // GS) * stride_sg, mask=n_mask, other=0.0)
            acc += _mma(x, _as_operand(q, x, UPCAST), DOT_PRECISION, UPCAST) * s[None, :]
        else:  # groups smaller than / straddling the tile: dequantize each element
            s = tl.load(S + offs_n[None, :] * stride_sn + (ks[:, None] // GS) * stride_sg,
                        mask=n_mask[None, :] & (ks[:, None] < K), other=0.0)
            w = q.to(tl.float32) * s
            if not UPCAST:
                w = w.to(x.dtype)
            acc += _mma(x, w, DOT_PRECISION, UPCAST)
    return acc


@triton.jit
def _w8_epilogue(acc, S, B, offs_n, N, stride_sn, GS: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Per-channel scale (GS = 0) and bias on the fp32 accumulator (BLOCK_M, BLOCK_N)."""
    n_mask = offs_n < N
    if GS == 0:
        acc = acc * tl.load(S + offs_n * stride_sn, mask=n_mask, other=0.0)[None, :]
    if HAS_BIAS:
        acc = acc + tl.load(B + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _w8_matmul_prefill(
    X, Q, S, B, Y,
    M, N, K,
    stride_xm, stride_xk, stride_qn, stride_qk, stride_sn, stride_sg, stride_ym, stride_yn,
    m_bucket,  # autotune key only
    GS: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """y[tile] = x[rows] · (q · s)[cols]ᵀ + b[cols] for one BLOCK_M × BLOCK_N output tile."""
    pid_m, pid_n = _grouped_pid(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + offs_k
        x = tl.load(X + offs_m[:, None] * stride_xm + ks[None, :] * stride_xk,
                    mask=(offs_m[:, None] < M) & (ks[None, :] < K), other=0.0)
        acc = _w8_tile(acc, x, Q, S, offs_n, offs_k, k0, K, N, stride_qn, stride_qk, stride_sn,
                       stride_sg, GS, BLOCK_K, False, DOT_PRECISION, UPCAST)
    acc = _w8_epilogue(acc, S, B, offs_n, N, stride_sn, GS, HAS_BIAS)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(Y + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn,
             _store_cast(acc, Y.dtype.element_ty, UPCAST), mask=mask)


@triton.jit
def _w8_matmul_decode(
    X, Q, S, B, Y, P,
    M, N, K, k_per_split,
    stride_xm, stride_xk, stride_qn, stride_qk, stride_sn, stride_sg, stride_ym, stride_yn,
    m_bucket,  # autotune key only
    GS: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Decode shapes (M ≤ BLOCK_M): program (pid_n, pid_k) reduces K range pid_k of all rows for
    BLOCK_N outputs. BLOCK_M = 1 is a GEMV. SPLIT_K > 1 writes fp32 partials to P[pid_k] (bias on
    split 0 only); the launcher sums them."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    if BLOCK_M == 1:
        acc1 = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for k0 in range(k_start, k_end, BLOCK_K):
            ks = k0 + offs_k
            x = tl.load(X + ks * stride_xk, mask=ks < k_end, other=0.0).to(tl.float32)
            acc1 = _w8_tile(acc1, x, Q, S, offs_n, offs_k, k0, k_end, N, stride_qn, stride_qk,
                            stride_sn, stride_sg, GS, BLOCK_K, True, DOT_PRECISION, UPCAST)
        acc = acc1[None, :]
        offs_m = tl.arange(0, 1).to(tl.int64)
    else:
        offs_m = tl.arange(0, BLOCK_M).to(tl.int64)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(k_start, k_end, BLOCK_K):
            ks = k0 + offs_k
            x = tl.load(X + offs_m[:, None] * stride_xm + ks[None, :] * stride_xk,
                        mask=(offs_m[:, None] < M) & (ks[None, :] < k_end), other=0.0)
            acc = _w8_tile(acc, x, Q, S, offs_n, offs_k, k0, k_end, N, stride_qn, stride_qk,
                           stride_sn, stride_sg, GS, BLOCK_K, False, DOT_PRECISION, UPCAST)
    acc = _w8_epilogue(acc, S, B, offs_n, N, stride_sn, GS, False)
    if HAS_BIAS:  # added once: by split 0
        bias = tl.load(B + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
        acc += tl.where(pid_k == 0, bias, 0.0)[None, :]
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if SPLIT_K == 1:
        tl.store(Y + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn,
                 _store_cast(acc, Y.dtype.element_ty, UPCAST), mask=mask)
    else:
        tl.store(P + pid_k * M * N + offs_m[:, None] * N + offs_n[None, :], acc, mask=mask)


@triton.jit
def _w8_matmul_dx(
    G, Q, S, DX,
    M, N, K,
    stride_gm, stride_gn, stride_qn, stride_qk, stride_sn, stride_sg, stride_dm, stride_dk,
    GS: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Backward: dx[m, k] = Σ_n dy[m, n] · q[n, k] · s[n, k // GS] (GS = 0: s[n]), one
    BLOCK_M × BLOCK_K tile of dx per program, reducing over n in BLOCK_N steps."""
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_k = (pid_k * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    k_mask = offs_k < K
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        ns = n0 + offs_n
        n_mask = ns < N
        g = tl.load(G + offs_m[:, None] * stride_gm + ns[None, :] * stride_gn,
                    mask=(offs_m[:, None] < M) & n_mask[None, :], other=0.0)
        wmask = n_mask[:, None] & k_mask[None, :]
        q = tl.load(Q + ns[:, None] * stride_qn + offs_k[None, :] * stride_qk, mask=wmask, other=0)
        if GS == 0:
            s = tl.load(S + ns * stride_sn, mask=n_mask, other=0.0)[:, None]
        else:
            s = tl.load(S + ns[:, None] * stride_sn + (offs_k[None, :] // GS) * stride_sg, mask=wmask, other=0.0)
        w = q.to(tl.float32) * s  # (BLOCK_N, BLOCK_K): the dequantized weight tile
        if not UPCAST:
            w = w.to(g.dtype)
        acc += _mma(g, w, DOT_PRECISION, UPCAST)
    mask = (offs_m[:, None] < M) & k_mask[None, :]
    tl.store(DX + offs_m[:, None] * stride_dm + offs_k[None, :] * stride_dk,
             _store_cast(acc, DX.dtype.element_ty, UPCAST), mask=mask)


# --------------------------------------------------------------------------------------------
# W8A8: per-token int8 activations × per-channel int8 weights
# --------------------------------------------------------------------------------------------


@triton.jit
def _load_smoothed(X, SMOOTH, offs_m, ks, M, K, stride_xm, stride_xk, HAS_SMOOTH: tl.constexpr):
    """x[rows, ks] / c[ks] in fp32 (BLOCK_M, BLOCK_K); zero outside the matrix."""
    x = tl.load(X + offs_m[:, None] * stride_xm + ks[None, :] * stride_xk,
                mask=(offs_m[:, None] < M) & (ks[None, :] < K), other=0.0).to(tl.float32)
    if HAS_SMOOTH:
        c = tl.load(SMOOTH + ks, mask=ks < K, other=1.0).to(tl.float32)
        x = tl.div_rn(x, c[None, :])
    return x


@triton.jit
def _row_scales(X, SMOOTH, offs_m, M, K, stride_xm, stride_xk,
                HAS_SMOOTH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """sx[rows] = max_k |x / c| / 127, or 1 for an all-zero row: (BLOCK_M,) fp32."""
    offs_k = tl.arange(0, BLOCK_K)
    amax = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = _load_smoothed(X, SMOOTH, offs_m, k0 + offs_k, M, K, stride_xm, stride_xk, HAS_SMOOTH)
        amax = tl.maximum(amax, tl.max(tl.abs(x), axis=1))
    return tl.where(amax > 0, tl.div_rn(amax, 127.0), 1.0)


@triton.jit
def _quantize_tile(x, sx):
    """round_half_even(x / sx[:, None]) clamped to [-127, 127], as int8."""
    q = _round_half_even(tl.div_rn(x, sx[:, None]))
    return tl.minimum(tl.maximum(q, -127.0), 127.0).to(tl.int8)


@triton.jit
def _quantize_per_token(
    X, SMOOTH, XQ, XS,
    M, K,
    stride_xm, stride_xk, stride_qm, stride_qk,
    HAS_SMOOTH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """xq[rows] = round(x / c / sx), XS[rows] = sx for BLOCK_M rows (two passes over K)."""
    offs_m = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    sx = _row_scales(X, SMOOTH, offs_m, M, K, stride_xm, stride_xk, HAS_SMOOTH, BLOCK_M, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + offs_k
        x = _load_smoothed(X, SMOOTH, offs_m, ks, M, K, stride_xm, stride_xk, HAS_SMOOTH)
        tl.store(XQ + offs_m[:, None] * stride_qm + ks[None, :] * stride_qk, _quantize_tile(x, sx),
                 mask=(offs_m[:, None] < M) & (ks[None, :] < K))
    tl.store(XS + offs_m, sx, mask=offs_m < M)


@triton.jit
def _w8a8_matmul(
    X, XS, SMOOTH, Q, WS, B, Y,
    M, N, K,
    stride_xm, stride_xk, stride_qn, stride_qk, stride_ym, stride_yn,
    m_bucket,  # autotune key only
    FUSED_QUANT: tl.constexpr, HAS_SMOOTH: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """y[tile] = sx[rows] · sw[cols] · (xq · qᵀ)[tile] + b[cols], int32 accumulation.

    FUSED_QUANT: X is the float activation, quantized here per token (sx from a first pass
    over K); otherwise X is int8 and XS holds sx."""
    pid_m, pid_n = _grouped_pid(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    if FUSED_QUANT:
        sx = _row_scales(X, SMOOTH, offs_m, M, K, stride_xm, stride_xk, HAS_SMOOTH, BLOCK_M, BLOCK_K)
    else:
        sx = tl.load(XS + offs_m, mask=m_mask, other=1.0)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + offs_k
        if FUSED_QUANT:
            x = _load_smoothed(X, SMOOTH, offs_m, ks, M, K, stride_xm, stride_xk, HAS_SMOOTH)
            xq = _quantize_tile(x, sx)
        else:
            xq = tl.load(X + offs_m[:, None] * stride_xm + ks[None, :] * stride_xk,
                         mask=m_mask[:, None] & (ks[None, :] < K), other=0)
        q = tl.load(Q + offs_n[None, :] * stride_qn + ks[:, None] * stride_qk,
                    mask=n_mask[None, :] & (ks[:, None] < K), other=0)  # (BLOCK_K, BLOCK_N) = qᵀ
        acc = tl.dot(xq, q, acc, out_dtype=tl.int32)
    sw = tl.load(WS + offs_n, mask=n_mask, other=0.0)
    y = acc.to(tl.float32) * sx[:, None] * sw[None, :]
    if HAS_BIAS:
        y = y + tl.load(B + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn,
             _store_cast(y, Y.dtype.element_ty, UPCAST), mask=m_mask[:, None] & n_mask[None, :])


# --------------------------------------------------------------------------------------------
# Launch configuration (tables and helpers: kernels/int8_configs.py)
# --------------------------------------------------------------------------------------------

from .int8_configs import (  # noqa: F401  (re-exported: tests and the compile check read them here)
    INTERPRET_DECODE, INTERPRET_DX, INTERPRET_PREFILL, INTERPRET_QUANT, _DECODE_CONFIGS, _DECODE_CONFIGS_FP32,
    _PREFILL_CONFIGS, _PREFILL_CONFIGS_FP32, _PREFILL_CONFIGS_SM80, _kind, _m_bucket, _major, _num_sms,
    _prefill_table, _scale_layout, _split_k, dot_precision,
)


@functools.lru_cache(maxsize=None)
def _tuned(kernel_name: str, group_size: int, kind: str = "16bit", major: int = 9):
    """The kernel autotuned over its configs (keyed on the row bucket and N, K) for activations
    of ``kind`` (see _prefill_table) on a GPU of compute capability ``major`` (part of the cache
    key: GPUs of two archs in one process each get their table). For group-wise weights, BLOCK_K is capped at the group size
    when the group is a power of two so that each K tile stays within one group, and 8-warp
    128-row tiles are left out: the group-scaled partial product doubles the accumulator
    registers (128×128 spills on sm_90)."""
    kernel = globals()[kernel_name]
    cap = group_size if group_size and group_size & (group_size - 1) == 0 and group_size >= 16 else None
    if kernel_name == "_w8_matmul_decode":
        base = _DECODE_CONFIGS_FP32 if kind == "fp32" else _DECODE_CONFIGS
        table = {(bn, min(bk, cap) if cap else bk, w, s) for bn, bk, w, s in base}
        configs = [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
                   for bn, bk, w, s in sorted(table)]
    else:
        table = {(bm, bn, min(bk, cap) if cap else bk, w, s) for bm, bn, bk, w, s in _prefill_table(kernel_name, kind, major)}
        if group_size:
            table = {c for c in table if c[0] * c[1] < 128 * 128}
        if kernel_name == "_w8a8_matmul":
            table = {(bm, bn, max(bk, 32), w, s) for bm, bn, bk, w, s in table}  # int8 MMA: K ≥ 32
        configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                                 num_warps=w, num_stages=s) for bm, bn, bk, w, s in sorted(table)]
    return triton.autotune(configs, key=["m_bucket", "N", "K"])(kernel)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def int8_linear_forward(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
    *, split_k: int | None = None, decode: bool | None = None,
) -> torch.Tensor:
    """x (M, K) float, qweight (N, K) int8, scales (N,) or (N, K/GS) fp32, bias (N,) or None
    -> y (M, N) in x's dtype. ``decode`` (default: M ≤ 16) and ``split_k`` override the launch
    choice (tests)."""
    m, k = x.shape
    n = qweight.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y
    if k == 0:
        return y.zero_() if bias is None else y.copy_(bias.expand(m, n))
    scales = scales.float()
    gs, stride_sn, stride_sg = _scale_layout(scales, k)
    common = dict(GS=gs, HAS_BIAS=bias is not None, DOT_PRECISION=dot_precision(x.dtype), UPCAST=upcast(x.dtype))
    b = bias if bias is not None else scales  # placeholder pointer when there is no bias
    strides = (x.stride(0), x.stride(1), qweight.stride(0), qweight.stride(1), stride_sn, stride_sg,
               y.stride(0), y.stride(1))
    decode = m <= DECODE_MAX_ROWS if decode is None else decode
    if not decode:
        if interpreting():
            grid = (triton.cdiv(m, INTERPRET_PREFILL["BLOCK_M"]) * triton.cdiv(n, INTERPRET_PREFILL["BLOCK_N"]),)
            _w8_matmul_prefill[grid](x, qweight, scales, b, y, m, n, k, *strides, _m_bucket(m),
                                     **common, **INTERPRET_PREFILL)
        else:
            def grid(meta):
                return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

            tuned = _tuned("_w8_matmul_prefill", gs, _kind(x.dtype), _major(x.device))
            tuned[grid](x, qweight, scales, b, y, m, n, k, *strides, _m_bucket(m), **common)
        return y
    if m > DECODE_MAX_ROWS:
        raise ValueError(f"the decode kernel takes at most {DECODE_MAX_ROWS} rows, got {m}")
    block_m = 1 if m == 1 else DECODE_MAX_ROWS
    meta = dict(INTERPRET_DECODE) if interpreting() else None
    if meta is not None and gs and gs % meta["BLOCK_K"] and gs >= 16 and gs & (gs - 1) == 0:
        meta["BLOCK_K"] = gs
    # Split boundaries on multiples of every BLOCK_K in use (and of the group size).
    granule = meta["BLOCK_K"] if meta is not None else max(
        bk for _, bk, _, _ in (_DECODE_CONFIGS_FP32 if x.dtype == torch.float32 else _DECODE_CONFIGS))
    split = split_k if split_k is not None else _split_k(n, k, 32, granule, x.device)
    k_per_split = triton.cdiv(triton.cdiv(k, max(split, 1)), granule) * granule
    if gs:
        k_per_split = triton.cdiv(k_per_split, gs) * gs
    split = triton.cdiv(k, k_per_split)
    partial = torch.empty((split, m, n), dtype=torch.float32, device=x.device) if split > 1 else y
    args = (x, qweight, scales, b, y, partial, m, n, k, k_per_split, *strides, _m_bucket(m))
    consts = dict(common, SPLIT_K=split, BLOCK_M=block_m)
    if meta is not None:
        _w8_matmul_decode[(triton.cdiv(n, meta["BLOCK_N"]), split)](*args, **consts, **meta)
    else:
        def grid(meta):
            return (triton.cdiv(n, meta["BLOCK_N"]), split)

        _tuned("_w8_matmul_decode", gs, _kind(x.dtype), _major(x.device))[grid](*args, **consts)
    if split > 1:
        y.copy_(partial.sum(dim=0))
    return y


def int8_linear_dx(grad: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """dx = dy · (q · s): grad (M, N), qweight (N, K), scales (N,) or (N, K/GS) -> (M, K)."""
    m, n = grad.shape
    k = qweight.shape[1]
    dx = torch.empty((m, k), dtype=grad.dtype, device=grad.device)
    if m == 0 or k == 0:
        return dx
    if n == 0:
        return dx.zero_()
    scales = scales.float()
    gs, stride_sn, stride_sg = _scale_layout(scales, k)
    if interpreting():
        meta = INTERPRET_DX
    elif grad.dtype == torch.float32:  # fp32 FMA dot over BLOCK_N: a short reduction tile
        meta = {"BLOCK_M": 64, "BLOCK_N": 16, "BLOCK_K": 64}
    else:
        meta = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64}
    grid = (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(k, meta["BLOCK_K"]))
    _w8_matmul_dx[grid](
        grad, qweight, scales, dx, m, n, k,
        grad.stride(0), grad.stride(1), qweight.stride(0), qweight.stride(1), stride_sn, stride_sg,
        dx.stride(0), dx.stride(1),
        GS=gs, DOT_PRECISION=dot_precision(grad.dtype), UPCAST=upcast(grad.dtype),
        **meta,
    )
    return dx


def quantize_per_token(x: torch.Tensor, smooth: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) float, smooth (K,) or None -> (xq int8 (M, K), sx float32 (M,))."""
    m, k = x.shape
    xq = torch.empty((m, k), dtype=torch.int8, device=x.device)
    sx = torch.empty((m,), dtype=torch.float32, device=x.device)
    if m == 0:
        return xq, sx
    block_k = min(2048, max(16, triton.next_power_of_2(k)))
    meta = INTERPRET_QUANT if interpreting() else {"BLOCK_M": 1, "BLOCK_K": block_k}
    s = smooth if smooth is not None else sx
    _quantize_per_token[(triton.cdiv(m, meta["BLOCK_M"]),)](
        x, s, xq, sx, m, k, x.stride(0), x.stride(1), xq.stride(0), xq.stride(1),
        HAS_SMOOTH=smooth is not None, **meta, num_warps=4 if not interpreting() else 1,
    )
    return xq, sx


def w8a8_matmul(
    x: torch.Tensor, x_scales: torch.Tensor | None, qweight: torch.Tensor, w_scales: torch.Tensor,
    bias: torch.Tensor | None, smooth: torch.Tensor | None, out_dtype: torch.dtype,
) -> torch.Tensor:
    """The W8A8 GEMM. x_scales None: x (M, K) is float and is quantized inside the kernel (with
    ``smooth``); else x is int8 (M, K) with per-row scales x_scales (M,). -> y (M, N) out_dtype."""
    m, k = x.shape
    n = qweight.shape[0]
    y = torch.empty((m, n), dtype=out_dtype, device=x.device)
    if m == 0 or n == 0:
        return y
    fused = x_scales is None
    w_scales = w_scales.float()
    placeholder = w_scales
    args = (x, x_scales if not fused else placeholder, smooth if smooth is not None else placeholder,
            qweight, w_scales, bias if bias is not None else placeholder, y, m, n, k,
            x.stride(0), x.stride(1), qweight.stride(0), qweight.stride(1), y.stride(0), y.stride(1), _m_bucket(m))
    consts = dict(FUSED_QUANT=fused, HAS_SMOOTH=fused and smooth is not None, HAS_BIAS=bias is not None,
                  UPCAST=upcast(out_dtype))
    if interpreting():
        grid = (triton.cdiv(m, INTERPRET_PREFILL["BLOCK_M"]) * triton.cdiv(n, INTERPRET_PREFILL["BLOCK_N"]),)
        _w8a8_matmul[grid](*args, **consts, **INTERPRET_PREFILL)
    else:
        def grid(meta):
            return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

        _tuned("_w8a8_matmul", 0, "fused" if fused else "16bit", _major(x.device))[grid](*args, **consts)
    return y


def w8a8_linear_forward(
    x: torch.Tensor, qweight: torch.Tensor, w_scales: torch.Tensor, bias: torch.Tensor | None,
    smooth: torch.Tensor | None, *, fused: bool | None = None,
) -> torch.Tensor:
    """x (M, K) float -> y (M, N) in x's dtype. ``fused`` (default: M ≤ 64) quantizes x inside
    the matmul; otherwise a per-token quantization kernel runs first."""
    fused = x.shape[0] <= FUSED_QUANT_MAX_ROWS if fused is None else fused
    if fused:
        return w8a8_matmul(x, None, qweight, w_scales, bias, smooth, x.dtype)
    xq, sx = quantize_per_token(x, smooth)
    return w8a8_matmul(xq, sx, qweight, w_scales, bias, None, x.dtype)
