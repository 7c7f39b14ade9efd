"""Int8 ops: weight-only int8 linear on the triton backend, W8A8 linear and per-token quantization.

Importing this module

- registers the Triton kernels of ``fastlm.kernels.int8`` as the ``triton`` backend of
  ``int8_linear`` (per-channel or group-wise scales, dequantized in registers; a decode path for
  ≤ 16 rows and a prefill path) and of ``int8_linear_backward`` (dx = dy·W; the int8 weight is
  frozen);
- declares ``fastlm::quantize_per_token`` and ``fastlm::w8a8_linear`` with plain-PyTorch
  references (on CPU the int8 GEMM is PyTorch's own ``torch._int_mm``), Triton kernels and,
  for CUDA tensors, the C++/CUDA extension's kernels (csrc/int8.cu: quantize, cuBLASLt int8 GEMM
  through ``at::_int_mm``, fused dequantize epilogue);
- defines the public functions :func:`quantize_per_token`, :func:`w8a8_linear` and
  :func:`dequantize_int8`.

W8A8 (SmoothQuant's O1 scheme, dynamic per-token activations, per-channel weights), with
optional smoothing factors c (in,): the weight was quantized as W·diag(c), the activation is
divided by c before quantization, so x·Wᵀ = (x·diag(c)⁻¹)·(W·diag(c))ᵀ::

    sx[m] = max_k |x[m, k] / c[k]| / 127 (1 for a zero row),  xq = round(x / c / sx) ∈ [-127, 127]
    y[m, n] = sx[m] · sw[n] · Σ_k xq[m, k] · qweight[n, k] + bias[n]

Triton is imported lazily, on the first kernel call: importing this module never imports it.
"""

from __future__ import annotations

import torch

from fastlm.ops import reference
from fastlm.ops.backend import kernel_module, register_kernel
from fastlm.ops.checks import check_dtype, check_floating, check_ndim, check_same_device
from fastlm.ops.registry import OpSpec, define_op, run

__all__ = [
    "dequantize_int8",
    "int_mm",
    "quantize_per_token",
    "quantize_per_token_reference",
    "w8a8_linear",
    "w8a8_linear_reference",
]

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def dequantize_int8(qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """W = qweight·scales: qweight int8 (out, in), scales (out,) or (out, G) -> (out, in) float32."""
    check_ndim("dequantize_int8", qweight=(qweight, 2))
    check_dtype("dequantize_int8", qweight, torch.int8, "qweight")
    _check_scales("dequantize_int8", scales, *qweight.shape)
    return reference.dequantize_int8(qweight, scales)


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


def _kernel_dtype(op: str, x: torch.Tensor) -> None:
    if x.dtype not in _KERNEL_DTYPES:
        raise TypeError(f"{op}: the int8 kernels take float16/bfloat16/float32 inputs, got {x.dtype}")


# ---- fastlm::int8_linear on the triton backend --------------------------------------------------


@register_kernel("int8_linear", "triton")
def triton_int8_linear(x, qweight, scales, bias):
    """x (..., in), qweight int8 (out, in), scales (out,) or (out, G), bias (out,) -> (..., out)."""
    _kernel_dtype("int8_linear", x)
    out_f, in_f = qweight.shape
    y = kernel_module("int8").int8_linear_forward(x.reshape(-1, in_f), qweight, scales, bias)
    return y.reshape(*x.shape[:-1], out_f)


@register_kernel("int8_linear_backward", "triton")
def triton_int8_linear_backward(grad, x, qweight, scales, bias, needs):
    """[dx, (dbias)]: dx = dy·W with W dequantized in registers, dbias = Σ dy."""
    out_f, in_f = qweight.shape
    dy = grad.reshape(-1, out_f)
    if needs[0]:
        dx = kernel_module("int8").int8_linear_dx(dy, qweight, scales).reshape(x.shape).to(x.dtype)
    else:
        dx = x.new_empty((0,))
    grads = [dx]
    if bias is not None:
        grads.append(dy.float().sum(dim=0).to(bias.dtype) if needs[1] else bias.new_empty((0,)))
    return grads


# ---- references ---------------------------------------------------------------------------------


def quantize_per_token_reference(x: torch.Tensor, smooth: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., K), smooth (K,) or None -> (xq int8 (..., K), sx float32 (...)), computed in float32:
    xs = x / smooth, sx = max|xs| / 127 (1 for a zero row), xq = round(xs / sx) (ties to even)."""
    xs = x.float()
    if smooth is not None:
        xs = xs / smooth.float()
    amax = xs.abs().amax(dim=-1)
    sx = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
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


QUANTIZE_PER_TOKEN_SPEC = OpSpec(
    "quantize_per_token",
    "Tensor x, Tensor? smooth",
    "(Tensor, Tensor)",
    lambda x, smooth: (torch.empty_like(x, dtype=torch.int8), x.new_empty(x.shape[:-1], dtype=torch.float32)),
    reference_fn=quantize_per_token_reference,
)
W8A8_LINEAR_SPEC = OpSpec(
    "w8a8_linear",
    "Tensor x, Tensor qweight, Tensor w_scales, Tensor? bias, Tensor? smooth",
    "Tensor",
    lambda x, q, ws, bias, smooth: x.new_empty((*x.shape[:-1], q.shape[0])),
    reference_fn=w8a8_linear_reference,
)
define_op(QUANTIZE_PER_TOKEN_SPEC)
define_op(W8A8_LINEAR_SPEC)


# ---- triton kernels -----------------------------------------------------------------------------


@register_kernel("quantize_per_token", "triton")
def triton_quantize_per_token(x, smooth):
    _kernel_dtype("quantize_per_token", x)
    xq, sx = kernel_module("int8").quantize_per_token(x.reshape(-1, x.shape[-1]), smooth)
    return xq.reshape(x.shape), sx.reshape(x.shape[:-1])


@register_kernel("w8a8_linear", "triton")
def triton_w8a8_linear(x, qweight, w_scales, bias, smooth):
    _kernel_dtype("w8a8_linear", x)
    n, k = qweight.shape
    y = kernel_module("int8").w8a8_linear_forward(x.reshape(-1, k), qweight, w_scales, bias, smooth)
    return y.reshape(*x.shape[:-1], n)


# ---- C++/CUDA kernels (csrc/int8.cu) ------------------------------------------------------------


def _extension():
    from fastlm._extension import load_extension  # the JIT build happens here, on first use

    return load_extension()


@register_kernel("quantize_per_token", "cuda")
def cuda_quantize_per_token(x, smooth):
    _kernel_dtype("quantize_per_token", x)
    k = x.shape[-1]
    s = None if smooth is None else smooth.float().contiguous()
    xq, sx = _extension().quantize_per_token(x.reshape(-1, k).contiguous(), s)
    return xq.reshape(x.shape), sx.reshape(x.shape[:-1])


@register_kernel("w8a8_linear", "cuda")
def cuda_w8a8_linear(x, qweight, w_scales, bias, smooth):
    _kernel_dtype("w8a8_linear", x)
    n, k = qweight.shape
    s = None if smooth is None else smooth.float().contiguous()
    b = None if bias is None else bias.to(x.dtype).contiguous()
    y = _extension().w8a8_linear(x.reshape(-1, k).contiguous(), qweight.contiguous(),
                                 w_scales.float().contiguous(), b, s)
    return y.reshape(*x.shape[:-1], n)


# ---- public functions ---------------------------------------------------------------------------


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
    _check_smooth("w8a8_linear", smooth, in_f, x.device, check_values)
    return run("w8a8_linear", x.device, x, qweight, w_scales, bias, smooth)
