"""Old import path, kept for importers outside fastlm.ops: moved to fastlm.ops.triton.decode."""

from fastlm.ops.triton.decode import decode_attention, decode_attention_paged  # noqa: F401
