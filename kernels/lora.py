"""LoRA linear layers in Triton: y = x·Wᵀ + bias + s·(x·Aᵀ)·Bᵀ without forming W + s·B·A.

Shapes (PEFT's): x (M, K) rows, W (N, K) frozen, A (R, K), B (N, R), bias (N,), scale s.
Three kernels, each also serving mixed-adapter batches (``MIXED``: row i uses adapter a(i) of a
stack A (n, R, K), B (n, N, R), scales (n,), or none when a(i) = -1; see lora_sgmv.py):

``_lora_shrink``   H = s·X·D  (M, R) float32: the low-rank projection, one pass over X
                   (per adapter present in a row tile, for mixed batches).
                   Forward: D = Aᵀ (H = s·x·Aᵀ). Backward: X = dy, D = B (G = s·dy·B).
``_lora_matmul``   Y = X·Wt + bias + H·L: a tiled GEMM whose epilogue adds the rank-R product of
                   the tile's rows of H with L (R, BLOCK_N) before the single store, so the
                   (M, N) low-rank term is never written. Forward: Wt = Wᵀ, L = Bᵀ;
                   backward dx = dy·W + G·A: Wt = W, L = A. W is read in place (no copy, no grad).
``_lora_outer``    OUT (P, Q) = Σ_rows Uᵀ·V: the adapter gradients dA = Gᵀ·x (R, K) and
                   dB = dyᵀ·H (N, R), a reduction over rows split into SPLIT partial sums that
                   the launcher adds with torch (deterministic, no atomics).

Forward: 2 launches, x read twice (shrink + GEMM: one extra memory-bound pass over the M·K
elements of x next to the 2·M·N·K-FLOP GEMM, instead of recomputing x·Aᵀ in each of the N /
BLOCK_N column tiles, which would add R / BLOCK_N of the GEMM's FLOPs). Backward: shrink of
dy (G) and of x (H, recomputed instead of saved), the dx GEMM with the G·A epilogue, and two
reductions; W takes no gradient (computed with torch only if W requires one).

Accumulation is float32 (float64 is not supported); for float32 inputs the dots use IEEE
precision unless ``torch.backends.cuda.matmul.allow_tf32`` is set, as torch's own matmul.
Mixed batches are processed in adapter order: ROWS is a permutation sorting the rows by
adapter, ROW_ADAPTER the sorted adapter ids, and tile programs loop over the adapters present
in their rows (usually one). This module imports nothing of fastlm.
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

MAX_RANK = 256  # the (BLOCK_M, R) tile of H lives in registers (shrink)
R_CHUNK_MAX = 32  # rank columns of H per step of the matmul epilogue (registers)


@triton.jit
def _cast(x, DTYPE: tl.constexpr):
    """x.to(DTYPE), rounding float32 → bfloat16 to nearest even on the bits (the GPU's cvt.rn;
    the Triton interpreter's own cast truncates)."""
    if DTYPE == tl.bfloat16 and x.dtype == tl.float32:
        bits = x.to(tl.uint32, bitcast=True)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        x = bits.to(tl.float32, bitcast=True)
    return x.to(DTYPE)


@triton.jit
def _mma(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """tl.dot(a, b, acc). UPCAST (interpreter + bf16 only): the Triton interpreter (3.9) multiplies
    bf16 operands as their raw bits, so they are widened to float32 first (exactly)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _tile_rows(ROWS, ROW_ADAPTER, offs, in_range, MIXED: tl.constexpr):
    """(rows of X/Y, adapter of each row, first and last adapter >= 0) of sorted positions offs."""
    if MIXED:
        rows = tl.load(ROWS + offs, mask=in_range, other=0).to(tl.int64)
        adapters = tl.load(ROW_ADAPTER + offs, mask=in_range, other=-1)
        a_lo = tl.min(tl.where(in_range & (adapters >= 0), adapters, 2147483647), axis=0)
        a_hi = tl.max(tl.where(in_range, adapters, -1), axis=0)
    else:
        rows = offs.to(tl.int64)
        adapters = tl.zeros_like(offs)
        a_lo = 0
        a_hi = 0
    return rows, adapters, a_lo, a_hi


@triton.jit
def _lora_shrink(
    X, D, SCALES, ROWS, ROW_ADAPTER, H,
    M, K, R,
    stride_xm, stride_xk, stride_da, stride_dk, stride_dr, stride_hm,
    MIXED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, R_PAD: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """H[j, :R] = s_a · X[row j, :] @ D_a (K, R) for the rows j of this row tile that use
    adapter a = program_id(1) (all rows when not MIXED). Rows of other adapters are left alone:
    H starts at zero, so rows without an adapter keep 0. One program per (row tile, adapter)
    keeps a decode batch of many adapters parallel; programs of absent adapters do nothing."""
    pid = tl.program_id(0)
    a = tl.program_id(1)
    offs = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    in_range = offs < M
    rows, adapters, a_lo, a_hi = _tile_rows(ROWS, ROW_ADAPTER, offs, in_range, MIXED)
    r = tl.arange(0, R_PAD)
    if (a >= a_lo) & (a <= a_hi):
        acc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(X + rows[:, None] * stride_xm + ks[None, :] * stride_xk,
                        mask=in_range[:, None] & (ks < K)[None, :], other=0.0)
            d = tl.load(D + a * stride_da + ks[:, None] * stride_dk + r[None, :] * stride_dr,
                        mask=(ks < K)[:, None] & (r < R)[None, :], other=0.0)
            acc = _mma(x, _cast(d, x.dtype), acc, PRECISION, UPCAST)
        s = tl.load(SCALES + a)
        mine = in_range & (adapters == a)
        tl.store(H + offs[:, None] * stride_hm + r[None, :], acc * s, mask=mine[:, None] & (r < R)[None, :])


@triton.jit
def _lora_matmul(
    X, W, H, L, BIAS, Y, ROWS, ROW_ADAPTER,
    M, N, K, R, M_BUCKET,
    stride_xm, stride_xk, stride_wk, stride_wn, stride_hm,
    stride_la, stride_lr, stride_ln, stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr, MIXED: tl.constexpr, R_PAD: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    R_CHUNK: tl.constexpr,
):
    """Y[row j, n] = Σ_k X[row j, k]·Wt[k, n] + bias[n] + Σ_r H[j, r]·L_a(j)[r, n].

    Wt (K, N) and L_a (R, N) are addressed through strides, so W and A/B are read in place.
    Tiles are visited in groups of GROUP_M row tiles for L2 reuse of Wt.
    """
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    group_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % group_m
    pid_n = (pid % group) // group_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_in = offs_m < M
    rows, adapters, a_lo, a_hi = _tile_rows(ROWS, ROW_ADAPTER, offs_m, m_in, MIXED)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_in = offs_n < N

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_in = ks < K
        x = tl.load(X + rows[:, None] * stride_xm + ks[None, :] * stride_xk,
                    mask=m_in[:, None] & k_in[None, :], other=0.0)
        w = tl.load(W + ks[:, None] * stride_wk + offs_n[None, :] * stride_wn,
                    mask=k_in[:, None] & n_in[None, :], other=0.0)
        acc = _mma(x, w, acc, PRECISION, UPCAST)

    # Epilogue: + H·L_a for each adapter present in the tile's rows (one when not MIXED), over
    # the rank in R_CHUNK pieces: a whole (BLOCK_M, R_PAD) fp32 tile of H would not fit in
    # registers next to the accumulator (rank 256 and mixed 128-row tiles spill on sm_90).
    for a in tl.range(a_lo, a_hi + 1):
        for r0 in tl.range(0, R, R_CHUNK):
            r = r0 + tl.arange(0, R_CHUNK)
            r_in = r < R
            h = tl.load(H + offs_m[:, None] * stride_hm + r[None, :], mask=m_in[:, None] & r_in[None, :], other=0.0)
            lo = tl.load(L + a * stride_la + r[:, None] * stride_lr + offs_n[None, :] * stride_ln,
                         mask=r_in[:, None] & n_in[None, :], other=0.0)
            if MIXED:
                h = tl.where((adapters == a)[:, None], h, 0.0)
            acc = _mma(_cast(h, lo.dtype), lo, acc, PRECISION, UPCAST)
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_n, mask=n_in, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rows[:, None] * stride_ym + offs_n[None, :] * stride_yn, _cast(acc, Y.dtype.element_ty),
             mask=m_in[:, None] & n_in[None, :])


@triton.jit
def _lora_outer(
    U, V, OUT, ROWS, SEG_START,
    P, Q, SPLIT,
    stride_um, stride_up, stride_vm, stride_vq, stride_os, stride_oa, stride_op, stride_oq,
    U_BY_ROW: tl.constexpr, V_BY_ROW: tl.constexpr, HAS_ROWS: tl.constexpr, DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr,
):
    """OUT[split, a, p, q] = Σ_j U[j, p]·V[j, q] over the sorted positions j of adapter a's
    segment [SEG_START[a], SEG_START[a + 1]) taken by this split (every SPLIT-th row block).

    U/V rows are indexed by original row (ROWS[j]) when *_BY_ROW, else by sorted position j.
    """
    a = tl.program_id(0)
    tile = tl.program_id(1)
    split = tl.program_id(2)
    num_q = tl.cdiv(Q, BLOCK_Q)
    offs_p = (tile // num_q) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_q = (tile % num_q) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    p_in = offs_p < P
    q_in = offs_q < Q
    start = tl.load(SEG_START + a)
    end = tl.load(SEG_START + a + 1)
    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    for m0 in tl.range(start + split * BLOCK_M, end, SPLIT * BLOCK_M):
        offs = m0 + tl.arange(0, BLOCK_M)
        m_in = offs < end
        if HAS_ROWS:
            rows = tl.load(ROWS + offs, mask=m_in, other=0).to(tl.int64)
        else:
            rows = offs.to(tl.int64)
        u_index = rows if U_BY_ROW else offs.to(tl.int64)
        v_index = rows if V_BY_ROW else offs.to(tl.int64)
        u = tl.load(U + u_index[:, None] * stride_um + offs_p[None, :] * stride_up,
                    mask=m_in[:, None] & p_in[None, :], other=0.0)
        v = tl.load(V + v_index[:, None] * stride_vm + offs_q[None, :] * stride_vq,
                    mask=m_in[:, None] & q_in[None, :], other=0.0)
        acc = _mma(tl.trans(_cast(u, DOT_DTYPE)), _cast(v, DOT_DTYPE), acc, PRECISION, UPCAST)
    tl.store(OUT + split * stride_os + a * stride_oa + offs_p[:, None] * stride_op + offs_q[None, :] * stride_oq,
             acc, mask=p_in[:, None] & q_in[None, :])


def _configs(shapes) -> list[triton.Config]:
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_warps=w, num_stages=s)
            for m, n, k, w, s in shapes]


# GEMM tiles tried on CUDA (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages), checked by
# scripts/compile_kernels.py (sm_80 and sm_90, triton 3.9, ranks 8/64/256, dense and mixed):
# 128×128 on 4 warps spilled with the bias or mixed epilogue and is left out. The last two serve
# decode-sized batches (few rows).
_CONFIGS_16BIT = _configs([
    (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (64, 128, 64, 4, 4),
    (128, 64, 64, 4, 4), (64, 64, 64, 4, 4), (32, 64, 128, 4, 4), (16, 64, 128, 4, 4),
])
# sm_90 only: on sm_80 the 128×256 tile spills (8-136 B, every rank, dense and mixed).
_SM90_ONLY = {(128, 256, 64, 8, 3)}
# 128-row tiles on 4 warps spilled (16-56 B, sm_90, with the bias or mixed epilogue): left out.
_CONFIGS_FP32 = _configs([(64, 64, 32, 4, 3), (32, 64, 32, 4, 3), (16, 64, 64, 4, 3)])
_KEY = ["N", "K", "M_BUCKET", "R_PAD", "MIXED", "HAS_BIAS"]


def _prune_for_arch(configs, named_args, **kwargs) -> list[triton.Config]:
    """The configs that compile clean on the launching GPU's arch (run by the autotuner)."""
    if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9:
        return configs
    return [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps,
                                   c.num_stages) not in _SM90_ONLY]


_lora_matmul_16bit = triton.autotune(configs=_CONFIGS_16BIT, key=_KEY,
                                     prune_configs_by={"early_config_prune": _prune_for_arch})(_lora_matmul)
_lora_matmul_fp32 = triton.autotune(configs=_CONFIGS_FP32, key=_KEY + ["PRECISION"])(_lora_matmul)

_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}
SUPPORTED_DTYPES = tuple(_TL_DTYPES)


