"""Triton adapter of the fused linear preference loss (fastlm/ops/preference.py): kernels/logprobs.py's
row kernels inside the shared pair-chunk driver, as the ``triton`` backend of
``linear_preference_loss`` and ``linear_preference_loss_backward``. The forward row kernel reads
the logits chunk (logp and lse per row), the gradient kernel turns it into
g·(onehot − softmax)/T in place: the chunk is read twice and written once, no second softmax
pass in a backward. Importing this module never imports triton (loaded on the first call)."""

from __future__ import annotations

import torch

from fastlm.ops.backend import kernel_module, register_kernel
from fastlm.ops.preference import PREFERENCE, PairSteps, preference_kernels

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check(z: torch.Tensor) -> None:
    if z.dtype not in _DTYPES:
        raise TypeError(f"{PREFERENCE} (triton): dtype {z.dtype} is not supported; expected one of "
                        f"{', '.join(map(str, _DTYPES))}")


def _logprobs_(z, tokens, logp, stat, temperature, ignore_index):
    _check(z)
    kernel_module("logprobs").logprobs_rows(z, tokens, logp[None], stat, temperature, ignore_index)  # stat ← lse


def _grad_(z, tokens, stat, g, temperature, ignore_index):
    kernel_module("logprobs").logprobs_grad_rows_(z, tokens, stat, None, g.contiguous(), None, temperature,
                                                  ignore_index)


STEPS = PairSteps(_logprobs_, _grad_)

_forward, _backward = preference_kernels(STEPS)
register_kernel(PREFERENCE, "triton")(_forward)
register_kernel(f"{PREFERENCE}_backward", "triton")(_backward)
