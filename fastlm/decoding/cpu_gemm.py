"""fastlm's skinny float32 GEMM for the CPU decode step (csrc/cpu/skinny_gemm.cpp): y (M, N) =
x (M, K) · Wᵀ + bias for a few rows M, over a weight packed once into 16-column panels.

A decode step multiplies the batch's few rows by every weight of the model, so its GEMMs are
bound by streaming the weights, not by arithmetic. MKL's and oneDNN's GEMMs reach a third to
a half of what this CPU can stream at these shapes; the kernel reads each pair of panels once,
front to back, while up to 8 rows accumulate in AVX-512 registers. One sweep of every linear
of a decode step, in order, float32, one thread (AMD EPYC, this project's CPU;
bench/bench_decode_gemm.py has the table).

The kernel needs AVX-512 (ATen's CPU capability "AVX512") and a C++ compiler: it is built
on first use with ``torch.utils.cpp_extension`` (~10 s, cached across processes in torch's
extension directory) and registered as ``torch.ops.fastlm_cpu.pack_weight`` /
``torch.ops.fastlm_cpu.skinny_linear``. Where it cannot be built or run, :func:`status` says
why and decoding keeps to MKL's or oneDNN's packed GEMM. ``FASTLM_CPU_KERNELS=0`` switches it off.
"""

from __future__ import annotations

import functools
import logging
import os
import subprocess
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).resolve().parent.parent.parent / "csrc" / "cpu" / "skinny_gemm.cpp"
ENV_VAR = "FASTLM_CPU_KERNELS"
#: rows up to which the kernel beats oneDNN's packed GEMM on this project's CPU (one sweep of a
#: 4M-parameter model's linears: 8 rows 2.0x, 16 rows 1.2x, 32 rows 1.03x: not worth a pack)
MAX_ROWS = 16
_FLAGS = ["-O3", "-mavx512f", "-mfma"]


def status() -> tuple[bool, str]:
    """(usable, why): whether :func:`skinny_linear` runs here; builds the kernel on first call."""
    if os.environ.get(ENV_VAR, "").strip().lower() in ("0", "false", "no", "off"):
        return False, f"switched off by {ENV_VAR}={os.environ[ENV_VAR]}"
    capability = torch.backends.cpu.get_cpu_capability()
    if capability != "AVX512":
        return False, f"the kernel needs AVX-512; this CPU's ATen capability is {capability}"
    return _build(SOURCE)


@functools.lru_cache(maxsize=None)
def _build(source: Path) -> tuple[bool, str]:
    if not source.is_file():
        return False, f"its source {source} is not there (an install without csrc/)"
    from torch.utils import cpp_extension

    logger.info("building fastlm's CPU GEMM from %s (first use; cached afterwards)", source)
    try:
        cpp_extension.load("fastlm_cpu_gemm", [str(source)], extra_cflags=_FLAGS, is_python_module=False)
    except (RuntimeError, OSError, subprocess.CalledProcessError, ImportError) as err:
        logger.warning("fastlm's CPU GEMM could not be built (%s); decoding uses oneDNN/MKL", err)
        return False, f"the build failed: {err}"
    torch.library.register_fake("fastlm_cpu::pack_weight")(_pack_weight_fake)
    torch.library.register_fake("fastlm_cpu::skinny_linear")(_skinny_linear_fake)
    return True, "built"


def _pack_weight_fake(weight):
    return weight.new_empty(((weight.shape[0] + 15) // 16, weight.shape[1], 16))


def _skinny_linear_fake(x, packed, n, bias):
    return x.new_empty((x.shape[0], n))


def available() -> bool:
    """Whether the kernel runs here (building it on first call)."""
    return status()[0]


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """weight (N, K) float32 -> its panels (ceil(N/16), K, 16), columns past N zero."""
    return torch.ops.fastlm_cpu.pack_weight(weight)


def skinny_linear(x: torch.Tensor, packed: torch.Tensor, n: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (M, K) float32 · Wᵀ (+ bias (N,)) -> (M, N), W given as :func:`pack_weight`'s panels."""
    return torch.ops.fastlm_cpu.skinny_linear(x, packed, n, bias)
