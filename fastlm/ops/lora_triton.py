"""Old import path, kept for importers outside fastlm.ops: moved to fastlm.ops.lora (ops) and fastlm.ops.triton.lora (kernels)."""

from fastlm.ops.lora import (  # noqa: F401
    lora_linear_mixed,
    lora_linear_mixed_reference,
    lora_linear_mixed_reference_backward,
)
