"""SwiGLU, y = silu(g) · u = g · σ(g) · u, forward and backward in Triton.

Math (elementwise, in float32 — float64 for float64 inputs — rounded once to the output dtype):

    forward:   y  = g · σ(g) · u
    backward:  dg = dy · u · σ(g) · (1 + g · (1 − σ(g)))
               du = dy · g · σ(g)

Tensors are seen as (M, N) rows with a unit column stride and any row stride, so the gate and up
halves of a fused gate/up projection (``gu[..., :F]``, ``gu[..., F:]``) are read in place. The
grid is flat over M × cdiv(N, BLOCK_N) tiles; contiguous inputs are treated as one long row.
Imports nothing of fastlm.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import cast_rne as _cast


@triton.jit
def _swiglu_fwd(
    G, U, Y,
    stride_g, stride_u, stride_y,
    N, BLOCKS_PER_ROW,
    BLOCK_N: tl.constexpr, ACC: tl.constexpr,
):
    """y = g·σ(g)·u on one BLOCK_N tile of one row."""
    pid = tl.program_id(0)
    row = (pid // BLOCKS_PER_ROW).to(tl.int64)
    cols = (pid % BLOCKS_PER_ROW).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = cols < N
    g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(ACC)
    u = tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(ACC)
    y = g * tl.sigmoid(g) * u
    tl.store(Y + row * stride_y + cols, _cast(y, Y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd(
    DY, G, U, DG, DU,
    stride_dy, stride_g, stride_u, stride_dg, stride_du,
    N, BLOCKS_PER_ROW,
    BLOCK_N: tl.constexpr, ACC: tl.constexpr, COMPUTE_DG: tl.constexpr, COMPUTE_DU: tl.constexpr,
):
    """dg = dy·u·σ(g)·(1 + g·(1 − σ(g))), du = dy·g·σ(g) on one tile."""
    pid = tl.program_id(0)
    row = (pid // BLOCKS_PER_ROW).to(tl.int64)
    cols = (pid % BLOCKS_PER_ROW).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = cols < N
    dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(ACC)
    g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(ACC)
    s = tl.sigmoid(g)
    if COMPUTE_DG:
        u = tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(ACC)
        dg = dy * u * s * (1.0 + g * (1.0 - s))
        tl.store(DG + row * stride_dg + cols, _cast(dg, DG.dtype.element_ty), mask=mask)
    if COMPUTE_DU:
        du = dy * g * s
        tl.store(DU + row * stride_du + cols, _cast(du, DU.dtype.element_ty), mask=mask)


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """(M, n) view (or copy) of ``t`` with unit column stride."""
    t2 = t.reshape(-1, n)
    return t2 if t2.stride(1) == 1 else t2.contiguous()


def _as_matrix(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """All (1, numel) when every tensor is contiguous (one long row), else (M, N) row views."""
    if all(t.is_contiguous() for t in tensors):
        return [t.view(1, -1) for t in tensors]
    n = tensors[0].shape[-1]
    return [_rows(t, n) for t in tensors]


def _grid(m: int, n: int) -> tuple[int, int, int]:
    """(programs, blocks per row, BLOCK_N)."""
    block_n = min(triton.next_power_of_2(n), 2048)
    blocks = triton.cdiv(n, block_n)
    return m * blocks, blocks, block_n


def _output(like: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(result laid out as empty_like(like), buffer the kernel writes: contiguous)."""
    out = torch.empty_like(like, dtype=dtype)
    return out, (out if out.is_contiguous() else torch.empty(like.shape, dtype=dtype, device=like.device))


def swiglu_forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up (..., F) -> silu(gate)·up (..., F) in promote(gate.dtype, up.dtype)."""
    out, buf = _output(gate, torch.promote_types(gate.dtype, up.dtype))
    if gate.numel() == 0:
        return out
    g2, u2, y2 = _as_matrix([gate, up, buf])
    programs, blocks, block_n = _grid(*y2.shape)
    _swiglu_fwd[(programs,)](
        g2, u2, y2, g2.stride(0), u2.stride(0), y2.stride(0), y2.shape[1], blocks,
        BLOCK_N=block_n, ACC=_acc(out.dtype), num_warps=4 if block_n <= 1024 else 8,
    )
    if buf is not out:
        out.copy_(buf)
    return out


def swiglu_backward(
    grad: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, need_gate: bool, need_up: bool
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(d gate in gate's dtype or None, d up in up's dtype or None)."""
    dg, dg_buf = _output(gate, gate.dtype) if need_gate else (None, None)
    du, du_buf = _output(up, up.dtype) if need_up else (None, None)
    if gate.numel() == 0 or not (need_gate or need_up):
        return dg, du
    outs = [b for b in (dg_buf, du_buf) if b is not None]
    dy2, g2, u2, *out2 = _as_matrix([grad, gate, up, *outs])
    dg2 = out2.pop(0) if need_gate else g2  # placeholders are never written
    du2 = out2.pop(0) if need_up else g2
    programs, blocks, block_n = _grid(*g2.shape)
    _swiglu_bwd[(programs,)](
        dy2, g2, u2, dg2, du2,
        dy2.stride(0), g2.stride(0), u2.stride(0), dg2.stride(0), du2.stride(0),
        g2.shape[1], blocks,
        BLOCK_N=block_n, ACC=_acc(torch.promote_types(gate.dtype, up.dtype)),
        COMPUTE_DG=need_gate, COMPUTE_DU=need_up, num_warps=4 if block_n <= 1024 else 8,
    )
    if dg is not None and dg_buf is not dg:
        dg.copy_(dg_buf)
    if du is not None and du_buf is not du:
        du.copy_(du_buf)
    return dg, du
