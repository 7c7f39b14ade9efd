"""fastlm.ops: one public function per op, checked, then dispatched to a backend.

Each op family lives in one file, ``fastlm/ops/<family>.py``: the op's spec (custom-op schema,
fake, differentiable arguments), its reference, its backward formula and its public function.
Kernel adapters live in ``fastlm/ops/triton/<family>.py`` and ``fastlm/ops/cuda/<family>.py``
next to ``kernels/<family>.py`` and ``csrc/<family>.cu``; ``fastlm/ops/registry.py`` is the one
registration mechanism (``define_op``, ``run``) and ``fastlm/ops/backend.py`` picks the backend.
See fastlm/ops/README.md for the layout and what adding an op touches.
"""

from __future__ import annotations

from fastlm.ops import reference  # noqa: F401  (public: fastlm.ops.reference, the oracle)
from fastlm.ops.activations import gelu, swiglu
from fastlm.ops.attn import attention, attention_varlen
from fastlm.ops.decode import decode_attention, decode_attention_paged
from fastlm.ops.fused_loss import fused_linear_cross_entropy
from fastlm.ops.int8 import dequantize_int8, int8_linear, quantize_int8, quantize_per_token, w8a8_linear
from fastlm.ops.lora import lora_linear, lora_linear_mixed
from fastlm.ops.logprobs import linear_distillation_loss, linear_logprobs
from fastlm.ops.losses import cross_entropy
from fastlm.ops.norms import layer_norm, rms_norm
from fastlm.ops.preference import PreferenceLoss, linear_preference_loss
from fastlm.ops.rotary import rope, rope_append_kv
from fastlm.ops.sampling import DeferredChecks, sample
from fastlm.ops import cuda as _cuda_adapters, triton as _triton_adapters  # noqa: F401  (register the kernels)
from fastlm.ops.backend import (
    BACKENDS,
    BackendUnavailableError,
    available_backends,
    backend_status,
    register_kernel,
    use_backend,
)
from fastlm.ops.checks import (  # noqa: F401
    check_dtype,
    check_floating,
    check_last_dim,
    check_ndim,
    check_same_device,
    check_same_dtype,
    check_window_softcap,
)

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "PreferenceLoss",
    "DeferredChecks",
    "attention",
    "attention_varlen",
    "available_backends",
    "backend_status",
    "cross_entropy",
    "decode_attention",
    "decode_attention_paged",
    "dequantize_int8",
    "fused_linear_cross_entropy",
    "gelu",
    "int8_linear",
    "layer_norm",
    "linear_distillation_loss",
    "linear_logprobs",
    "linear_preference_loss",
    "lora_linear",
    "lora_linear_mixed",
    "quantize_int8",
    "quantize_per_token",
    "register_kernel",
    "rms_norm",
    "rope",
    "rope_append_kv",
    "sample",
    "swiglu",
    "use_backend",
    "w8a8_linear",
]
