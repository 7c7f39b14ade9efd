"""Old import path, kept for importers outside fastlm.ops: the sampling semantics moved to
fastlm.ops.sampling (``sample`` here is the reference, ``fastlm.ops.sampling.sample_reference``)."""

from fastlm.ops.sampling import (  # noqa: F401
    STATUS_BAD_MIN_P,
    STATUS_BAD_TEMPERATURE,
    STATUS_BAD_TOP_K,
    STATUS_BAD_TOP_P,
    STATUS_MESSAGES,
    STATUS_NAN,
    STATUS_NO_FINITE,
    STATUS_POS_INF,
    filtered_probs,
    row_status,
    sample_reference as sample,
)
