"""Old import path, kept for importers outside fastlm.ops: moved to fastlm.ops.rotary."""

from fastlm.ops.rotary import rope_append_kv, rope_append_kv_layer, rope_append_kv_reference  # noqa: F401
