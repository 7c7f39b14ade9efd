"""The plain-PyTorch backward formula of every differentiable op, by op name:
``fastlm.ops.reference_backward.<op>_backward(grad, *op_args[, *forward_outputs])``, returning
the gradients of the op's differentiable arguments (None for an absent optional one), computed
in float32 (float64 for float64 inputs) and cast to each argument's dtype. Each is defined in
its op family file and collected here; they are the backward of the ``fastlm::<op>`` custom
ops on the reference backend and the oracle for kernel backwards.
"""

from __future__ import annotations

from fastlm.ops.activations import gelu_backward, swiglu_backward
from fastlm.ops.attn import attention_backward, attention_varlen_reference_backward as attention_varlen_backward
from fastlm.ops.int8 import int8_linear_backward
from fastlm.ops.lora import lora_linear_backward, lora_linear_mixed_reference_backward as lora_linear_mixed_backward
from fastlm.ops.losses import cross_entropy_backward
from fastlm.ops.norms import layer_norm_backward, rms_norm_backward
from fastlm.ops.rotary import rope_backward

__all__ = [
    "attention_backward", "attention_varlen_backward", "cross_entropy_backward", "gelu_backward",
    "int8_linear_backward", "layer_norm_backward", "lora_linear_backward", "lora_linear_mixed_backward",
    "rms_norm_backward", "rope_backward", "swiglu_backward",
]
