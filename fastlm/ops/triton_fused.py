"""Old import path, kept for importers outside fastlm.ops: the norm, rope and SwiGLU kernels moved to fastlm.ops.triton.{norms,rotary,activations}
(registered when fastlm.ops is imported)."""

import fastlm.ops.triton  # noqa: F401
