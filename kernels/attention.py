"""FlashAttention-2-style attention forward in Triton, for dense, padded and packed batches.

For one query row i and the keys j it may see (its *visible* set V_i)::

    s_ij = scale · q_i·k_j                      (scores, never stored as a T×T matrix)
    lse_i = log Σ_{j∈V_i} exp(s_ij)             (saved for backward, natural log, float32)
    o_i  = Σ_{j∈V_i} exp(s_ij - lse_i) · v_j

The kernel walks the keys in tiles of BLOCK_N with the online softmax: with the running max
m and running sum l (in base 2, s' = s·log2(e)), a new tile with row max m̃ gives
m ← max(m, m̃), acc ← acc·2^(m_old - m) + 2^(s' - m)·V, l ← l·2^(m_old - m) + Σ 2^(s' - m), and at
the end o = acc / l, lse = (m + log2 l)·ln 2. A row with an empty V_i gets o = 0, lse = -inf.

Visibility (as ``fastlm.ops.reference.attention_mask``): key j of a sequence with Tq queries
and Tk keys is visible to query i, at position p_i = i + (Tk - Tq) (aligned bottom-right, as for
a cached prefix), iff j < key_len (per-sequence key length, padded batches), when causal
j <= p_i, and with a sliding window W also j > p_i - W. Key tiles wholly outside the window
are never visited (``_key_ranges``). Soft-cap c (Gemma 2): s_ij ← c·tanh(s_ij / c) before the
mask and softmax.

Layouts: a dense batch is q (B, H, Tq, D), k/v (B, Hkv, Tk, D); a packed (varlen) batch is
q (total_q, H, D), k/v (total_k, Hkv, D) with int32 offsets cu_seqlens (num_seqs + 1,) as
flash-attn's varlen API, sequence b holding rows cu_seqlens[b] .. cu_seqlens[b + 1] - 1. Both
are handled by one kernel through (batch, head, token) strides; any strides work as long as
the last dim is contiguous. GQA/MQA: query head h reads kv head h // (H / Hkv) (no copies).
Head dims up to 256 are padded inside the kernel to HEAD_DIM = next power of two (>= 16) with
masked loads; any sequence length is handled by boundary masks. Tiles that need no mask (fully
visible) take a separate unmasked loop.

Precision: fp16/bf16 inputs use tensor-core dots with float32 accumulation; fp32 inputs use
IEEE fp32 dots unless ``torch.get_float32_matmul_precision()`` allows TF32.

This module imports nothing of fastlm. Launchers: :func:`attention_forward` and
:func:`attention_varlen_forward`; the backward is in :mod:`.attention_bwd`.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 256
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _seq_bounds(b, CU_Q, CU_K, KEY_LENS, seqlen_q, seqlen_k, IS_VARLEN: tl.constexpr, HAS_KEY_LENS: tl.constexpr):
    """(q_start, q_len, k_start, k_len, k_vis) of sequence b: its first row and length in the
    query and key tensors, and k_vis = min(key_lens[b], k_len), the number of keys it may see."""
    if IS_VARLEN:
        q_start = tl.load(CU_Q + b)
        q_len = tl.load(CU_Q + b + 1) - q_start
        k_start = tl.load(CU_K + b)
        k_len = tl.load(CU_K + b + 1) - k_start
    else:
        q_start = b * 0
        q_len = b * 0 + seqlen_q
        k_start = b * 0
        k_len = b * 0 + seqlen_k
    k_vis = k_len
    if HAS_KEY_LENS:
        k_vis = tl.minimum(tl.maximum(tl.load(KEY_LENS + b), 0), k_len)
    return q_start, q_len, k_start, k_len, k_vis


@triton.jit
def _rows_mask(rows, bound, offs_d, HEAD_DIM_REAL: tl.constexpr, EVEN_D: tl.constexpr):
    """(len(rows), HEAD_DIM) mask of a row-major tile: rows < bound and, if padded, d < D."""
    if EVEN_D:
        return rows[:, None] < bound
    else:
        return (rows[:, None] < bound) & (offs_d[None, :] < HEAD_DIM_REAL)


@triton.jit
def _mma(a, b, acc, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """tl.dot(a, b, acc). UPCAST (interpreter + bf16 only): the Triton interpreter (3.9) multiplies
    bf16 operands as their raw uint16 bits, so they are widened to fp32 first."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def _rtne(x, UPCAST: tl.constexpr):
    """x, to be cast to the input dtype next. UPCAST (interpreter + bf16 only): the interpreter
    truncates fp32 -> bf16 where GPUs round to nearest even, so round here (the result is fp32
    holding bf16-exact values, which the following .to(bf16) keeps exactly)."""
    if UPCAST:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    else:
        return x


