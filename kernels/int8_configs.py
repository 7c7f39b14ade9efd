"""Launch configuration of the int8 kernels (kernels/int8.py): the tile tables per arch and
activation kind, the interpreter's fixed tiles, the decode split-K choice and small launch helpers.
Host-side only (no @triton.jit here), so the kernels' compile cache is not touched by edits here.
This module imports nothing of fastlm."""

from __future__ import annotations

import functools

import torch
import triton

DECODE_MAX_ROWS = 16  # M at or below this takes the decode path
FUSED_QUANT_MAX_ROWS = 64  # W8A8: quantize inside the matmul up to this many rows

# Fixed tiles under the interpreter: small, BLOCK_K not dividing the test K on purpose.
INTERPRET_PREFILL = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2}
INTERPRET_DECODE = {"BLOCK_N": 16, "BLOCK_K": 32}
INTERPRET_DX = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32}
INTERPRET_QUANT = {"BLOCK_M": 4, "BLOCK_K": 32}

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for the prefill kernels on sm80/sm90, 16-bit
# activations. Untuned for speed until measured on a GPU; every config kept compiles for sm_80
# and sm_90 without register spills and within shared memory (scripts/compile_kernels.py).
_PREFILL_CONFIGS = [
    (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4),
    (64, 64, 64, 4, 4), (32, 64, 128, 4, 4), (16, 64, 128, 4, 4), (128, 128, 128, 8, 3),
]
# sm_80 (A100): 128×256 spills (4-732 B) and the 4-warp 128×64, 64×128 and 64×64 tiles spill with
# the bias, the group scales or the fused quantization (8-40 B); on 8 warps, 4 stages they do not.
_PREFILL_CONFIGS_SM80 = [
    (128, 128, 64, 8, 3), (64, 128, 64, 8, 4), (128, 64, 64, 8, 4), (64, 64, 64, 8, 4),
    (32, 64, 128, 4, 4), (16, 64, 128, 4, 4), (128, 128, 128, 8, 3),
]
# fp32 activations: the dot is fp32 FMA ("ieee", torch's default fp32 matmul precision), whose
# operand fragments live in registers: short K tiles (the 16-bit tiles spill 0.3-50 KB).
_PREFILL_CONFIGS_FP32 = [(64, 64, 16, 4, 3), (32, 64, 32, 4, 3), (128, 64, 16, 8, 3), (64, 128, 16, 8, 3),
                         (16, 64, 32, 4, 3)]
# (BLOCK_N, BLOCK_K, num_warps, num_stages) for the decode kernel (BLOCK_N ≥ 16: tl.dot's minimum).
_DECODE_CONFIGS = [
    (16, 256, 4, 3), (32, 128, 4, 3), (32, 256, 4, 3), (64, 128, 4, 3), (16, 512, 4, 2),
    (64, 64, 2, 4), (16, 512, 2, 3), (128, 64, 4, 4),
]
_DECODE_CONFIGS_FP32 = [(16, 64, 4, 3), (32, 32, 4, 3), (32, 64, 4, 3), (64, 32, 4, 3), (128, 32, 4, 3)]


def _prefill_table(kernel_name: str, kind: str, major: int = 9) -> list[tuple]:
    """The prefill configs of a kernel and activation kind ('16bit', 'fp32' or, for W8A8, 'fused':
    the in-GEMM quantization, used up to FUSED_QUANT_MAX_ROWS rows, so tiles of at most 64 rows)
    on a GPU of compute capability ``major``."""
    if kind == "fp32":
        return _PREFILL_CONFIGS_FP32
    table = _PREFILL_CONFIGS if major >= 9 else _PREFILL_CONFIGS_SM80
    if kind == "fused":
        table = [c for c in table if c[0] <= FUSED_QUANT_MAX_ROWS]
    return table


def _major(device: torch.device) -> int:
    """Major compute capability of the CUDA device the kernel launches on."""
    return torch.cuda.get_device_capability(device)[0]


def _kind(dtype: torch.dtype) -> str:
    return "fp32" if dtype == torch.float32 else "16bit"


def _m_bucket(m: int) -> int:
    return triton.next_power_of_2(max(int(m), 1))


def dot_precision(dtype: torch.dtype) -> str:
    """'ieee' for fp32 inputs when torch asks for full-precision fp32 matmuls, else 'tf32'."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


@functools.lru_cache(maxsize=None)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _split_k(n: int, k: int, block_n: int, block_k: int, device: torch.device) -> int:
    """Enough K splits to give the GPU ~2 programs per SM when N alone does not (decode)."""
    if device.type != "cuda":
        return 1
    programs = triton.cdiv(n, block_n)
    target = 2 * _num_sms(device.index if device.index is not None else torch.cuda.current_device())
    split = 1
    while programs * split * 2 <= target and split * 2 * block_k <= k // 2:
        split *= 2
    return split


def _scale_layout(scales: torch.Tensor, k: int) -> tuple[int, int, int]:
    """(GS, stride_sn, stride_sg): GS = 0 for per-channel scales (N,), else the group size."""
    if scales.dim() == 1 or scales.shape[1] == 1:
        return 0, scales.stride(0), 0
    return k // scales.shape[1], scales.stride(0), scales.stride(1)
