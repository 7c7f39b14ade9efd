"""Triton adapter of the sampling family (fastlm/ops/sampling.py): kernels/sampling.py as the
``triton`` backend of ``sample``."""

from __future__ import annotations

from fastlm.ops.backend import kernel_module, register_kernel


@register_kernel("sample", "triton")
def _sample_triton(logits, uniform, temperature, top_k, top_p, min_p):
    """The Triton kernel (fastlm.kernels.sampling), imported on first use."""
    return kernel_module("sampling").sample(logits, uniform, temperature, top_k, top_p, min_p)
