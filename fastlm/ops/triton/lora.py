"""Triton adapters of the LoRA family (fastlm/ops/lora.py): kernels/lora.py as the ``triton``
backend of ``lora_linear`` and its backward (W frozen: read in place, never copied, no gradient
unless it requires one), kernels/lora_sgmv.py as that of ``lora_linear_mixed`` and its backward."""

from __future__ import annotations

from fastlm.ops.backend import kernel_module, register_kernel
from fastlm.ops.common import or_empty


@register_kernel("lora_linear", "triton")
def triton_lora_linear(x, weight, lora_a, lora_b, scale, bias):
    """x (..., in), W (out, in), A (r, in), B (out, r), bias (out,) -> (..., out)."""
    return kernel_module("lora").lora_forward(x, weight, lora_a, lora_b, scale, bias)


@register_kernel("lora_linear_backward", "triton")
def triton_lora_linear_backward(grad, x, weight, lora_a, lora_b, scale, bias, needs):
    """[dx, dW, dA, dB, (dbias)] with G = s·dy·B: dx = dy·W + G·A, dA = Gᵀ·x, dB = s·dyᵀ·(x·Aᵀ)."""
    grads = kernel_module("lora").lora_backward(grad, x, weight, lora_a, lora_b, scale, bias, list(needs))
    return or_empty(grads, [x, weight, lora_a, lora_b, bias])


@register_kernel("lora_linear_mixed", "triton")
def triton_lora_linear_mixed(x, weight, lora_a, lora_b, scales, adapter_index, bias):
    return kernel_module("lora_sgmv").lora_mixed_forward(x, weight, lora_a, lora_b, scales, adapter_index, bias)


@register_kernel("lora_linear_mixed_backward", "triton")
def triton_lora_linear_mixed_backward(grad, x, weight, lora_a, lora_b, scales, adapter_index, bias, needs):
    grads = kernel_module("lora_sgmv").lora_mixed_backward(
        grad, x, weight, lora_a, lora_b, scales, adapter_index, bias, list(needs))
    return or_empty(grads, [x, weight, lora_a, lora_b, bias])
