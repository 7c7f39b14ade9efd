"""Split-K decode attention (flash-decoding) in Triton, over a contiguous or a paged KV cache.

For sequence b with L_b valid cached positions and Tq new queries (the last Tq positions),
query t of head h, at position p = L_b - Tq + t, sees keys j of kv head h // G (G = H / Hkv)
with j <= p and, with a sliding window W, j > p - W::

    s_j = scale · q·k_j      (soft-capped: s_j ← c·tanh(s_j / c))
    o   = Σ_j softmax_j(s_j) · v_j

Step 1, ``_decode_split``: the keys a sequence may see, [lo, L_b) with lo = max(0, L_b - Tq - W + 1)
(0 without a window), are cut into ``num_splits`` chunks so that batch 1 with a long cache
still fills the GPU. Program (split, row tile, b, kv head) computes, for BLOCK_R of the G·Tq
query rows of that kv head (row r = query head kvh·G + r // Tq, query t = r % Tq; all heads of
a group share each K/V tile load), the softmax state of its chunk: o_s = Σ_j exp(s_j - m)·v_j / l
and lse_s = m + log l (natural log). Splits with no visible key have lse_s = -inf.

Step 2, ``_decode_merge``: one program per query row merges its splits, lse = log Σ_s exp(lse_s),
o = Σ_s exp(lse_s - lse)·o_s, and writes o in q's dtype (0 for a row that sees no key).

The split count and the chunk length are runtime arguments (one compiled kernel for every cache
length); block sizes, warps and stages depend only on the head dim and the dtype
(:func:`decode_config`), chosen to fit shared memory and registers without spills on sm_80/sm_90.

Paged: position j of sequence b is block TABLE[b, j // PAGE] at offset j % PAGE of
(num_blocks, Hkv, PAGE, D) page tensors.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

MAX_HEAD_DIM = 256
LOG2E = 1.4426950408889634
MERGE_BLOCK_S = 16  # splits merged per iteration of _decode_merge


@triton.jit
def _tanh(x):
    """tanh(x) = sign(x)·(1 - e)/(1 + e), e = exp(-2|x|) (no overflow; absolute error ~1e-7)."""
    e = tl.math.exp2(-2.8853900817779268 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _decode_split(
    Q, K, V, LENS, TABLE, PART_O, PART_LSE,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_tb,
    num_kv_heads, tq, group, row_tiles, num_splits, chunk, window, qk_scale, cap,
    HEAD_DIM_REAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
    PAGED: tl.constexpr, PAGE: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """One program = (split, row tile, sequence b, kv head), flattened on grid axis 0 (split
    fastest): the partial softmax state of BLOCK_R query rows over one chunk of keys.
    Base-2 scores: raw·qk_scale, or cap·tanh(raw·qk_scale) with a soft-cap (qk_scale = scale / c,
    cap = c·log2 e). Partial results: PART_O ((B·Hkv·rows, num_splits, HEAD_DIM) fp32, rows =
    row_tiles·BLOCK_R) and PART_LSE ((B·Hkv·rows, num_splits) fp32, natural log)."""
    pid = tl.program_id(0)
    split = pid % num_splits
    rest = pid // num_splits
    row_tile = rest % row_tiles
    bh = rest // row_tiles
    b = bh // num_kv_heads
    kvh = bh % num_kv_heads
    length = tl.load(LENS + b).to(tl.int32)
    rows = row_tile * BLOCK_R + tl.arange(0, BLOCK_R)
    head = kvh * group + rows // tq
    t = rows % tq
    row_ok = rows < group * tq
    offs_d = tl.arange(0, HEAD_DIM)
    d_ok = offs_d < HEAD_DIM_REAL
    b64 = b.to(tl.int64)
    q = tl.load(Q + b64 * stride_qb + head[:, None].to(tl.int64) * stride_qh + t[:, None] * stride_qt + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    last = length - tq + t  # the last key each row may see
    lo = 0
    if WINDOW:
        lo = tl.maximum(length - tq - window + 1, 0)  # the first key any row may see
    start = lo + split * chunk
    end = tl.minimum(start + chunk, length)
    m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, HEAD_DIM], dtype=tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    for n0 in range(start, end, BLOCK_N):
        cols = n0 + offs_n
        col_ok = cols < end
        if PAGED:
            block = tl.load(TABLE + b64 * stride_tb + cols // PAGE, mask=col_ok, other=0).to(tl.int64)
            k_rows = block * stride_kb + (cols % PAGE) * stride_kt
            v_rows = block * stride_vb + (cols % PAGE) * stride_vt
        else:
            k_rows = b64 * stride_kb + cols.to(tl.int64) * stride_kt
            v_rows = b64 * stride_vb + cols.to(tl.int64) * stride_vt
        kv_mask = col_ok[:, None] & d_ok[None, :]
        k = tl.load(K + kvh.to(tl.int64) * stride_kh + k_rows[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + kvh.to(tl.int64) * stride_vh + v_rows[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        if UPCAST:  # interpreter + bf16: the interpreter mis-multiplies bf16 in tl.dot
            raw = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            raw = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # (BLOCK_R, BLOCK_N)
        if SOFTCAP:
            s = cap * _tanh(raw * qk_scale)
        else:
            s = raw * qk_scale
        visible = col_ok[None, :] & (cols[None, :] <= last[:, None])
        if WINDOW:
            visible = visible & (cols[None, :] > last[:, None] - window)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if UPCAST:
            acc = tl.dot(p, v.to(tl.float32), acc * alpha[:, None], input_precision="ieee")
        else:
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
    row64 = (bh * row_tiles * BLOCK_R + rows).to(tl.int64) * num_splits + split  # (BLOCK_R,)
    tl.store(PART_O + row64[:, None] * HEAD_DIM + offs_d[None, :], acc / l_safe[:, None])
    tl.store(PART_LSE + row64, lse)


@triton.jit
def _decode_merge(
    PART_O, PART_LSE, OUT,
    stride_ob, stride_oh, stride_ot,
    num_kv_heads, tq, group, padded_rows, num_splits,
    HEAD_DIM_REAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """One program = one query row (b, head, t), grid axis 0 = B·H·Tq (t fastest):
    lse = log Σ_s exp(lse_s), o = Σ_s exp(lse_s - lse)·o_s over the splits, BLOCK_S at a time
    (online: running max m, sum l), written to OUT (B, H, Tq, D) in its dtype; 0 if no key."""
    pid = tl.program_id(0)
    t = pid % tq
    bhead = pid // tq
    head = bhead % (num_kv_heads * group)
    b = bhead // (num_kv_heads * group)
    kvh = head // group
    r = (head % group) * tq + t  # row within the kv head's rows
    row = ((b * num_kv_heads + kvh).to(tl.int64) * padded_rows + r) * num_splits
    offs_d = tl.arange(0, HEAD_DIM)
    offs_s = tl.arange(0, BLOCK_S)
    m = tl.full([1], float("-inf"), dtype=tl.float32)
    l_sum = tl.zeros([1], dtype=tl.float32)
    acc = tl.zeros([HEAD_DIM], dtype=tl.float32)
    for s0 in range(0, num_splits, BLOCK_S):
        s_ok = s0 + offs_s < num_splits
        lse = tl.load(PART_LSE + row + s0 + offs_s, mask=s_ok, other=float("-inf"))  # (BLOCK_S,)
        m_new = tl.maximum(m, tl.max(lse, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        w = tl.exp(lse - m_safe)  # 0 for empty splits
        alpha = tl.exp(m - m_safe)
        o = tl.load(PART_O + (row + s0 + offs_s[:, None]) * HEAD_DIM + offs_d[None, :], mask=s_ok[:, None],
                    other=0.0)
        acc = acc * alpha + tl.sum(w[:, None] * o, 0)
        l_sum = l_sum * alpha + tl.sum(w, 0)
        m = m_new
    out = acc / tl.where(l_sum == 0.0, 1.0, l_sum)
    out_ptr = OUT + b.to(tl.int64) * stride_ob + head.to(tl.int64) * stride_oh + t.to(tl.int64) * stride_ot
    tl.store(out_ptr + offs_d, out.to(OUT.dtype.element_ty), mask=offs_d < HEAD_DIM_REAL)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclass(frozen=True)
class DecodeConfig:
    """Block sizes and launch options of ``_decode_split`` for one (head dim, dtype)."""

    block_r: int  # query rows per program (>= 16, the tl.dot minimum)
    block_n: int  # keys per iteration
    num_warps: int
    num_stages: int


# By padded head dim: (max BLOCK_R, BLOCK_N, warps, stages), 16-bit and fp32 inputs. Sized with the
# ahead-of-time compile check (scripts/compile_kernels.py) to compile without spills and within
# sm_80's 163 KB of shared memory (the smaller of sm_80/sm_90), for every row count.
_CONFIGS = {
    "16bit": {64: (64, 64, 4, 3), 128: (32, 64, 4, 3), 256: (16, 32, 4, 3)},
    "fp32": {64: (16, 64, 4, 2), 128: (16, 32, 8, 2), 256: (16, 16, 4, 2)},
}
INTERPRET_BLOCK_N = 16


def decode_config(head_dim: int, dtype: torch.dtype, rows: int) -> DecodeConfig:
    """The config for a padded head dim (16..256), a dtype and G·Tq query rows per kv head."""
    table = _CONFIGS["fp32" if dtype == torch.float32 else "16bit"]
    bound = min(b for b in table if head_dim <= b)
    max_r, block_n, warps, stages = table[bound]
    block_r = min(max(16, triton.next_power_of_2(rows)), max_r)
    if interpreting():
        block_n = INTERPRET_BLOCK_N
    return DecodeConfig(block_r, block_n, warps, stages)


def num_splits(span: int, programs: int, device: torch.device) -> int:
    """Splits of the key span: enough for ~2 waves of programs over the GPU's SMs, each split
    >= 256 keys, at most 64. A runtime argument of the kernel (no recompile per value)."""
    if interpreting() or device.type != "cuda":
        return max(1, min(4, triton.cdiv(span, 64)))
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(2 * sms, max(programs, 1)), triton.cdiv(span, 256), 64))


def decode_grids(b: int, hkv: int, group: int, tq: int, splits: int, block_r: int) -> tuple[tuple, tuple]:
    """(split grid, merge grid): 1-D, (splits · row tiles · B · Hkv,) and (B · H · Tq,)."""
    row_tiles = triton.cdiv(group * tq, block_r)
    split_grid, merge_grid = (splits * row_tiles * b * hkv,), (b * hkv * group * tq,)
    for grid in (split_grid, merge_grid):
        if grid[0] >= 2**31:
            raise ValueError(f"decode_attention: {grid[0]} programs exceed CUDA's grid limit of 2^31 - 1")
    return split_grid, merge_grid


def dot_precision(dtype: torch.dtype) -> str:
    """'ieee' for fp32 unless torch allows TF32 matmuls; 'tf32' (ignored for 16-bit dots) otherwise."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def decode_attention(q, k, v, cache_lens, scale=None, block_table=None, window=None, softcap=None):
    """q (B, H, Tq, D); k/v (B, Hkv, Lmax, D), or pages (num_blocks, Hkv, PAGE, D) with
    block_table (B, max_blocks); cache_lens (B,); window (int >= 1) / softcap (float > 0) or
    None -> o (B, H, Tq, D) in q's dtype."""
    b, h, tq, d = q.shape
    hkv = k.shape[1]
    group = h // hkv
    if d > MAX_HEAD_DIM:
        raise ValueError(f"triton decode_attention supports head dims up to {MAX_HEAD_DIM}, got D={d}")
    if window is not None and int(window) < 1:
        raise ValueError(f"triton decode_attention: window must be >= 1, got {window}")
    if softcap is not None and not float(softcap) > 0:
        raise ValueError(f"triton decode_attention: softcap must be > 0, got {softcap}")
    paged = block_table is not None
    page = k.shape[2] if paged else 1
    max_len = block_table.shape[1] * page if paged else k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    head_dim = max(16, triton.next_power_of_2(d))
    rows = group * tq
    cfg = decode_config(head_dim, q.dtype, rows)
    span = max_len if window is None else min(max_len, int(window) + tq - 1)  # keys one sequence may see
    row_tiles = triton.cdiv(rows, cfg.block_r)
    splits = num_splits(span, b * hkv * row_tiles, q.device)
    chunk = triton.cdiv(triton.cdiv(max(span, 1), splits), cfg.block_n) * cfg.block_n
    split_grid, merge_grid = decode_grids(b, hkv, group, tq, splits, cfg.block_r)
    padded_rows = row_tiles * cfg.block_r
    part_o = torch.empty(b * hkv * padded_rows * splits * head_dim, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(b * hkv * padded_rows * splits, dtype=torch.float32, device=q.device)
    out = torch.empty_like(q)
    if out.stride(-1) != 1:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    lens = cache_lens.to(torch.int32)
    table = block_table.to(torch.int32) if paged else lens
    if softcap is None:
        qk_scale, cap = scale * LOG2E, 1.0
    else:
        qk_scale, cap = scale / float(softcap), float(softcap) * LOG2E
    _decode_split[split_grid](
        q, k, v, lens, table, part_o, part_lse,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        table.stride(0) if paged else 0,
        hkv, tq, group, row_tiles, splits, chunk, 0 if window is None else int(window), qk_scale, cap,
        HEAD_DIM_REAL=d, HEAD_DIM=head_dim, BLOCK_R=cfg.block_r, BLOCK_N=cfg.block_n,
        PAGED=paged, PAGE=page, WINDOW=window is not None, SOFTCAP=softcap is not None,
        DOT_PRECISION=dot_precision(q.dtype), UPCAST=interpreting() and q.dtype == torch.bfloat16,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    _decode_merge[merge_grid](
        part_o, part_lse, out, out.stride(0), out.stride(1), out.stride(2),
        hkv, tq, group, padded_rows, splits,
        HEAD_DIM_REAL=d, HEAD_DIM=head_dim, BLOCK_S=MERGE_BLOCK_S, num_warps=4 if head_dim >= 128 else 2,
    )
    return out
