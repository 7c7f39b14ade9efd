"""The plain-PyTorch reference of every fastlm op, by op name: ``fastlm.ops.reference.<op>``.

These are the CPU fallback and the oracle the kernels are tested against; each is defined in
its op family file (``fastlm/ops/<family>.py``) and collected here. They favour clarity over
speed, take softmaxes in float32 and cast results back to the input dtype. Inputs are assumed
valid; the public functions in ``fastlm.ops`` check them before dispatching.
"""

from __future__ import annotations

from fastlm.ops.activations import gelu_reference as gelu, swiglu_reference as swiglu
from fastlm.ops.attn import (
    _attention_core,
    attention_forward,
    attention_mask,
    attention_reference as attention,
    attention_varlen_reference as attention_varlen,
    softcap_scores,
)
from fastlm.ops.common import wide
from fastlm.ops.decode import decode_attention_paged_reference as decode_attention_paged
from fastlm.ops.decode import decode_attention_reference as decode_attention
from fastlm.ops.int8 import (
    dequantize_int8_reference as dequantize_int8,
    int8_linear_reference as int8_linear,
    quantize_int8_reference as quantize_int8,
    quantize_per_token_reference as quantize_per_token,
    w8a8_linear_reference as w8a8_linear,
)
from fastlm.ops.lora import lora_linear_mixed_reference as lora_linear_mixed, lora_linear_reference as lora_linear
from fastlm.ops.losses import CROSS_ENTROPY_CHUNK, cross_entropy_reference as cross_entropy
from fastlm.ops.norms import layer_norm_reference as layer_norm, rms_norm_reference as rms_norm
from fastlm.ops.rotary import (
    _inv_freq,
    rope_append_kv_reference as rope_append_kv,
    rope_cos_sin,
    rope_reference as rope,
    rotate_half,
)
from fastlm.ops.sampling import filtered_probs, sample_reference as sample

__all__ = [
    "attention", "attention_forward", "attention_mask", "attention_varlen", "cross_entropy", "decode_attention",
    "decode_attention_paged", "dequantize_int8", "filtered_probs", "gelu", "int8_linear", "layer_norm", "lora_linear",
    "lora_linear_mixed", "quantize_int8", "quantize_per_token", "rms_norm", "rope", "rope_append_kv", "rope_cos_sin",
    "rotate_half", "sample", "softcap_scores", "swiglu", "w8a8_linear", "wide",
]
_ = (_attention_core, _inv_freq, CROSS_ENTROPY_CHUNK)  # re-exported for tests that use them


def __getattr__(name: str):
    """fastlm.ops.reference.<op> for an op defined with define_op and not listed above: its
    spec's reference (so a new op needs no line here)."""
    from fastlm.ops.registry import _DEFINED

    if name in _DEFINED:
        return _DEFINED[name].spec.reference
    raise AttributeError(f"module 'fastlm.ops.reference' has no attribute {name!r}")
