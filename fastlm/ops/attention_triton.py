"""Old import path, kept for importers outside fastlm.ops: moved to fastlm.ops.attn (op) and fastlm.ops.triton.attn (kernels)."""

from fastlm.ops.attn import attention_varlen, attention_varlen_reference  # noqa: F401
from fastlm.ops.triton.attn import deterministic_backward, kernel_modules  # noqa: F401