def check_dtype(t: torch.Tensor, op: str) -> None:
    if t.dtype not in _TL_DTYPES:
        raise TypeError(f"triton {op} supports float16, bfloat16 and float32 inputs, got {t.dtype}")


def rank_pad(r: int) -> int:
    """R_PAD: the rank rounded up to a power of two >= 16 (tl.dot's smallest dimension)."""
    if r > MAX_RANK:
        raise ValueError(f"triton LoRA kernels support ranks up to {MAX_RANK}, got {r}")
    return max(16, triton.next_power_of_2(r))


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _upcast(dtype: torch.dtype) -> bool:
    """UPCAST: bf16 under the interpreter (its bf16 dot multiplies raw bits in triton 3.9);
    ``FASTLM_INTERPRET_UPCAST=0`` runs the GPU's bf16 path instead (tests/ops/interp_bf16.py)."""
    return dtype == torch.bfloat16 and interpreting() and os.environ.get("FASTLM_INTERPRET_UPCAST", "1") != "0"


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def rows2d(t: torch.Tensor, n: int) -> torch.Tensor:
    """A (M, n) view (or copy) of t with unit column stride."""
    t2 = t.reshape(-1, n)
    return t2 if t2.stride(1) == 1 else t2.contiguous()


def shrink(x: torch.Tensor, d: torch.Tensor, d_strides: tuple[int, int, int], rank: int, scales: torch.Tensor,
           rows: torch.Tensor | None = None, row_adapter: torch.Tensor | None = None) -> torch.Tensor:
    """H (M, rank) float32 = s_a·x[rows]·D_a, D_a[k, r] = d[a·sa + k·sk + r·sr] (d_strides)."""
    m, k = x.shape
    h = torch.zeros((m, rank), dtype=torch.float32, device=x.device)
    if m == 0:
        return h
    mixed = rows is not None
    cuda = x.device.type == "cuda"
    r_pad = rank_pad(rank)
    block_m = (16 if mixed else 32) if cuda else 16
    block_k = (128 if x.element_size() == 2 else 64) if cuda else 32
    if cuda and r_pad >= 256:  # the (BLOCK_M, 256) fp32 accumulator: shorter K tiles, more warps (spills)
        block_k //= 2
    num_adapters = scales.shape[0] if mixed else 1
    _lora_shrink[(triton.cdiv(m, block_m), num_adapters)](
        x, d, scales, rows if mixed else x, row_adapter if mixed else x, h,
        m, k, rank, x.stride(0), x.stride(1), *d_strides, h.stride(0),
        MIXED=mixed, BLOCK_M=block_m, BLOCK_K=block_k, R_PAD=r_pad, PRECISION=_precision(x.dtype),
        UPCAST=_upcast(x.dtype), num_warps=8 if cuda and r_pad >= 256 else 4,
    )
    return h


