"""Triton adapters of the attention family (fastlm/ops/attn.py): the FlashAttention-2-style
kernels of kernels/attention.py (forward) and kernels/attention_bwd.py (backward) as the
``triton`` backend of ``attention``, ``attention_varlen`` and their backward ops (dense batches,
causal bottom-right, GQA/MQA, key_lens padding, sliding window, logit soft-cap, D <= 256,
fp16/bf16/fp32). Triton is imported on the first kernel call, never on import.

Deterministic backward: with ``FASTLM_DETERMINISTIC=1`` in the environment or
``torch.use_deterministic_algorithms(True)``, the backward never uses atomics, so two runs give
bit-identical gradients. Otherwise GQA/MQA problems that would underfill the GPU may split
dK/dV over query heads and sum them with fp32 atomics (non-deterministic order).
"""

from __future__ import annotations

import os
from types import ModuleType

import torch

from fastlm.ops.backend import kernel_module, register_kernel

DETERMINISTIC_ENV = "FASTLM_DETERMINISTIC"


def deterministic_backward() -> bool:
    """True if the backward must be bit-reproducible: ``FASTLM_DETERMINISTIC=1`` or
    ``torch.are_deterministic_algorithms_enabled()``."""
    flag = os.environ.get(DETERMINISTIC_ENV, "0").strip().lower() in ("1", "true", "yes", "on")
    return flag or torch.are_deterministic_algorithms_enabled()


def kernel_modules() -> tuple[ModuleType, ModuleType]:
    """(fastlm.kernels.attention, fastlm.kernels.attention_bwd): forward and backward launchers.
    The forward module is loaded first: the backward one imports its helpers from it."""
    return kernel_module("attention"), kernel_module("attention_bwd")


def triton_attention(q, k, v, causal, scale, key_lens, window, softcap):
    """(out, lse) of ``fastlm::attention`` on the triton backend."""
    return kernel_modules()[0].attention_forward(q, k, v, causal, scale, key_lens, window, softcap)


def triton_attention_backward(grad, q, k, v, causal, scale, key_lens, window, softcap, out, lse, needs):
    """[dq, dk, dv] of ``fastlm::attention_backward``: an empty tensor where ``needs`` is False."""
    grads = kernel_modules()[1].attention_backward(
        grad, q, k, v, causal, scale, key_lens, out, lse, needs, window=window, softcap=softcap,
        deterministic=deterministic_backward())
    return list(grads)


def triton_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale,
                            window, softcap):
    return kernel_modules()[0].attention_varlen_forward(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, window, softcap)


def triton_attention_varlen_backward(
    grad, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, window, softcap, out, lse,
    needs
):
    grads = kernel_modules()[1].attention_varlen_backward(
        grad, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, out, lse, needs,
        window=window, softcap=softcap, deterministic=deterministic_backward())
    return list(grads)


TRITON_KERNELS = {
    ("attention", "triton"): triton_attention,
    ("attention_backward", "triton"): triton_attention_backward,
    ("attention_varlen", "triton"): triton_attention_varlen,
    ("attention_varlen_backward", "triton"): triton_attention_varlen_backward,
}


def register_kernels() -> None:
    """Register the kernels above (done on import; idempotent)."""
    for (op, backend), fn in TRITON_KERNELS.items():
        register_kernel(op, backend)(fn)


register_kernels()
