"""Old import path, kept for importers outside fastlm.ops: moved to fastlm.ops.int8 (ops) and fastlm.ops.triton.int8 / fastlm.ops.cuda.int8 (kernels)."""

from fastlm.ops.int8 import (  # noqa: F401
    dequantize_int8,
    int_mm,
    quantize_per_token,
    quantize_per_token_reference,
    w8a8_linear,
    w8a8_linear_reference,
)
