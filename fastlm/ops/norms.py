"""Normalizations: ``rms_norm`` (Llama) and ``layer_norm`` (GPT-2), over the last dimension.

    rms_norm:   y = x / sqrt(mean(x², -1) + eps) · w
    layer_norm: y = (x - mean(x)) / sqrt(var(x) + eps) · w + b      (biased variance)

Kernels: kernels/norms.py (rms_norm forward and backward), adapted in fastlm/ops/triton/norms.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastlm.ops.checks import check_floating, check_last_dim, check_same_device
from fastlm.ops.common import wide
from fastlm.ops.registry import OpSpec, define_op, run

__all__ = ['rms_norm', 'layer_norm']


# ---- references ---------------------------------------------------------------------------------


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """y = x / sqrt(mean(x², -1) + eps) · weight, computed in float32 (Llama's convention:
    normalize in float32, cast to the input dtype, then scale by the weight)."""
    normed = F.rms_norm(wide(x), (x.shape[-1],), eps=eps)  # x·rsqrt(mean(x²) + eps)
    return weight * normed.to(x.dtype)


def layer_norm_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5
) -> torch.Tensor:
    """y = (x - mean) / sqrt(var + eps) · weight + bias over the last dim (biased variance)."""
    xf = wide(x)
    mean = xf.mean(dim=-1, keepdim=True)
    var = (xf - mean).pow(2).mean(dim=-1, keepdim=True)
    y = (xf - mean) * torch.rsqrt(var + eps) * wide(weight) + wide(bias)
    return y.to(x.dtype)


# ---- backward formulas --------------------------------------------------------------------------


def _sum_to(grad: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Sum a (..., D) gradient over its leading dims to the (D,) shape of a parameter."""
    return grad.reshape(-1, grad.shape[-1]).sum(dim=0).to(like.dtype)


def rms_norm_backward(grad, x, weight, eps):
    """With r = 1/sqrt(mean(x²) + eps), n = x·r, y = w·n:
    dw = Σ dy·n, dx = r·(g - n·mean(g·n)) where g = dy·w."""
    xf, dy = wide(x), wide(grad)
    r = torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    n = xf * r
    g = dy * wide(weight)
    dx = r * (g - n * (g * n).mean(dim=-1, keepdim=True))
    return dx.to(x.dtype), _sum_to(dy * n, weight)


def layer_norm_backward(grad, x, weight, bias, eps):
    """With n = (x - mean)·r, g = dy·w: dx = r·(g - mean(g) - n·mean(g·n)), dw = Σ dy·n, db = Σ dy."""
    xf, dy = wide(x), wide(grad)
    mean = xf.mean(dim=-1, keepdim=True)
    r = torch.rsqrt((xf - mean).pow(2).mean(dim=-1, keepdim=True) + eps)
    n = (xf - mean) * r
    g = dy * wide(weight)
    dx = r * (g - g.mean(dim=-1, keepdim=True) - n * (g * n).mean(dim=-1, keepdim=True))
    return dx.to(x.dtype), _sum_to(dy * n, weight), _sum_to(dy, bias)


# ---- the reference backend's eager path -----------------------------------------------------------


class _RMSNorm(torch.autograd.Function):
    """rms_norm in one dtype (float32 or float64 x and weight): the reference's forward
    operations, and a backward of 7 operations (autograd through the forward takes 15):
    with r = rsqrt(mean(x²) + eps), n = x·r, g = dy·w,
    dx = r·(g − n·mean(g·n)) and dw = Σ_rows dy·n. Once differentiable (as attention's fused
    CPU kernel; the kernel backends' backwards are too)."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        r = x.pow(2).mean(dim=-1, keepdim=True).add_(eps).rsqrt_()  # (..., 1)
        n = x * r
        ctx.save_for_backward(n, r, weight)
        return weight * n

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        n, r, weight = ctx.saved_tensors
        dx = dw = None
        if ctx.needs_input_grad[0]:
            g = dy * weight
            dx = torch.addcmul(g, n, (g * n).mean(dim=-1, keepdim=True), value=-1.0).mul_(r)
        if ctx.needs_input_grad[1]:
            dw = (dy * n).reshape(-1, n.shape[-1]).sum(dim=0)
        return dx, dw, None


def rms_norm_eager(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """What the reference backend runs: :func:`rms_norm_reference`'s forward (the same
    operations, the same values) with the lean backward of :class:`_RMSNorm` when a gradient is
    needed and x and weight share a float32/float64 dtype; otherwise (no gradient, bf16/fp16 or
    mixed dtypes, torch.compile) :func:`rms_norm_reference` itself."""
    if (torch.compiler.is_compiling() or not torch.is_grad_enabled() or x.dtype != weight.dtype
            or x.dtype not in (torch.float32, torch.float64) or not (x.requires_grad or weight.requires_grad)):
        return rms_norm_reference(x, weight, eps)
    return _RMSNorm.apply(x, weight, eps)


def layer_norm_eager(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """What the reference backend runs: :func:`layer_norm_reference`'s result through PyTorch's
    fused ``F.layer_norm`` (one kernel forward, one backward, instead of ~9 and ~20 passes) when
    x, weight and bias share a float32/float64 dtype; otherwise the reference itself."""
    if x.dtype in (torch.float32, torch.float64) and weight.dtype == x.dtype and bias.dtype == x.dtype:
        return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    return layer_norm_reference(x, weight, bias, eps)


# ---- specs --------------------------------------------------------------------------------------


def _promoted(*tensors: torch.Tensor) -> torch.dtype:
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


define_op(OpSpec(
    "rms_norm",
    "Tensor x, Tensor weight, float eps",
    "Tensor",
    lambda x, w, eps: torch.empty_like(x, dtype=_promoted(x, w)),
    differentiable=(0, 1),
    reference_fn=rms_norm_reference,
    reference_backward_fn=rms_norm_backward,
    reference_eager=rms_norm_eager,
))
define_op(OpSpec(
    "layer_norm",
    "Tensor x, Tensor weight, Tensor bias, float eps",
    "Tensor",
    lambda x, w, b, eps: torch.empty_like(x),
    differentiable=(0, 1, 2),
    reference_fn=layer_norm_reference,
    reference_backward_fn=layer_norm_backward,
    reference_eager=layer_norm_eager,
))


# ---- public functions ---------------------------------------------------------------------------


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """y = x / sqrt(mean(x², -1) + eps) · weight.  x (..., D), weight (D,) -> (..., D)."""
    check_floating("rms_norm", x=x, weight=weight)
    check_same_device("rms_norm", x=x, weight=weight)
    check_last_dim("rms_norm", x, weight=weight)
    return run("rms_norm", x.device, x, weight, float(eps))


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """y = (x - mean) / sqrt(var + eps) · weight + bias.  x (..., D), weight/bias (D,)."""
    check_floating("layer_norm", x=x, weight=weight, bias=bias)
    check_same_device("layer_norm", x=x, weight=weight, bias=bias)
    check_last_dim("layer_norm", x, weight=weight, bias=bias)
    return run("layer_norm", x.device, x, weight, bias, float(eps))
