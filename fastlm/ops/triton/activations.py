"""Triton adapters of the activations family (fastlm/ops/activations.py): kernels/swiglu.py as
the ``triton`` backend of ``swiglu`` and ``swiglu_backward`` (gelu has the reference only)."""

from __future__ import annotations

import torch

from fastlm.ops.backend import kernel_module, register_kernel
from fastlm.ops.common import or_empty


@register_kernel("swiglu", "triton")
def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up (..., F) -> silu(gate)·up."""
    return kernel_module("swiglu").swiglu_forward(gate, up)


@register_kernel("swiglu_backward", "triton")
def swiglu_backward(grad, gate, up, needs) -> list[torch.Tensor]:
    """[d gate, d up] = [dy·u·σ(g)·(1 + g·(1 − σ(g))), dy·g·σ(g)]."""
    dg, du = kernel_module("swiglu").swiglu_backward(grad, gate, up, needs[0], needs[1])
    return or_empty([dg, du], [gate, up])