@triton.jit
def _tanh(x):
    """tanh(x) = sign(x)·(1 - e)/(1 + e), e = exp(-2|x|) (no overflow; absolute error ~1e-7)."""
    e = tl.math.exp2(-2.8853900817779268 * tl.abs(x))  # 2·log2(e)
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _scores(raw, qk_scale, cap, SOFTCAP: tl.constexpr):
    """Base-2 scores from raw dots q·k: raw·qk_scale (qk_scale = scale·log2 e), or with the
    soft-cap c, cap·tanh(raw·qk_scale) where qk_scale = scale / c and cap = c·log2 e."""
    if SOFTCAP:
        return cap * _tanh(raw * qk_scale)
    else:
        return raw * qk_scale


@triton.jit
def _visible(rows, cols, k_vis, causal_offset, window, CAUSAL: tl.constexpr, WINDOW: tl.constexpr):
    """(len(rows), len(cols)) visibility: key < k_vis, causal j <= p_i and window j > p_i - window,
    with p_i = i + causal_offset the position of query row i."""
    visible = cols[None, :] < k_vis
    if CAUSAL:
        visible = visible & (cols[None, :] <= rows[:, None] + causal_offset)
    if WINDOW:
        visible = visible & (cols[None, :] > rows[:, None] + causal_offset - window)
    return visible


