"""C++/CUDA adapters of the int8 family (fastlm/ops/int8.py): csrc/int8.cu (per-token
quantization, cuBLASLt int8 GEMM through ``at::_int_mm``, fused dequantize epilogue) as the
``cuda`` backend of ``quantize_per_token`` and ``w8a8_linear``. The extension is loaded (and
JIT-built when needed) on the first call."""

from __future__ import annotations

from fastlm.ops.backend import register_kernel
from fastlm.ops.triton.int8 import check_kernel_dtype


def _extension():
    from fastlm._extension import load_extension  # the JIT build happens here, on first use

    return load_extension()


@register_kernel("quantize_per_token", "cuda")
def cuda_quantize_per_token(x, smooth):
    check_kernel_dtype("quantize_per_token", x)
    k = x.shape[-1]
    s = None if smooth is None else smooth.float().contiguous()
    xq, sx = _extension().quantize_per_token(x.reshape(-1, k).contiguous(), s)
    return xq.reshape(x.shape), sx.reshape(x.shape[:-1])


@register_kernel("w8a8_linear", "cuda")
def cuda_w8a8_linear(x, qweight, w_scales, bias, smooth):
    check_kernel_dtype("w8a8_linear", x)
    n, k = qweight.shape
    s = None if smooth is None else smooth.float().contiguous()
    b = None if bias is None else bias.to(x.dtype).contiguous()
    y = _extension().w8a8_linear(x.reshape(-1, k).contiguous(), qweight.contiguous(),
                                 w_scales.float().contiguous(), b, s)
    return y.reshape(*x.shape[:-1], n)
