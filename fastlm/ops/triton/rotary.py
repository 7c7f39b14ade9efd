"""Triton adapters of the rotary family (fastlm/ops/rotary.py): kernels/rope.py as the ``triton``
backend of ``rope`` and ``rope_backward``, kernels/kv_append.py as that of ``rope_append_kv``."""

from __future__ import annotations

import torch

from fastlm.ops.backend import kernel_module, register_kernel


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


@register_kernel("rope_append_kv", "triton")
def rope_append_kv(q, k, v, positions, k_cache, v_cache, theta):
    q_out = kernel_module("kv_append").rope_append_kv(q, k, v, positions, k_cache, v_cache, theta)
    return q_out if theta is not None else q.new_empty((0,))
