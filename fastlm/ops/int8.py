"""Int8 ops: weight quantization (``quantize_int8``, ``dequantize_int8``), weight-only int8 linear
(``int8_linear``), per-token activation quantization (``quantize_per_token``) and W8A8 linear
(``w8a8_linear``).

Weights: symmetric int8, scales = max|W[o, group]| / 127 per output channel or per group,
q = round(W / scales) ∈ [-127, 127]; ``int8_linear`` computes y = x·(q·scales)ᵀ + bias, the
weight frozen (gradients for x and bias only). Kernels: kernels/int8.py (triton:
int8_linear forward and dx, quantize_per_token, w8a8_linear), adapted in
fastlm/ops/triton/int8.py; csrc/int8.cu (cuda: quantize_per_token, w8a8_linear through
cuBLASLt's int8 GEMM), adapted in fastlm/ops/cuda/int8.py. On CPU the int8 GEMM of the
reference is PyTorch's own ``torch._int_mm``.

W8A8 (SmoothQuant's O1 scheme, dynamic per-token activations, per-channel weights), with
optional smoothing factors c (in,): the weight was quantized as W·diag(c), the activation is
divided by c before quantization, so x·Wᵀ = (x·diag(c)⁻¹)·(W·diag(c))ᵀ::

    sx[m] = max_k |x[m, k] / c[k]| / 127 (1 for a zero row),  xq = round(x / c / sx) ∈ [-127, 127]
    y[m, n] = sx[m] · sw[n] · Σ_k xq[m, k] · qweight[n, k] + bias[n]

"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastlm.ops.checks import check_dtype, check_floating, check_ndim, check_same_device
from fastlm.ops.common import wide
from fastlm.ops.registry import OpSpec, define_op, run

__all__ = ["dequantize_int8", "int8_linear", "int_mm", "quantize_int8", "quantize_per_token", "w8a8_linear"]


# ---- references ---------------------------------------------------------------------------------


def _scale_from_amax(amax: torch.Tensor) -> torch.Tensor:
    """amax / 127 correctly rounded (1 where amax = 0), the same on every device: a tensor
    divisor, because CUDA torch divides by a Python scalar as a multiply by its reciprocal,
    which can differ in the last bit (the kernels divide with round-to-nearest)."""
    return torch.where(amax > 0, amax / torch.full_like(amax, 127.0), torch.ones_like(amax))


def quantize_int8_reference(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: scale = max|W_row| / 127, q = round(W / scale).

    weight (out, in) -> qweight int8 (out, in), scales float32 (out,). All-zero rows get
    scale 1 so that dequantization is exact.
    """
    w = weight.float()
    amax = w.abs().amax(dim=1)
    scales = _scale_from_amax(amax)
    qweight = torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    return qweight, scales


