"""RMSNorm forward and backward in Triton.

Math (per row x of length N, Llama's convention; r is computed in float32, or float64 for
float64 inputs):

    r  = 1 / sqrt(mean(x²) + eps)
    n  = x · r                       normalized row, rounded to x's dtype before the scale
    y  = w · n                       stored in promote(x.dtype, w.dtype)

Backward, with g = dy · w (the reference backward's formula, unrounded n):

    dx = r · (g − n · mean(g · n))
    dw = Σ_rows dy · n

The forward handles a tile of BLOCK_M rows × BLOCK_N (≥ N) columns per program. The backward
runs a fixed number of programs P; program p handles the row blocks p, p + P, p + 2P, ... and
writes its partial Σ dy·n to row p of a (P, N) float32 buffer, which the launcher sums with
torch — a deterministic reduction, no atomics.

Rows too long for one register tile (forward N > 16384, backward N > 8192: whole-row tiles
spill registers on sm_80/sm_90) take the chunked kernels: a first pass over CHUNK-column pieces
sums x² (and g·x), a second normalizes and stores; the backward adds each row block's dy·n into
its program's row of the (P, N) buffer in memory instead of a whole-row register accumulator.

This module imports nothing of fastlm: launchers take and return torch tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import cast_rne as _cast

MAX_HIDDEN = 65536  # one row must fit a single block


@triton.jit
def _rms_norm_fwd(
    X, W, Y,
    stride_x, stride_y,
    M, N, eps,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ACC: tl.constexpr,
):
    """y[i, :] = w · (x[i, :] · rsqrt(mean(x[i, :]²) + eps)).to(x dtype) for BLOCK_M rows."""
    pid = tl.program_id(0)
    rows = (pid * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < N
    mask = (rows < M)[:, None] & col_mask[None, :]
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(ACC)
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / N + eps)  # (BLOCK_M,)
    normed = _cast(x * rstd[:, None], X.dtype.element_ty).to(ACC)  # Llama: cast before the scale
    w = tl.load(W + cols, mask=col_mask, other=0.0).to(ACC)
    y = normed * w[None, :]
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], _cast(y, Y.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_bwd(
    DY, X, W, DX, DW_PARTIAL,
    stride_dy, stride_x, stride_dx,
    M, N, eps,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ACC: tl.constexpr,
    COMPUTE_DX: tl.constexpr, COMPUTE_DW: tl.constexpr,
):
    """dx = r·(g − n·mean(g·n)) with g = dy·w; partial dw[pid, :] = Σ_(rows of pid) dy·n."""
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < N
    w = tl.load(W + cols, mask=col_mask, other=0.0).to(ACC)
    dw = tl.zeros((BLOCK_N,), dtype=ACC)
    for block in tl.range(pid, tl.cdiv(M, BLOCK_M), num_programs):
        rows = (block * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        mask = (rows < M)[:, None] & col_mask[None, :]
        x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(ACC)
        dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(ACC)
        rstd = tl.rsqrt(tl.sum(x * x, axis=1) / N + eps)
        n = x * rstd[:, None]
        if COMPUTE_DX:
            g = dy * w[None, :]
            c = tl.sum(g * n, axis=1) / N
            dx = rstd[:, None] * (g - n * c[:, None])
            tl.store(DX + rows[:, None] * stride_dx + cols[None, :], _cast(dx, DX.dtype.element_ty), mask=mask)
        if COMPUTE_DW:
            dw += tl.sum(dy * n, axis=0)
    if COMPUTE_DW:
        tl.store(DW_PARTIAL + pid * N + cols, dw, mask=col_mask)


@triton.jit
def _rms_norm_fwd_chunked(
    X, W, Y,
    stride_x, stride_y,
    M, N, eps,
    CHUNK: tl.constexpr, ACC: tl.constexpr,
):
    """_rms_norm_fwd for one long row per program, in CHUNK-column pieces (two passes over x)."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, CHUNK)
    sq = tl.zeros((CHUNK,), dtype=ACC)
    for start in tl.range(0, N, CHUNK):
        cols = start + offs
        x = tl.load(X + row * stride_x + cols, mask=cols < N, other=0.0).to(ACC)
        sq += x * x
    rstd = tl.rsqrt(tl.sum(sq, axis=0) / N + eps)
    for start in tl.range(0, N, CHUNK):
        cols = start + offs
        mask = cols < N
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(ACC)
        normed = _cast(x * rstd, X.dtype.element_ty).to(ACC)  # Llama: cast before the scale
        w = tl.load(W + cols, mask=mask, other=0.0).to(ACC)
        tl.store(Y + row * stride_y + cols, _cast(normed * w, Y.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_bwd_chunked(
    DY, X, W, DX, DW_PARTIAL,
    stride_dy, stride_x, stride_dx,
    M, N, eps,
    BLOCK_M: tl.constexpr, CHUNK: tl.constexpr, ACC: tl.constexpr,
    COMPUTE_DX: tl.constexpr, COMPUTE_DW: tl.constexpr,
):
    """_rms_norm_bwd for long rows: per block of BLOCK_M rows, pass 1 sums x² and g·x over
    CHUNK-column pieces, pass 2 writes dx and adds Σ_rows dy·n to DW_PARTIAL[pid] (zeroed by the
    launcher; each program owns its row, so the sum is deterministic)."""
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    offs = tl.arange(0, CHUNK)
    for block in tl.range(pid, tl.cdiv(M, BLOCK_M), num_programs):
        rows = (block * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        row_mask = rows < M
        sq = tl.zeros((BLOCK_M, CHUNK), dtype=ACC)
        gx = tl.zeros((BLOCK_M, CHUNK), dtype=ACC)
        for start in tl.range(0, N, CHUNK):
            cols = start + offs
            mask = row_mask[:, None] & (cols < N)[None, :]
            x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(ACC)
            sq += x * x
            if COMPUTE_DX:
                dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(ACC)
                w = tl.load(W + cols, mask=cols < N, other=0.0).to(ACC)
                gx += dy * w[None, :] * x
        rstd = tl.rsqrt(tl.sum(sq, axis=1) / N + eps)  # (BLOCK_M,)
        c = tl.sum(gx, axis=1) * rstd / N  # mean(g · n)
        for start in tl.range(0, N, CHUNK):
            cols = start + offs
            col_mask = cols < N
            mask = row_mask[:, None] & col_mask[None, :]
            x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(ACC)
            dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(ACC)
            n = x * rstd[:, None]
            if COMPUTE_DX:
                w = tl.load(W + cols, mask=col_mask, other=0.0).to(ACC)
                dx = rstd[:, None] * (dy * w[None, :] - n * c[:, None])
                tl.store(DX + rows[:, None] * stride_dx + cols[None, :], _cast(dx, DX.dtype.element_ty), mask=mask)
            if COMPUTE_DW:
                partial = DW_PARTIAL + pid * N + cols
                tl.store(partial, tl.load(partial, mask=col_mask, other=0.0) + tl.sum(dy * n, axis=0), mask=col_mask)


# Longest rows kept in one register tile (longer rows: the chunked kernels), and their pieces.
FWD_MAX_TILE = 16384
BWD_MAX_TILE = 8192
FWD_CHUNK = 4096
BWD_CHUNK, BWD_CHUNK_ROWS = 2048, 2
CHUNKED_WARPS = 8


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """A (M, n) view (or copy) of ``t`` with unit column stride; the row stride may be anything."""
    t2 = t.reshape(-1, n)
    return t2 if t2.stride(1) == 1 else t2.contiguous()


def _settings(m: int, n: int, per_thread: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps): whole rows, ~4096 elements per tile, ~``per_thread`` tile
    elements per thread (16 forward, 8 backward: sm_90 builds of these tiles do not spill up to
    a hidden size of 8192)."""
    if n > MAX_HIDDEN:
        raise ValueError(f"triton rms_norm supports hidden sizes up to {MAX_HIDDEN}, got {n}")
    block_n = triton.next_power_of_2(n)
    block_m = max(1, min(4096 // block_n, triton.next_power_of_2(max(m, 1)), 64))
    num_warps = min(32, max(4, block_m * block_n // (32 * per_thread)))
    return block_m, block_n, num_warps


def _num_programs(num_blocks: int, device: torch.device) -> int:
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(num_blocks, 4 * sms))
    return max(1, min(num_blocks, 4))  # the interpreter: few programs, long loops


def rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x (..., N), weight (N,) -> y (..., N) in promote(x.dtype, weight.dtype)."""
    n = x.shape[-1]
    out = torch.empty_like(x, dtype=torch.promote_types(x.dtype, weight.dtype))
    if x.numel() == 0:
        return out
    x2 = _rows(x, n)
    m = x2.shape[0]
    y2 = out.view(-1, n) if out.is_contiguous() else torch.empty((m, n), dtype=out.dtype, device=x.device)
    block_m, block_n, num_warps = _settings(m, n, per_thread=16)
    if block_n > FWD_MAX_TILE:
        _rms_norm_fwd_chunked[(m,)](
            x2, weight.contiguous(), y2, x2.stride(0), y2.stride(0), m, n, eps,
            CHUNK=FWD_CHUNK, ACC=_acc(x.dtype), num_warps=CHUNKED_WARPS,
        )
    else:
        _rms_norm_fwd[(triton.cdiv(m, block_m),)](
            x2, weight.contiguous(), y2, x2.stride(0), y2.stride(0), m, n, eps,
            BLOCK_M=block_m, BLOCK_N=block_n, ACC=_acc(x.dtype), num_warps=num_warps,
        )
    if not out.is_contiguous():
        out.copy_(y2.view(out.shape))
    return out


def rms_norm_backward(
    grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float, need_dx: bool, need_dw: bool
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(dx in x's dtype or None, dw in weight's dtype or None) for y = rms_norm(x, weight, eps)."""
    n = x.shape[-1]
    dx = torch.empty_like(x) if need_dx else None
    if x.numel() == 0:
        return dx, (torch.zeros_like(weight) if need_dw else None)
    x2, dy2 = _rows(x, n), _rows(grad, n)
    m = x2.shape[0]
    if dx is None:
        dx2 = x2  # never written (COMPUTE_DX=False)
    elif dx.is_contiguous():
        dx2 = dx.view(-1, n)
    else:
        dx2 = torch.empty((m, n), dtype=x.dtype, device=x.device)
    block_m, block_n, num_warps = _settings(m, n, per_thread=8)
    chunked = block_n > BWD_MAX_TILE
    if chunked:
        block_m = BWD_CHUNK_ROWS
    programs = _num_programs(triton.cdiv(m, block_m), x.device)
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    shape = (programs, n) if need_dw else (1,)
    partial = (torch.zeros if chunked else torch.empty)(shape, dtype=acc_dtype, device=x.device)
    args = (dy2, x2, weight.contiguous(), dx2, partial, dy2.stride(0), x2.stride(0), dx2.stride(0), m, n, eps)
    flags = dict(ACC=_acc(x.dtype), COMPUTE_DX=need_dx, COMPUTE_DW=need_dw)
    if chunked:
        _rms_norm_bwd_chunked[(programs,)](*args, BLOCK_M=block_m, CHUNK=BWD_CHUNK, num_warps=CHUNKED_WARPS, **flags)
    else:
        _rms_norm_bwd[(programs,)](*args, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps, **flags)
    if dx is not None and not dx.is_contiguous():
        dx.copy_(dx2.view(dx.shape))
    dw = partial.sum(dim=0).to(weight.dtype) if need_dw else None
    return dx, dw