@triton.jit
def _key_ranges(first, last, k_vis, causal_offset, window,
                CAUSAL: tl.constexpr, WINDOW: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key tiles of the query rows first..last (positions p = row + causal_offset):
    [lo, full_lo) masked, [full_lo, full_hi) visible to every row (no mask), [tail, hi) masked.
    Tiles wholly outside the causal/sliding window are skipped."""
    if CAUSAL:
        hi = tl.maximum(tl.minimum(k_vis, last + causal_offset + 1), 0)
        full_hi = tl.maximum(tl.minimum(k_vis, first + causal_offset + 1), 0)
    else:
        hi = k_vis
        full_hi = k_vis
    full_hi = (full_hi // BLOCK_N) * BLOCK_N
    if WINDOW:  # key j is seen by every row iff j > p_last - window; by some row iff j > p_first - window
        lo = (tl.maximum(first + causal_offset - window + 1, 0) // BLOCK_N) * BLOCK_N
        full_lo = tl.cdiv(tl.maximum(last + causal_offset - window + 1, 0), BLOCK_N) * BLOCK_N
        full_lo = tl.minimum(full_lo, hi)
    else:
        lo = hi * 0
        full_lo = hi * 0
    tail = tl.maximum(full_hi, full_lo)
    return lo, full_lo, full_hi, tail, hi


@triton.jit
def _attn_fwd_inner(
    acc, l_i, m_i, q, kT_ptrs, v_ptrs, stride_kt, stride_vt, start_n, end_n, offs_m, offs_n, offs_d,
    k_vis, causal_offset, window, qk_scale, cap,
    HEAD_DIM_REAL: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Online-softmax update of (acc, l, m) over the key tiles start_n .. end_n (base-2 scores).
    MASKED tiles apply the key bound, the causal mask and the window; unmasked tiles are fully visible."""
    for start in range(start_n, end_n, BLOCK_N):
        cols = start + offs_n
        if MASKED:
            kmask = cols[None, :] < k_vis
            if not EVEN_D:
                kmask = kmask & (offs_d[:, None] < HEAD_DIM_REAL)
            kT = tl.load(kT_ptrs + start * stride_kt, mask=kmask, other=0.0)
        elif EVEN_D:
            kT = tl.load(kT_ptrs + start * stride_kt)
        else:
            kT = tl.load(kT_ptrs + start * stride_kt, mask=offs_d[:, None] < HEAD_DIM_REAL, other=0.0)
        qk = _scores(_mma(q, kT, None, DOT_PRECISION, UPCAST), qk_scale, cap, SOFTCAP)  # (BLOCK_M, BLOCK_N), base 2
        if MASKED:
            visible = _visible(offs_m, cols, k_vis, causal_offset, window, CAUSAL, WINDOW)
            qk = tl.where(visible, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        if MASKED:  # a row that has seen no visible key yet keeps m = -inf: shift by 0 instead
            m_new_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new_safe = m_new
        p = tl.math.exp2(qk - m_new_safe[:, None])
        alpha = tl.math.exp2(m_i - m_new_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if MASKED:
            vmask = _rows_mask(cols, k_vis, offs_d, HEAD_DIM_REAL, EVEN_D)
            v = tl.load(v_ptrs + start * stride_vt, mask=vmask, other=0.0)
        elif EVEN_D:
            v = tl.load(v_ptrs + start * stride_vt)
        else:
            v = tl.load(v_ptrs + start * stride_vt, mask=offs_d[None, :] < HEAD_DIM_REAL, other=0.0)
        acc = _mma(_rtne(p, UPCAST).to(v.dtype), v, acc * alpha[:, None], DOT_PRECISION, UPCAST)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd(
    Q, K, V, O, LSE, CU_Q, CU_K, KEY_LENS,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_ob, stride_oh, stride_ot,
    stride_lb, stride_lh, stride_lt,
    num_heads, group, seqlen_q, seqlen_k, window, qk_scale, cap,
    seq_bucket_q, seq_bucket_k,  # autotune keys only
    HEAD_DIM_REAL: tl.constexpr, HEAD_DIM: tl.constexpr, EVEN_D: tl.constexpr,
    CAUSAL: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_KEY_LENS: tl.constexpr,
    WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program = BLOCK_M query rows of one (sequence, head): o and lse for those rows.
    Grid: (cdiv(max_seqlen_q, BLOCK_M) · num_seqs · H,) on axis 0 (query tiles fastest; axis 1
    would cap num_seqs · H at 65,535). qk_scale, cap: see :func:`_scores`."""
    tiles = tl.cdiv(seqlen_q, BLOCK_M)
    pid = tl.program_id(0)
    start_m = pid % tiles
    bh = pid // tiles
    b = bh // num_heads
    h = bh % num_heads
    q_start, q_len, k_start, k_len, k_vis = _seq_bounds(
        b, CU_Q, CU_K, KEY_LENS, seqlen_q, seqlen_k, IS_VARLEN, HAS_KEY_LENS)
    if start_m * BLOCK_M >= q_len:
        return
    causal_offset = k_len - q_len  # bottom-right alignment
    kvh = h // group
    b64 = b.to(tl.int64)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)

    q_base = Q + b64 * stride_qb + h.to(tl.int64) * stride_qh + q_start.to(tl.int64) * stride_qt
    k_base = K + b64 * stride_kb + kvh.to(tl.int64) * stride_kh + k_start.to(tl.int64) * stride_kt
    v_base = V + b64 * stride_vb + kvh.to(tl.int64) * stride_vh + k_start.to(tl.int64) * stride_vt
    q_mask = _rows_mask(offs_m, q_len, offs_d, HEAD_DIM_REAL, EVEN_D)
    q = tl.load(q_base + offs_m[:, None] * stride_qt + offs_d[None, :], mask=q_mask, other=0.0)
    kT_ptrs = k_base + offs_n[None, :] * stride_kt + offs_d[:, None]  # (HEAD_DIM, BLOCK_N)
    v_ptrs = v_base + offs_n[:, None] * stride_vt + offs_d[None, :]  # (BLOCK_N, HEAD_DIM)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    # Keys [full_lo, full_hi) are visible to every row of the tile; [lo, full_lo), [tail, hi) need masks.
    first_row = start_m * BLOCK_M
    last_row = tl.minimum(first_row + BLOCK_M, q_len) - 1
    lo, full_lo, full_hi, tail, hi = _key_ranges(first_row, last_row, k_vis, causal_offset, window,
                                                 CAUSAL, WINDOW, BLOCK_N)
    if WINDOW:
        acc, l_i, m_i = _attn_fwd_inner(
            acc, l_i, m_i, q, kT_ptrs, v_ptrs, stride_kt, stride_vt, lo, full_lo, offs_m, offs_n, offs_d,
            k_vis, causal_offset, window, qk_scale, cap, HEAD_DIM_REAL, EVEN_D, BLOCK_N, True, CAUSAL, WINDOW,
            SOFTCAP, DOT_PRECISION, UPCAST)
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, kT_ptrs, v_ptrs, stride_kt, stride_vt, full_lo, full_hi, offs_m, offs_n, offs_d,
        k_vis, causal_offset, window, qk_scale, cap, HEAD_DIM_REAL, EVEN_D, BLOCK_N, False, CAUSAL, WINDOW,
        SOFTCAP, DOT_PRECISION, UPCAST)
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, kT_ptrs, v_ptrs, stride_kt, stride_vt, tail, hi, offs_m, offs_n, offs_d,
        k_vis, causal_offset, window, qk_scale, cap, HEAD_DIM_REAL, EVEN_D, BLOCK_N, True, CAUSAL, WINDOW,
        SOFTCAP, DOT_PRECISION, UPCAST)

    # Rows with no visible key: l = 0 -> o = 0, lse = -inf (never 0/0).
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
    o_base = O + b64 * stride_ob + h.to(tl.int64) * stride_oh + q_start.to(tl.int64) * stride_ot
    out = _rtne(out, UPCAST).to(O.dtype.element_ty)
    tl.store(o_base + offs_m[:, None] * stride_ot + offs_d[None, :], out, mask=q_mask)
    l_base = LSE + b64 * stride_lb + h.to(tl.int64) * stride_lh + q_start.to(tl.int64) * stride_lt
    tl.store(l_base + offs_m * stride_lt, lse, mask=offs_m < q_len)


# --------------------------------------------------------------------------------------------
# Launch configuration
# --------------------------------------------------------------------------------------------


def interpreting() -> bool:
    """True under the Triton interpreter (CPU tests): fixed small tiles, no autotuning."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# a 5th table field: PLAIN, the config spills in the window/soft-cap kernels (use it only without them);
PLAIN, HEAVY = "plain", "heavy"  # HEAVY: only for them (it spills in the plain kernel)

def _configs(table: dict[int, list[tuple]], head_dim: int, heavy: bool = False) -> list[triton.Config]:
    """Configs of the first table entry whose head-dim bound covers ``head_dim``; ``heavy``
    (window or soft-cap kernels, more registers) leaves out the entries marked PLAIN, else HEAVY ones."""
    for bound in sorted(table):
        if head_dim <= bound:
            return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
                    for bm, bn, w, s, *flags in table[bound] if (PLAIN if heavy else HEAVY) not in flags]
    raise ValueError(f"head dim {head_dim} > {MAX_HEAD_DIM}")


# (BLOCK_M, BLOCK_N, num_warps, num_stages) by padded head dim, fp16/bf16 (tables 9 and 8) and
# fp32 or pre-Ampere (table 0). Every config is kept only if it compiles for its arch (sm_90,
# sm_80) without register spills and within shared memory (scripts/compile_kernels.py, the
# ahead-of-time check): 4-warp tiles of 128 rows spill at D >= 128, fp32 (IEEE FMA dots) needs
# small tiles.
_FWD_TABLES = {
    9: {
        64: [(128, 128, 8, 3), (128, 64, 4, 3), (128, 64, 8, 4), (64, 64, 4, 4)],
        128: [(128, 128, 8, 3, PLAIN), (128, 64, 8, 3), (128, 128, 8, 2, PLAIN), (64, 64, 4, 3)],
        256: [(128, 32, 8, 2), (64, 64, 8, 2)],
    },
    8: {  # D=64: three tiles spill (4-352 B) with the window/soft-cap masks
        64: [(128, 64, 4, 3, PLAIN), (128, 128, 8, 3, PLAIN), (64, 64, 4, 3, PLAIN), (128, 64, 8, 3), (64, 64, 4, 2)],
        128: [(64, 64, 4, 3), (128, 32, 8, 3)],
        256: [(64, 64, 8, 2)],
    },
    0: {  # older GPUs and fp32 inputs: small tiles
        64: [(32, 32, 4, 2, PLAIN), (16, 32, 4, 2), (32, 32, 8, 2)],  # 32×32/4 spills with window/soft-cap (sm_80)
        128: [(16, 32, 4, 2, PLAIN), (16, 32, 8, 2)],  # 16×32 on 4 warps spills on sm_80 with window/soft-cap
        256: [(16, 16, 4, 2), (16, 32, 8, 1, PLAIN), (16, 16, 8, 1)],  # 16×32/8 spills with window/soft-cap
    },
}
# Tiles under the interpreter: small (the interpreter is slow), BLOCK_M != BLOCK_N on purpose so
# the tests exercise the masked/unmasked split with unequal tiles.
INTERPRET_FWD = {"BLOCK_M": 32, "BLOCK_N": 16}


def device_major(device: torch.device) -> int:
    """Major compute capability of a CUDA device (0 without CUDA): picks the config table."""
    return torch.cuda.get_device_capability(device)[0] if torch.cuda.is_available() else 0


def arch_table(tables: dict[int, dict], dtype: torch.dtype, major: int | None = None) -> dict[int, list[tuple]]:
    """The config table for a GPU of major compute capability ``major`` (default: the current
    GPU's) and ``dtype``."""
    if major is None:
        major = torch.cuda.get_device_capability()[0] if torch.cuda.is_available() else 0
    if dtype == torch.float32 or major < 8:
        return tables[0]
    return tables[9 if major >= 9 else 8]


@functools.lru_cache(maxsize=None)
def _tuned_fwd(head_dim: int, dtype: torch.dtype, heavy: bool, major: int):
    """``_attn_fwd`` autotuned over the configs for this head dim and arch (``major``: compute
    capability, part of the cache key so that GPUs of two archs in one process each get theirs),
    keyed on the bucketed sequence lengths, causality and the GQA group (dtypes are part of
    triton's key); ``heavy``: the window/soft-cap variants (see :func:`_configs`)."""
    configs = _configs(arch_table(_FWD_TABLES, dtype, major), head_dim, heavy)
    return triton.autotune(configs, key=["seq_bucket_q", "seq_bucket_k", "CAUSAL", "group", "IS_VARLEN", "WINDOW"])(_attn_fwd)


def seq_bucket(n: int) -> int:
    """Autotune key of a sequence length: the next power of two (at least 64)."""
    return max(64, triton.next_power_of_2(max(int(n), 1)))


def dot_precision(dtype: torch.dtype) -> str:
    """'ieee' for fp32 inputs unless torch allows TF32 matmuls; 'tf32' (the default) otherwise."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


# --------------------------------------------------------------------------------------------
# Problem description shared by forward and backward launchers
# --------------------------------------------------------------------------------------------


@dataclass
class Problem:
    """A dense or packed attention problem: sizes, masking and how to find rows in memory."""

    num_seqs: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_seqlen_q: int
    max_seqlen_k: int
    causal: bool
    scale: float
    varlen: bool
    cu_seqlens_q: torch.Tensor | None = None
    cu_seqlens_k: torch.Tensor | None = None
    key_lens: torch.Tensor | None = None
    window: int | None = None  # sliding window (keys p - window < j <= p), needs causal
    softcap: float | None = None  # scores s -> softcap·tanh(s / softcap)

    @property
    def group(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def heavy(self) -> bool:
        """Window or soft-cap kernels (more registers: some configs spill, see ``_configs``)."""
        return self.window is not None or self.softcap is not None

    def score_args(self) -> tuple[int, float, float]:
        """(window, qk_scale, cap) kernel arguments: window 0 when absent; base-2 scores are
        raw·qk_scale, or cap·tanh(raw·qk_scale) with a soft-cap (see ``_scores``)."""
        window = 0 if self.window is None else int(self.window)
        if self.softcap is None:
            return window, self.scale * LOG2E, 1.0
        return window, self.scale / self.softcap, self.softcap * LOG2E

    def strides(self, t: torch.Tensor) -> tuple[int, int, int]:
        """(batch, head, token) strides of a q/k/v/o-shaped tensor (batch stride 0 when packed)."""
        if self.varlen:  # (total, heads, D)
            return 0, t.stride(1), t.stride(0)
        return t.stride(0), t.stride(1), t.stride(2)  # (B, heads, T, D)

    def lse_strides(self, t: torch.Tensor) -> tuple[int, int, int]:
        """(batch, head, token) strides of an lse-shaped tensor: (B, H, Tq) or packed (H, total_q)."""
        if self.varlen:
            return 0, t.stride(0), t.stride(1)
        return t.stride(0), t.stride(1), t.stride(2)

    def pointers(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(cu_seqlens_q, cu_seqlens_k, key_lens), with a dummy int32 tensor for absent ones."""
        dummy = torch.empty(1, dtype=torch.int32, device=device)
        pick = lambda t: dummy if t is None else t  # noqa: E731
        return pick(self.cu_seqlens_q), pick(self.cu_seqlens_k), pick(self.key_lens)

    def constexprs(self, dtype: torch.dtype) -> dict:
        padded = max(16, triton.next_power_of_2(self.head_dim))
        return dict(
            HEAD_DIM_REAL=self.head_dim, HEAD_DIM=padded, EVEN_D=padded == self.head_dim,
            CAUSAL=self.causal, IS_VARLEN=self.varlen, HAS_KEY_LENS=self.key_lens is not None,
            WINDOW=self.window is not None, SOFTCAP=self.softcap is not None,
            DOT_PRECISION=dot_precision(dtype), UPCAST=interpreting() and dtype == torch.bfloat16,
        )


def check_inputs(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Triton-specific limits (the common shape/dtype/device checks are in fastlm.ops)."""
    if q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name}: the triton backend supports float16, bfloat16 and float32, got {q.dtype} "
                        "(use the reference backend for other dtypes)")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{name}: q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"{name}: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    d = q.shape[-1]
    if d > MAX_HEAD_DIM or d < 1:
        raise ValueError(f"{name}: the triton backend supports head dims 1..{MAX_HEAD_DIM}, got D={d}")
    if k.shape[-1] != d or v.shape[-1] != d:
        raise ValueError(f"{name}: head dims differ: q D={d}, k D={k.shape[-1]}, v D={v.shape[-1]}")


def last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    """t itself if its last dim has stride 1 (any other strides are fine), else a contiguous copy."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def empty_like_rows(t: torch.Tensor) -> torch.Tensor:
    """torch.empty_like (the layout the op's fake implementation promises), contiguous if that
    layout's last dim is not unit-stride."""
    out = torch.empty_like(t)
    return out if out.stride(-1) == 1 or out.shape[-1] == 1 else torch.empty(t.shape, dtype=t.dtype, device=t.device)


def default_scale(scale: float | None, head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def tiles_grid(rows: int, heads: int, block: int) -> tuple[int]:
    """A 1-D grid of cdiv(rows, block) tiles for each of ``heads`` (sequence, head) pairs, all on
    axis 0 (limit 2³¹ - 1; axes 1 and 2 are limited to 65,535). Raises if even that overflows."""
    programs = triton.cdiv(rows, block) * heads
    if programs >= 2**31:
        raise ValueError(f"attention: {programs} programs ({heads} sequence-heads x {triton.cdiv(rows, block)} "
                         "tiles) exceed CUDA's grid limit of 2^31 - 1")
    return (programs,)


def fwd_grid(p: Problem, meta: dict) -> tuple[int]:
    """Launch grid of ``_attn_fwd`` for a config (its BLOCK_M)."""
    return tiles_grid(p.max_seqlen_q, p.num_seqs * p.num_heads, meta["BLOCK_M"])


def _launch_fwd(p: Problem, q, k, v, out, lse) -> None:
    cu_q, cu_k, key_lens = p.pointers(q.device)
    args = (
        q, k, v, out, lse, cu_q, cu_k, key_lens,
        *p.strides(q), *p.strides(k), *p.strides(v), *p.strides(out), *p.lse_strides(lse),
        p.num_heads, p.group, p.max_seqlen_q, p.max_seqlen_k, *p.score_args(),
        seq_bucket(p.max_seqlen_q), seq_bucket(p.max_seqlen_k),
    )
    if interpreting():
        _attn_fwd[fwd_grid(p, INTERPRET_FWD)](*args, **p.constexprs(q.dtype), **INTERPRET_FWD)
    else:
        grid = lambda meta: fwd_grid(p, meta)  # noqa: E731
        with torch.cuda.device(q.device):
            _tuned_fwd(p.head_dim, q.dtype, p.heavy, device_major(q.device))[grid](*args, **p.constexprs(q.dtype))


def attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    scale: float | None = None,
    key_lens: torch.Tensor | None = None,
    window: int | None = None,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense attention. q (B, H, Tq, D), k/v (B, Hkv, Tk, D), key_lens (B,) int or None ->
    (o (B, H, Tq, D) in q's dtype, lse (B, H, Tq) float32). scale defaults to 1/sqrt(D)."""
    check_inputs("attention", q, k, v)
    p = dense_problem(q, k, causal, scale, key_lens, window, softcap)
    b, h, tq, _ = q.shape
    out = empty_like_rows(q)
    lse = torch.empty((b, h, tq), dtype=torch.float32, device=q.device)
    if out.numel():
        _launch_fwd(p, last_dim_contiguous(q), last_dim_contiguous(k), last_dim_contiguous(v), out, lse)
    else:
        lse.fill_(float("-inf"))
    return out, lse


def check_window_softcap(window, softcap, causal) -> None:
    """The kernels' window/softcap limits (fastlm.ops validates them first, with the op's name)."""
    if window is not None and (not causal or int(window) < 1):
        raise ValueError(f"attention kernels: window={window} needs causal=True and window >= 1")
    if softcap is not None and not float(softcap) > 0:
        raise ValueError(f"attention kernels: softcap={softcap} must be > 0")


def dense_problem(q, k, causal, scale, key_lens, window=None, softcap=None) -> Problem:
    """The Problem of q (B, H, Tq, D), k (B, Hkv, Tk, D)."""
    check_window_softcap(window, softcap, causal)
    b, h, tq, d = q.shape
    return Problem(b, h, k.shape[1], d, tq, k.shape[2], bool(causal), default_scale(scale, d), varlen=False,
                   key_lens=None if key_lens is None else key_lens.to(device=q.device, dtype=torch.int32).contiguous(),
                   window=window, softcap=softcap)


def varlen_problem(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale,
                   window=None, softcap=None) -> Problem:
    """The Problem of packed q (total_q, H, D), k (total_k, Hkv, D)."""
    check_window_softcap(window, softcap, causal)
    d = q.shape[-1]
    return Problem(
        cu_seqlens_q.shape[0] - 1, q.shape[1], k.shape[1], d, int(max_seqlen_q), int(max_seqlen_k),
        bool(causal), default_scale(scale, d), varlen=True,
        cu_seqlens_q=cu_seqlens_q.to(torch.int32).contiguous(), cu_seqlens_k=cu_seqlens_k.to(torch.int32).contiguous(),
        window=window, softcap=softcap,
    )


def attention_varlen_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool = False,
    scale: float | None = None,
    window: int | None = None,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed attention. q (total_q, H, D), k/v (total_k, Hkv, D), cu_seqlens_* (num_seqs + 1,)
    int32 offsets, max_seqlen_* the longest sequence -> (o (total_q, H, D), lse (H, total_q) fp32).
    No query sees a key of another sequence; causal alignment is per sequence (bottom-right)."""
    check_inputs("attention_varlen", q, k, v)
    p = varlen_problem(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, window, softcap)
    out = empty_like_rows(q)
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=torch.float32, device=q.device)
    if out.numel() and p.num_seqs > 0 and p.max_seqlen_q > 0:
        _launch_fwd(p, last_dim_contiguous(q), last_dim_contiguous(k), last_dim_contiguous(v), out, lse)
    return out, lse
