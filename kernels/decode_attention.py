"""Split-K decode attention (flash-decoding) in Triton, over a contiguous or a paged KV cache.

For sequence b with L_b valid cached positions and Tq new queries (the last Tq positions),
query t of head h sees keys j <= L_b - Tq + t of kv head h // G (G = H / Hkv)::

    o = Σ_j softmax_j(scale · q·k_j) · v_j

The key range is cut into NUM_SPLITS chunks so that batch 1 with a long cache still fills the
GPU: program (b, kv head, split) computes, for all G·Tq query rows of that kv head at once (each
K/V tile is read once per group), the partial softmax state of its chunk — m (row max, base 2),
acc/l (normalized partial output) and lse_s = (m + log2 l)·ln 2. A second step merges the
splits: lse = logsumexp_s lse_s, o = Σ_s exp(lse_s − lse)·o_s. Splits with no visible key
have lse_s = −inf and weigh 0.

Paged: position j of sequence b is block TABLE[b, j // PAGE] at offset j % PAGE of
(num_blocks, Hkv, PAGE, D) page tensors.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

MAX_HEAD_DIM = 256


@triton.jit
def _decode_split(
    Q, K, V, LENS, TABLE, PART_O, PART_LSE,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_tb,
    num_kv_heads, tq, group, chunk, qk_scale,
    HEAD_DIM_REAL: tl.constexpr, HEAD_DIM: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
    PAGED: tl.constexpr, PAGE: tl.constexpr, NUM_SPLITS: tl.constexpr, UPCAST: tl.constexpr,
):
    """One program = (sequence b, kv head, split): partial attention of its G·Tq query rows."""
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // num_kv_heads
    kvh = bh % num_kv_heads
    length = tl.load(LENS + b).to(tl.int32)
    rows = tl.arange(0, ROWS)  # row r = (query head kvh·G + r // Tq, query t = r % Tq)
    head = kvh * group + rows // tq
    t = rows % tq
    row_ok = rows < group * tq
    offs_d = tl.arange(0, HEAD_DIM)
    d_ok = offs_d < HEAD_DIM_REAL
    b64 = b.to(tl.int64)
    q = tl.load(Q + b64 * stride_qb + head[:, None].to(tl.int64) * stride_qh + t[:, None] * stride_qt + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    last = length - tq + t  # the last key each row may see
    start = split * chunk
    end = tl.minimum(start + chunk, length)
    m_i = tl.full([ROWS], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([ROWS], dtype=tl.float32)
    acc = tl.zeros([ROWS, HEAD_DIM], dtype=tl.float32)
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
        if UPCAST:  # the interpreter mis-multiplies bf16 in tl.dot: compute in fp32 there
            s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee") * qk_scale
        else:
            s = tl.dot(q, tl.trans(k)) * qk_scale  # (ROWS, BLOCK_N)
        visible = col_ok[None, :] & (cols[None, :] <= last[:, None])
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if UPCAST:
            acc = tl.dot(p, v.to(tl.float32), acc * alpha[:, None], input_precision="ieee")
        else:
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
    base = (bh * NUM_SPLITS + split).to(tl.int64) * ROWS
    tl.store(PART_O + (base + rows[:, None]) * HEAD_DIM + offs_d[None, :], acc / l_safe[:, None])
    tl.store(PART_LSE + base + rows, lse)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _num_splits(max_len: int, programs: int, device: torch.device) -> int:
    """Enough splits for ~2 waves of programs over the GPU's SMs, each split >= 256 keys."""
    if interpreting() or device.type != "cuda":
        return max(1, min(4, triton.cdiv(max_len, 64)))
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(2 * sms, programs), triton.cdiv(max_len, 256), 64))


def decode_attention(q, k, v, cache_lens, scale=None, block_table=None, window=None, softcap=None):
    """q (B, H, Tq, D); k/v (B, Hkv, Lmax, D), or pages (num_blocks, Hkv, PAGE, D) with
    block_table (B, max_blocks); cache_lens (B,) -> o (B, H, Tq, D) in q's dtype."""
    if window is not None or softcap is not None:
        raise NotImplementedError("decode_attention: the triton kernels do not take window/softcap yet (use the reference backend)")
    b, h, tq, d = q.shape
    hkv = k.shape[1]
    group = h // hkv
    if d > MAX_HEAD_DIM:
        raise ValueError(f"triton decode_attention supports head dims up to {MAX_HEAD_DIM}, got D={d}")
    paged = block_table is not None
    page = k.shape[2] if paged else 1
    max_len = block_table.shape[1] * page if paged else k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    rows = max(16, triton.next_power_of_2(group * tq))
    head_dim = max(16, triton.next_power_of_2(d))
    splits = _num_splits(max_len, b * hkv, q.device)
    chunk = triton.cdiv(triton.cdiv(max_len, splits), 16) * 16
    part_o = torch.empty(b * hkv * splits * rows * head_dim, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(b * hkv * splits * rows, dtype=torch.float32, device=q.device)
    lens = cache_lens.to(torch.int32)
    table = block_table.to(torch.int32) if paged else lens
    block_n = 16 if interpreting() else 64
    _decode_split[(b * hkv, splits)](
        q, k, v, lens, table, part_o, part_lse,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        table.stride(0) if paged else 0,
        hkv, tq, group, chunk, scale * 1.4426950408889634,
        HEAD_DIM_REAL=d, HEAD_DIM=head_dim, ROWS=rows, BLOCK_N=block_n,
        PAGED=paged, PAGE=page, NUM_SPLITS=splits, UPCAST=interpreting() or q.dtype == torch.float32,
        num_warps=4,
    )
    # Merge the splits: (B, Hkv, S, rows) weights exp(lse_s - lse).
    part_lse = part_lse.view(b, hkv, splits, rows)[..., : group * tq]
    part_o = part_o.view(b, hkv, splits, rows, head_dim)[..., : group * tq, :d]
    lse = torch.logsumexp(part_lse, dim=2, keepdim=True)
    weight = torch.exp(part_lse - torch.where(torch.isinf(lse), torch.zeros_like(lse), lse))
    weight = torch.nan_to_num(weight, nan=0.0)
    out = (weight[..., None] * part_o).sum(dim=2)  # (B, Hkv, G·Tq, D)
    return out.view(b, hkv, group, tq, d).reshape(b, h, tq, d).to(q.dtype)
