"""Triton adapter of the fused linear log-probs / distillation family (fastlm/ops/logprobs.py):
kernels/logprobs.py's row kernels, run inside the shared chunk drivers, as the ``triton``
backend of ``linear_logprobs``, ``linear_logprobs_backward``, ``linear_distillation_loss`` and
``linear_distillation_loss_backward``. Importing this module never imports triton: the kernel
module is loaded on its first call."""

from __future__ import annotations

import torch

from fastlm.ops.backend import kernel_module, register_kernel
from fastlm.ops.logprobs import DISTILL, LOGPROBS, RowSteps, distill_kernels, logprobs_kernels

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check(name: str, z: torch.Tensor) -> None:
    if z.dtype not in _DTYPES:
        raise TypeError(f"{name} (triton): dtype {z.dtype} is not supported; expected one of "
                        f"{', '.join(map(str, _DTYPES))}")


def _logprobs(z, tokens, out, lse, temperature, ignore_index):
    _check(LOGPROBS, z)
    kernel_module("logprobs").logprobs_rows(z, tokens, out, lse, temperature, ignore_index)


def _logprobs_grad_(z, tokens, lse, entropy, g, e, temperature, ignore_index):
    _check(LOGPROBS, z)
    g = g.contiguous()  # autograd may hand an expanded (stride 0) grad
    e = None if e is None else e.contiguous()
    kernel_module("logprobs").logprobs_grad_rows_(z, tokens, lse, entropy, g, e, temperature, ignore_index)


def _distill_(zs, zt, labels, loss_rows, scale, temperature, divergence, jsd_beta, alpha, ignore_index, compute_grad):
    _check(DISTILL, zs)
    _check(DISTILL, zt)
    kernel_module("logprobs").distill_rows_(zs, zt, labels, loss_rows, scale, temperature, divergence, jsd_beta,
                                            alpha, ignore_index, compute_grad)


STEPS = RowSteps(_logprobs, _logprobs_grad_, _distill_)

_lp_forward, _lp_backward = logprobs_kernels(STEPS)
_kd_forward, _kd_backward = distill_kernels(STEPS)
register_kernel(LOGPROBS, "triton")(_lp_forward)
register_kernel(f"{LOGPROBS}_backward", "triton")(_lp_backward)
register_kernel(DISTILL, "triton")(_kd_forward)
register_kernel(f"{DISTILL}_backward", "triton")(_kd_backward)