def matmul(x: torch.Tensor, wt: torch.Tensor, wt_strides: tuple[int, int], n: int, h: torch.Tensor,
           lo: torch.Tensor, lo_strides: tuple[int, int, int], bias: torch.Tensor | None, out: torch.Tensor,
           rows: torch.Tensor | None = None, row_adapter: torch.Tensor | None = None) -> torch.Tensor:
    """out[rows] = x[rows]·Wt + bias + Σ_a H·L_a  (x (M, K), Wt (K, n) and L_a (R, n) via strides)."""
    m, k = x.shape
    if m == 0 or n == 0:
        return out
    rank = h.shape[1]
    mixed = rows is not None
    args = (x, wt, h, lo, bias if bias is not None else x, out, rows if mixed else x, row_adapter if mixed else x,
            m, n, k, rank, triton.next_power_of_2(m), x.stride(0), x.stride(1), *wt_strides, h.stride(0),
            *lo_strides, out.stride(0), out.stride(1))
    flags = dict(HAS_BIAS=bias is not None, MIXED=mixed, R_PAD=rank_pad(rank), PRECISION=_precision(x.dtype),
                 UPCAST=_upcast(x.dtype), R_CHUNK=min(rank_pad(rank), R_CHUNK_MAX if x.device.type == "cuda" else 16))
    if x.device.type == "cuda":
        def grid(meta):
            return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

        tuned = _lora_matmul_fp32 if x.dtype == torch.float32 else _lora_matmul_16bit
        tuned[grid](*args, **flags)
    else:  # the interpreter: one small tile shape
        grid = (triton.cdiv(m, 16) * triton.cdiv(n, 32),)
        _lora_matmul[grid](*args, **flags, BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=4)
    return out


