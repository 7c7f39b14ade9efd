"""Rotary position embedding (Llama's rotate-half convention), forward and backward, in Triton.

Math: x (B, H, T, D) split into halves x = [x1, x2] (D/2 each); for position p and frequency
index i < D/2, angle = p · inv_freq[i] with inv_freq[i] = theta^(−2i/D), and

    forward:   y1 = x1·cos − x2·sin,   y2 = x2·cos + x1·sin      (rotation by +angle)
    backward:  dx1 = dy1·cos + dy2·sin, dx2 = dy2·cos − dy1·sin   (rotation by −angle = Rᵀ)

so one kernel serves both, with SIGN = ±1 multiplying sin. inv_freq is computed by the launcher
with the same torch expression as the reference (so angles round identically); the angle is
reduced to [−π, π] (Cody–Waite, 2π = C1 + C2 with k·C1 exact for |k| < 2^16) before cos/sin,
since the GPU's fast sin/cos lose accuracy on large arguments. Math in float32 (float64 for
float64 inputs).

One program per (b, block of BLOCK_T tokens): it computes cos/sin once, a (BLOCK_T, BLOCK_D ≥ D/2)
tile, and applies them to every head in turn (for the usual (B, H, T, D) layout each head's tile
is contiguous). x, y and dy may have any strides with a unit stride on D (e.g. a (B, T, H, D)
tensor transposed to (B, H, T, D)). Imports nothing of fastlm.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import cast_rne as _cast

@triton.jit
def cos_sin(angle, REDUCE: tl.constexpr):
    """(cos, sin) of ``angle``; with REDUCE (float32) the angle is first brought to [−π, π] by
    Cody–Waite: 2π = C1 + C2, C1 = 6.28125 = 201/32 (k·C1 exact in float32 for |k| < 2^16)."""
    if REDUCE:
        k = tl.floor(angle * 0.15915494309189535 + 0.5)  # round(angle / 2π)
        angle = (angle - k * 6.28125) - k * 0.001935307179586232
    return tl.cos(angle), tl.sin(angle)


@triton.jit
def _rope_kernel(
    X, Y, POS, INV_FREQ,
    H, T, HALF, T_BLOCKS,
    stride_xb, stride_xh, stride_xt,
    stride_yb, stride_yh, stride_yt,
    stride_pb, stride_pt,
    SIGN: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    ACC: tl.constexpr, REDUCE: tl.constexpr,
):
    """y[b, h, t] = rotate(x[b, h, t], SIGN · pos[b, t] · inv_freq) for BLOCK_T tokens, all heads."""
    pid = tl.program_id(0)
    b = (pid // T_BLOCKS).to(tl.int64)
    t = ((pid % T_BLOCKS) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    t_mask = t < T
    d = tl.arange(0, BLOCK_D)
    d_mask = d < HALF
    pos = tl.load(POS + b * stride_pb + t * stride_pt, mask=t_mask, other=0).to(ACC)
    inv_freq = tl.load(INV_FREQ + d, mask=d_mask, other=0.0)
    cos, sin = cos_sin(pos[:, None] * inv_freq[None, :], REDUCE)  # the reference's angle rounding
    sin = sin * SIGN
    mask = t_mask[:, None] & d_mask[None, :]
    x_tile = X + b * stride_xb + t[:, None] * stride_xt + d[None, :]
    y_tile = Y + b * stride_yb + t[:, None] * stride_yt + d[None, :]
    for h in tl.range(0, H):
        x_ptr = x_tile + h * stride_xh
        x1 = tl.load(x_ptr, mask=mask, other=0.0).to(ACC)
        x2 = tl.load(x_ptr + HALF, mask=mask, other=0.0).to(ACC)
        y_ptr = y_tile + h * stride_yh
        tl.store(y_ptr, _cast(x1 * cos - x2 * sin, Y.dtype.element_ty), mask=mask)
        tl.store(y_ptr + HALF, _cast(x2 * cos + x1 * sin, Y.dtype.element_ty), mask=mask)


_INV_FREQ: dict[tuple, torch.Tensor] = {}


def inv_freq(head_dim: int, theta: float, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """theta^(−2i/D) for i < D/2, with the reference's exact expression; cached per device."""
    key = (head_dim, float(theta), str(device), dtype)
    if key not in _INV_FREQ:
        exponents = torch.arange(0, head_dim, 2, device=device, dtype=dtype) / head_dim
        _INV_FREQ[key] = 1.0 / (theta**exponents)
    return _INV_FREQ[key]


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _launch(src: torch.Tensor, out: torch.Tensor, positions: torch.Tensor, theta: float, sign: float) -> None:
    b, h, t, d = src.shape
    if src.numel() == 0:
        return
    acc_dtype = torch.float64 if out.dtype == torch.float64 else torch.float32
    freqs = inv_freq(d, theta, src.device, acc_dtype)
    if positions.dim() == 1:  # (T,): the same positions for every sequence
        stride_pb, stride_pt = 0, positions.stride(0)
    else:
        stride_pb, stride_pt = positions.stride(0), positions.stride(1)
    half = d // 2
    block_d = triton.next_power_of_2(half)
    block_t = min(triton.next_power_of_2(t), max(1, 1024 // block_d))
    t_blocks = triton.cdiv(t, block_t)
    num_warps = 4 if block_t * block_d <= 512 else 8
    _rope_kernel[(b * t_blocks,)](
        src, out, positions, freqs,
        h, t, half, t_blocks,
        src.stride(0), src.stride(1), src.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        stride_pb, stride_pt,
        SIGN=sign, BLOCK_T=block_t, BLOCK_D=block_d,
        ACC=tl.float64 if acc_dtype == torch.float64 else tl.float32,
        REDUCE=acc_dtype == torch.float32, num_warps=num_warps,
    )


def _output_like(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(result with empty_like's layout, buffer the kernel writes: the same unless D is strided)."""
    out = torch.empty_like(x)
    return out, (out if out.stride(-1) == 1 else torch.empty(x.shape, dtype=x.dtype, device=x.device))


def rope_forward(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """x (B, H, T, D), positions (T,) or (B, T) int -> y (B, H, T, D), rotated by +angle."""
    out, buf = _output_like(x)
    _launch(_unit_last(x), buf, positions, theta, 1.0)
    if buf is not out:
        out.copy_(buf)
    return out


def rope_backward(grad: torch.Tensor, x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """dx = Rᵀ·dy: dy rotated by −angle, in x's dtype and layout."""
    out, buf = _output_like(x)
    _launch(_unit_last(grad), buf, positions, theta, -1.0)
    if buf is not out:
        out.copy_(buf)
    return out