def dequantize_int8_reference(qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """W[o, i] = qweight[o, i]·scales[o] for per-channel scales (out,), or
    qweight[o, i]·scales[o, i // g] for group-wise scales (out, in/g). -> (out, in) float32."""
    s = wide(scales)
    if s.dim() == 2:
        s = s.repeat_interleave(qweight.shape[1] // s.shape[1], dim=1)  # (out, in)
        return wide(qweight).to(s.dtype) * s
    return wide(qweight).to(s.dtype) * s[:, None]


def int8_linear_reference(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """y = x·Wᵀ + bias with W = dequantize_int8(qweight, scales) in x's dtype.  x (..., in)."""
    weight = dequantize_int8_reference(qweight, scales).to(x.dtype)
    return F.linear(x, weight, None if bias is None else bias.to(x.dtype))


def quantize_per_token_reference(x: torch.Tensor, smooth: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., K), smooth (K,) or None -> (xq int8 (..., K), sx float32 (...)), computed in float32:
    xs = x / smooth, sx = max|xs| / 127 (1 for a zero row), xq = round(xs / sx) (ties to even)."""
    xs = x.float()
    if smooth is not None:
        xs = xs / smooth.float()
    amax = xs.abs().amax(dim=-1)
    sx = _scale_from_amax(amax)
    xq = torch.round(xs / sx[..., None]).clamp_(-127, 127).to(torch.int8)
    return xq, sx


def int_mm(a: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
    """Exact int8 GEMM a·b_tᵀ: a (M, K) int8, b_t (N, K) int8 -> (M, N) int32.

    PyTorch's own ``torch._int_mm`` where it takes the shapes (any shape on CPU; on CUDA,
    cuBLASLt needs M > 16 and K, N multiples of 8), else a float64 matmul (exact: |Σ| < 2⁵³).
    """
    m, k = a.shape
    n = b_t.shape[0]
    if hasattr(torch, "_int_mm") and m > 0 and n > 0 and k > 0:
        if a.device.type == "cpu" or (a.device.type == "cuda" and m > 16 and k % 8 == 0 and n % 8 == 0):
            return torch._int_mm(a, b_t.t())
    return (a.double() @ b_t.double().t()).to(torch.int32)


def w8a8_linear_reference(x, qweight, w_scales, bias, smooth):
    """y = sx·sw·(xq·qweightᵀ) + bias in x's dtype (module docstring), the GEMM exact in int32.
    x (..., K), qweight int8 (N, K), w_scales (N,), bias (N,) or None, smooth (K,) or None."""
    n, k = qweight.shape
    xq, sx = quantize_per_token_reference(x, smooth)
    acc = int_mm(xq.reshape(-1, k), qweight)  # (M, N) int32
    y = acc.float() * sx.reshape(-1, 1) * w_scales.float()[None, :]
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], n)


# ---- backward formula ---------------------------------------------------------------------------


def int8_linear_backward(grad, x, qweight, scales, bias):
    """dx = dy·(qweight·scales)ᵀᵀ = dy·W_dequant, dbias = Σ dy (the int8 weight takes no gradient)."""
    weight = dequantize_int8_reference(qweight, scales)  # per-channel (out,) or group-wise (out, G) scales
    dy = wide(grad)
    dx = (dy @ weight.to(dy.dtype)).to(x.dtype)
    dbias = None if bias is None else dy.reshape(-1, dy.shape[-1]).sum(dim=0).to(bias.dtype)
    return dx, dbias


# ---- specs --------------------------------------------------------------------------------------


define_op(OpSpec(
    "quantize_int8",
    "Tensor weight",
    "(Tensor, Tensor)",
    lambda w: (torch.empty_like(w, dtype=torch.int8), w.new_empty((w.shape[0],), dtype=torch.float32)),
    reference_fn=quantize_int8_reference,
))
define_op(OpSpec(
    "int8_linear",
    "Tensor x, Tensor qweight, Tensor scales, Tensor? bias",
    "Tensor",
    lambda x, q, scales, bias: x.new_empty((*x.shape[:-1], q.shape[0])),
    differentiable=(0, 3),
    reference_fn=int8_linear_reference,
    reference_backward_fn=int8_linear_backward,
))
define_op(OpSpec(
    "quantize_per_token",
    "Tensor x, Tensor? smooth",
    "(Tensor, Tensor)",
    lambda x, smooth: (torch.empty_like(x, dtype=torch.int8), x.new_empty(x.shape[:-1], dtype=torch.float32)),
    reference_fn=quantize_per_token_reference,
))
define_op(OpSpec(
    "w8a8_linear",
    "Tensor x, Tensor qweight, Tensor w_scales, Tensor? bias, Tensor? smooth",
    "Tensor",
    lambda x, q, ws, bias, smooth: x.new_empty((*x.shape[:-1], q.shape[0])),
    reference_fn=w8a8_linear_reference,
))


# ---- public functions ---------------------------------------------------------------------------


def quantize_int8(weight: torch.Tensor, group_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8: scales = max|W[o, group]| / 127, q = round(W / scales) ∈ [-127, 127].

    weight (out, in) float -> (qweight int8 (out, in), scales float32): per output channel
    (out,) when group_size is None, else per group of group_size consecutive inputs
    (out, in / group_size), in divisible by group_size. Dequantize with fastlm.ops.dequantize_int8.
    """
    check_ndim("quantize_int8", weight=(weight, 2))
    check_floating("quantize_int8", weight=weight)
    if not torch.isfinite(weight).all():
        raise ValueError("quantize_int8: weight has NaN or infinite values")
    if group_size is None:
        return run("quantize_int8", weight.device, weight)
    out_f, in_f = weight.shape
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1 or in_f % group_size:
        raise ValueError(
            f"quantize_int8: group_size must be a positive integer dividing in_features={in_f}, got {group_size!r}"
        )
    # Group-wise = per-channel quantization of the (out·G, group_size) view.
    q, scales = run("quantize_int8", weight.device, weight.reshape(out_f * (in_f // group_size), group_size))
    return q.reshape(out_f, in_f), scales.reshape(out_f, in_f // group_size)


def int8_linear(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """y = x·Wᵀ + bias, W[o, i] = qweight[o, i]·scales[o] (per channel, scales (out,)) or
    qweight[o, i]·scales[o, i // (in/G)] (group-wise, scales (out, G), G dividing in).
    x (..., in) float, qweight int8 (out, in), bias (out,) -> (..., out) in x's dtype."""
    if not _linear_inputs_ok(x, qweight, scales, bias, grouped=True):
        _check_int8_linear(x, qweight, scales, bias)
    return run("int8_linear", x.device, x, qweight, scales, bias)


def _linear_inputs_ok(x, qweight, scales, bias, grouped: bool) -> bool:
    """Whether the int8 linears' shared checks pass — x (..., in) float, qweight int8 (out, in),
    float scales (out,) (or (out, G), G dividing in, when ``grouped``), bias (out,) or None, one
    device — in one pass of plain comparisons (the per-call path; the checks that name the fault
    run only when this says no)."""
    tensor = torch.Tensor
    if not (isinstance(x, tensor) and isinstance(qweight, tensor) and isinstance(scales, tensor)
            and (bias is None or isinstance(bias, tensor))):
        return False
    ws, ss, device = qweight.shape, scales.shape, x.device
    if len(ws) != 2 or qweight.dtype != torch.int8 or not x.dim() or x.shape[-1] != ws[1]:
        return False
    out_f, in_f = ws
    scales_ok = ss == (out_f,) or (grouped and len(ss) == 2 and ss[0] == out_f and ss[1] >= 1 and not in_f % ss[1])
    return (scales_ok and x.dtype.is_floating_point and scales.dtype.is_floating_point and qweight.device == device
            and scales.device == device and (bias is None or (bias.device == device and bias.shape == (out_f,)
                                                              and bias.dtype.is_floating_point)))


def _check_int8_linear(x, qweight, scales, bias) -> None:
    """:func:`int8_linear`'s inputs, each fault named."""
    check_floating("int8_linear", x=x, scales=scales)
    check_ndim("int8_linear", qweight=(qweight, 2))
    check_dtype("int8_linear", qweight, torch.int8, "qweight")
    tensors = {"x": x, "qweight": qweight, "scales": scales}
    if bias is not None:
        tensors["bias"] = bias
    check_same_device("int8_linear", **tensors)
    out_f, in_f = qweight.shape
    if x.shape[-1] != in_f:
        raise ValueError(f"int8_linear: x has {x.shape[-1]} input features, qweight expects {in_f}")
    groups_ok = scales.dim() == 2 and scales.shape[0] == out_f and scales.shape[1] >= 1 and in_f % scales.shape[1] == 0
    if scales.shape != (out_f,) and not groups_ok:
        raise ValueError(
            f"int8_linear: expected scales of shape ({out_f},) (per channel) or ({out_f}, G) with G "
            f"dividing {in_f} (group-wise), got {tuple(scales.shape)}"
        )
    if bias is not None:
        check_floating("int8_linear", bias=bias)
        if bias.shape != (out_f,):
            raise ValueError(f"int8_linear: expected bias of shape ({out_f},), got {tuple(bias.shape)}")


def dequantize_int8(qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """W = qweight·scales: qweight int8 (out, in), scales (out,) or (out, G) -> (out, in) float32."""
    check_ndim("dequantize_int8", qweight=(qweight, 2))
    check_dtype("dequantize_int8", qweight, torch.int8, "qweight")
    _check_scales("dequantize_int8", scales, *qweight.shape)
    return dequantize_int8_reference(qweight, scales)


def _check_scales(op: str, scales: torch.Tensor, out_f: int, in_f: int, *, grouped: bool = True,
                  name: str = "scales") -> None:
    check_floating(op, **{name: scales})
    groups_ok = scales.dim() == 2 and scales.shape[0] == out_f and scales.shape[1] >= 1 and in_f % scales.shape[1] == 0
    ok = scales.shape == (out_f,) or (grouped and groups_ok)
    if not ok:
        allowed = f"({out_f},) (per channel)"
        if grouped:
            allowed += f" or ({out_f}, G) with G dividing {in_f} (group-wise)"
        raise ValueError(f"{op}: expected {name} of shape {allowed}, got {tuple(scales.shape)}")


def _check_smooth(op: str, smooth: torch.Tensor | None, k: int, device: torch.device,
                  check_values: bool = True) -> None:
    if smooth is None:
        return
    check_floating(op, smooth=smooth)
    if smooth.shape != (k,):
        raise ValueError(f"{op}: expected smooth of shape ({k},) (one factor per input feature), "
                         f"got {tuple(smooth.shape)}")
    if smooth.device != device:
        raise ValueError(f"{op}: smooth on {smooth.device} but x on {device}")
    if check_values and not torch.compiler.is_compiling() and not (torch.isfinite(smooth).all() and (smooth > 0).all()):
        raise ValueError(f"{op}: smoothing factors must be finite and > 0")


def quantize_per_token(x: torch.Tensor, smooth: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric int8 quantization of each row (token) of x, after dividing by ``smooth``.

    x (..., K) float, smooth (K,) or None -> (xq int8 (..., K), sx float32 (...)) with
    sx = max_k |x/smooth| / 127 (1 for a zero row) and xq = round(x / smooth / sx) ∈ [-127, 127],
    so |xq·sx − x/smooth| ≤ sx/2.
    """
    check_floating("quantize_per_token", x=x)
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"quantize_per_token: expected x of shape (..., K) with K >= 1, got {tuple(x.shape)}")
    _check_smooth("quantize_per_token", smooth, x.shape[-1], x.device)
    return run("quantize_per_token", x.device, x, smooth)


def w8a8_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    w_scales: torch.Tensor,
    bias: torch.Tensor | None = None,
    smooth: torch.Tensor | None = None,
    *,
    check_values: bool = True,
) -> torch.Tensor:
    """W8A8 linear: per-token int8 activations (quantized on the fly) × per-channel int8 weights.

    x (..., in) float, qweight int8 (out, in), w_scales (out,) (from ``quantize_int8``; a weight
    smoothed as W·diag(smooth)), bias (out,) or None, smooth (in,) or None -> (..., out) in x's
    dtype: y = sx·w_scales·(xq·qweightᵀ) + bias with (xq, sx) = quantize_per_token(x, smooth).
    Not differentiable (the activation is rounded). ``check_values=False`` skips the check that
    the smoothing factors are finite and > 0 (two device→host reads) for callers that checked them
    once (fastlm.quant.W8A8Linear, at construction and load).
    """
    if smooth is None and _linear_inputs_ok(x, qweight, w_scales, bias, grouped=False) and qweight.shape[1]:
        return run("w8a8_linear", x.device, x, qweight, w_scales, bias, None)
    _check_w8a8_linear(x, qweight, w_scales, bias)
    _check_smooth("w8a8_linear", smooth, qweight.shape[1], x.device, check_values)
    return run("w8a8_linear", x.device, x, qweight, w_scales, bias, smooth)


def _check_w8a8_linear(x, qweight, w_scales, bias) -> None:
    """:func:`w8a8_linear`'s inputs but the smoothing factors, each fault named."""
    check_floating("w8a8_linear", x=x)
    check_ndim("w8a8_linear", qweight=(qweight, 2))
    check_dtype("w8a8_linear", qweight, torch.int8, "qweight")
    tensors = {"x": x, "qweight": qweight, "w_scales": w_scales}
    if bias is not None:
        tensors["bias"] = bias
    check_same_device("w8a8_linear", **tensors)
    out_f, in_f = qweight.shape
    if x.dim() == 0 or x.shape[-1] != in_f:
        raise ValueError(f"w8a8_linear: x has {x.shape[-1] if x.dim() else 0} input features, qweight expects {in_f}")
    if in_f == 0:
        raise ValueError("w8a8_linear: qweight has no input features")
    _check_scales("w8a8_linear", w_scales, out_f, in_f, grouped=False, name="w_scales")
    if bias is not None:
        check_floating("w8a8_linear", bias=bias)
        if bias.shape != (out_f,):
            raise ValueError(f"w8a8_linear: expected bias of shape ({out_f},), got {tuple(bias.shape)}")
