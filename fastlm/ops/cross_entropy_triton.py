"""Old import path, kept for importers outside fastlm.ops: moved to fastlm.ops.triton.losses."""

from fastlm.ops.triton.losses import triton_cross_entropy, triton_cross_entropy_backward  # noqa: F401
