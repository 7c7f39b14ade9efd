"""Old import path, kept for importers outside fastlm.ops: moved to fastlm.ops.decode."""

from fastlm.ops.decode import decode_attention_paged, decode_attention_paged_reference, gather_pages  # noqa: F401
