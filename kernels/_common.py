"""Small Triton helpers shared by the kernel modules (imports nothing of fastlm)."""

import triton
import triton.language as tl


@triton.jit
def cast_rne(x, DTYPE: tl.constexpr):
    """x.to(DTYPE), rounding float32 → bfloat16 to nearest even on the bits: the same result as
    the GPU's cvt.rn, which the Triton interpreter's own cast (truncation) does not give."""
    if DTYPE == tl.bfloat16 and x.dtype == tl.float32:
        bits = x.to(tl.uint32, bitcast=True)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        x = bits.to(tl.float32, bitcast=True)
    return x.to(DTYPE)
