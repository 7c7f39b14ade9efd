"""Triton kernels for the training ops: RMSNorm, RoPE and SwiGLU, forward and backward.

Importing this module registers them as the ``triton`` backend of ``rms_norm``, ``rope`` and
``swiglu`` and of their ``<op>_backward`` companions (the signatures fastlm.ops.registry calls).
It never imports triton itself: each kernel module (fastlm.kernels.norms, .rope, .swiglu,
.cross_entropy) is imported on the first call, so that ``import fastlm`` stays free of triton
and tests can set ``TRITON_INTERPRET=1`` first.

A backward kernel returns one tensor per differentiable argument: the gradient where
``needs[i]``, else an empty tensor (and the kernel skips that gradient's work).
"""

from __future__ import annotations

import torch

from fastlm.ops.backend import kernel_module, register_kernel


def _or_empty(grad: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return grad if grad is not None else like.new_empty((0,))


@register_kernel("rms_norm", "triton")
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x (..., D), weight (D,) -> x·rsqrt(mean(x²) + eps)·weight (Llama's casts)."""
    return kernel_module("norms").rms_norm_forward(x, weight, eps)


@register_kernel("rms_norm_backward", "triton")
def rms_norm_backward(grad, x, weight, eps, needs) -> list[torch.Tensor]:
    """[dx, dw]: dx = r·(g − n·mean(g·n)) with g = dy·w, dw = Σ_rows dy·n."""
    dx, dw = kernel_module("norms").rms_norm_backward(grad, x, weight, eps, needs[0], needs[1])
    return [_or_empty(dx, x), _or_empty(dw, weight)]


@register_kernel("rope", "triton")
def rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """x (B, H, T, D), positions (T,) or (B, T) -> [x1·cos − x2·sin, x2·cos + x1·sin]."""
    return kernel_module("rope").rope_forward(x, positions, theta)


@register_kernel("rope_backward", "triton")
def rope_backward(grad, x, positions, theta, needs) -> list[torch.Tensor]:
    """[dx]: the inverse rotation of dy (rotation by −angle)."""
    if not needs[0]:
        return [x.new_empty((0,))]
    return [kernel_module("rope").rope_backward(grad, x, positions, theta)]


@register_kernel("swiglu", "triton")
def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up (..., F) -> silu(gate)·up."""
    return kernel_module("swiglu").swiglu_forward(gate, up)


@register_kernel("swiglu_backward", "triton")
def swiglu_backward(grad, gate, up, needs) -> list[torch.Tensor]:
    """[d gate, d up] = [dy·u·σ(g)·(1 + g·(1 − σ(g))), dy·g·σ(g)]."""
    dg, du = kernel_module("swiglu").swiglu_backward(grad, gate, up, needs[0], needs[1])
    return [_or_empty(dg, gate), _or_empty(du, up)]
