"""fastlm as an accelerated backend for Hugging Face transformers models.

Importing this module registers the ``"fastlm"`` attention implementation (see
:mod:`.attention`): ``AutoModelForCausalLM.from_pretrained(..., attn_implementation="fastlm")``
or ``model.set_attn_implementation("fastlm")``. :func:`apply` puts fastlm's kernels into one
model instance (no class is patched globally) and :func:`remove` takes them out again.
"""

from fastlm.integrations.transformers.attention import NAME, fastlm_attention_forward, fastlm_mask, register
from fastlm.integrations.transformers.patch import (
    SUPPORTED_ARCHITECTURES,
    apply,
    is_patched,
    patched,
    patched_summary,
    remove,
)

register()

__all__ = [
    "NAME", "SUPPORTED_ARCHITECTURES", "apply", "fastlm_attention_forward", "fastlm_mask", "is_patched", "patched",
    "patched_summary", "register", "remove",
]
