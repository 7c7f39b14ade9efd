"""Triton adapters of the int8 family (fastlm/ops/int8.py): kernels/int8.py as the ``triton``
backend of ``int8_linear`` (per-channel or group-wise scales dequantized in registers; a
decode path for <= 16 rows and a prefill path) and its backward (dx = dy·W), of
``quantize_per_token`` and of ``w8a8_linear``."""

from __future__ import annotations

import torch

from fastlm.ops.backend import kernel_module, register_kernel


_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_kernel_dtype(op: str, x: torch.Tensor) -> None:
    """The int8 kernels (triton and cuda) take float16/bfloat16/float32 activations."""
    if x.dtype not in _KERNEL_DTYPES:
        raise TypeError(f"{op}: the int8 kernels take float16/bfloat16/float32 inputs, got {x.dtype}")


@register_kernel("int8_linear", "triton")
def triton_int8_linear(x, qweight, scales, bias):
    """x (..., in), qweight int8 (out, in), scales (out,) or (out, G), bias (out,) -> (..., out)."""
    check_kernel_dtype("int8_linear", x)
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


@register_kernel("quantize_per_token", "triton")
def triton_quantize_per_token(x, smooth):
    check_kernel_dtype("quantize_per_token", x)
    xq, sx = kernel_module("int8").quantize_per_token(x.reshape(-1, x.shape[-1]), smooth)
    return xq.reshape(x.shape), sx.reshape(x.shape[:-1])


@register_kernel("w8a8_linear", "triton")
def triton_w8a8_linear(x, qweight, w_scales, bias, smooth):
    check_kernel_dtype("w8a8_linear", x)
    n, k = qweight.shape
    y = kernel_module("int8").w8a8_linear_forward(x.reshape(-1, k), qweight, w_scales, bias, smooth)
    return y.reshape(*x.shape[:-1], n)