def _num_splits(rows: int, tiles: int, block_m: int, device: torch.device) -> int:
    """Row splits of a reduction: enough programs to fill the GPU, >= 4 row blocks per split."""
    if device.type != "cuda":
        return max(1, min(2, triton.cdiv(rows, block_m)))
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(2 * sms, max(tiles, 1)), triton.cdiv(rows, 4 * block_m)))


def outer(u: torch.Tensor, v: torch.Tensor, p: int, q: int, seg_start: torch.Tensor, num_adapters: int,
          u_by_row: bool, v_by_row: bool, rows: torch.Tensor | None = None) -> torch.Tensor:
    """(num_adapters, p, q) float32: Σ over each adapter's rows of U[:, :p]ᵀ·V[:, :q].

    One of p, q is the LoRA rank (U = G for dA (R, K), V = H for dB (N, R)); that dimension is
    a single R_PAD-wide tile, the other is tiled. The dot runs in the input dtype (the 16-bit
    one of the two operands; float32 H or G is rounded to it, as torch's own matmul would)."""
    m = u.shape[0]
    cuda = u.device.type == "cuda"
    dot_dtype = u.dtype if u.dtype != torch.float32 else v.dtype
    rank_is_p = not u_by_row  # U indexed by sorted position: U is G (M, R), so p is the rank
    r_pad = rank_pad(p if rank_is_p else q)
    sm80 = cuda and torch.cuda.get_device_capability(u.device)[0] < 9
    # sm_80: the fp32 (IEEE FMA) dot over 64-row tiles spilled 3.6-13 KB (scripts/compile_kernels.py);
    # 16-row tiles do not.
    block_m = (16 if sm80 and dot_dtype == torch.float32 else 64) if cuda else 16
    # The (R_PAD, wide) fp32 accumulator in registers: narrower tiles and 8 warps from rank 128
    # (R_PAD 256 × 128 spilled 1.9 KB on sm_90), from rank 64 on sm_80 (128 × 64 spilled 16-20 B).
    wide = (128 if r_pad <= 64 else 64) if cuda else 32
    warps = 8 if cuda and (r_pad >= 128 or (sm80 and r_pad >= 64)) else 4
    block_p = r_pad if rank_is_p else wide
    block_q = wide if rank_is_p else r_pad
    tiles = triton.cdiv(p, block_p) * triton.cdiv(q, block_q)
    split = _num_splits(m, tiles * num_adapters, block_m, u.device)
    out = torch.empty((split, num_adapters, p, q), dtype=torch.float32, device=u.device)
    _lora_outer[(num_adapters, tiles, split)](
        u, v, out, rows if rows is not None else seg_start, seg_start, p, q, split,
        u.stride(0), u.stride(1), v.stride(0), v.stride(1), *out.stride(),
        U_BY_ROW=u_by_row, V_BY_ROW=v_by_row, HAS_ROWS=rows is not None, DOT_DTYPE=_TL_DTYPES[dot_dtype],
        PRECISION=_precision(dot_dtype), UPCAST=_upcast(dot_dtype), BLOCK_M=block_m, BLOCK_P=block_p, BLOCK_Q=block_q,
        num_warps=warps, num_stages=3 if cuda else 1,
    )
    return out.sum(dim=0)


