"""Triton adapters of the norms family (fastlm/ops/norms.py): kernels/norms.py as the ``triton``
backend of ``rms_norm`` and ``rms_norm_backward`` (layer_norm has the reference only).
A backward returns one tensor per differentiable argument: the gradient where ``needs[i]``,
else an empty tensor."""

from __future__ import annotations

import torch

from fastlm.ops.backend import kernel_module, register_kernel
from fastlm.ops.common import or_empty


@register_kernel("rms_norm", "triton")
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x (..., D), weight (D,) -> x·rsqrt(mean(x²) + eps)·weight (Llama's casts)."""
    return kernel_module("norms").rms_norm_forward(x, weight, eps)


@register_kernel("rms_norm_backward", "triton")
def rms_norm_backward(grad, x, weight, eps, needs) -> list[torch.Tensor]:
    """[dx, dw]: dx = r·(g − n·mean(g·n)) with g = dy·w, dw = Σ_rows dy·n."""
    dx, dw = kernel_module("norms").rms_norm_backward(grad, x, weight, eps, needs[0], needs[1])
    return or_empty([dx, dw], [x, weight])