# ---- dense LoRA linear: fastlm::lora_linear ------------------------------------------------------


def on_device(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Launch on t's GPU (Triton launches on the current device)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def whole_batch(m: int, device: torch.device) -> torch.Tensor:
    """seg_start of a batch whose M rows all use adapter 0: [0, M] (no host-to-device copy)."""
    return torch.arange(2, dtype=torch.int32, device=device) * m  # [0, m], computed on the device


def _scales(scale: float, device: torch.device) -> torch.Tensor:
    return torch.full((1,), float(scale), dtype=torch.float32, device=device)


def lora_forward(x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float,
                 bias: torch.Tensor | None) -> torch.Tensor:
    """x (..., K), W (N, K), A (R, K), B (N, R), bias (N,) -> x·Wᵀ + bias + s·(x·Aᵀ)·Bᵀ (..., N)."""
    check_dtype(x, "lora_linear")
    n, k = weight.shape
    rank = lora_a.shape[0]
    out = torch.empty((*x.shape[:-1], n), dtype=x.dtype, device=x.device)
    x2 = rows2d(x, k)
    with on_device(x):
        h = shrink(x2, lora_a, (0, lora_a.stride(1), lora_a.stride(0)), rank, _scales(scale, x.device))
        matmul(x2, weight, (weight.stride(1), weight.stride(0)), n, h, lora_b,
               (0, lora_b.stride(1), lora_b.stride(0)), bias, out.view(-1, n))
    return out


def lora_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor,
                  lora_b: torch.Tensor, scale: float, bias: torch.Tensor | None,
                  needs: list[bool]) -> list[torch.Tensor | None]:
    """[dx, dW, dA, dB, dbias] (None where not needed) for y = lora_forward(...), with
    G = s·dy·B: dx = dy·W + G·A, dA = Gᵀ·x, dB = dyᵀ·(s·x·Aᵀ), dW = dyᵀ·x, dbias = Σ dy."""
    need_x, need_w, need_a, need_b, need_bias = needs
    n, k = weight.shape
    rank = lora_a.shape[0]
    x2, dy = rows2d(x, k), rows2d(grad, n)
    scales = _scales(scale, x.device)
    seg = whole_batch(x2.shape[0], x.device)
    dx = d_w = d_a = d_b = d_bias = None
    with on_device(x):
        if need_x or need_a:
            g = shrink(dy, lora_b, (0, lora_b.stride(0), lora_b.stride(1)), rank, scales)
            if need_x:
                dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
                matmul(dy, weight, (weight.stride(0), weight.stride(1)), k, g, lora_a,
                       (0, lora_a.stride(0), lora_a.stride(1)), None, dx.view(-1, k))
            if need_a:
                d_a = outer(g, x2, rank, k, seg, 1, False, True)[0].to(lora_a.dtype)
        if need_b:
            h = shrink(x2, lora_a, (0, lora_a.stride(1), lora_a.stride(0)), rank, scales)
            d_b = outer(dy, h, n, rank, seg, 1, True, False)[0].to(lora_b.dtype)
    if need_w:
        d_w = (dy.float().t() @ x2.float()).to(weight.dtype)
    if need_bias and bias is not None:
        d_bias = dy.float().sum(dim=0).to(bias.dtype)
    return [dx, d_w, d_a, d_b, d_bias]
