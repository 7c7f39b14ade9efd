"""Parameter-efficient fine-tuning on fastlm models, compatible with PEFT's adapter files.

- :class:`LoraModel` / :func:`get_peft_model`: named LoRA adapters injected into the chosen
  linear layers (fused ``fastlm.ops.lora_linear``), PEFT load/save, per-row adapters in one
  batch, exact merge/unmerge, weighted combinations.
- :class:`PromptTuningModel`: trainable soft prompts (virtual tokens) prepended to the input.
- :func:`from_pretrained`: wrap a model and load a PEFT adapter directory of either kind.
- :func:`fastlm.peft.tuning.finetune_adapter` / :func:`~fastlm.peft.tuning.train_adapter`:
  train either on prompt/completion data with the loss on completions only (fastlm.train).

The model never imports this package: it wraps and replaces the model's layers from outside.
"""

from fastlm.peft.auto import from_pretrained, get_peft_model
from fastlm.peft.config import BASE_ADAPTER, LINEAR_TARGETS, LoraConfig, PromptTuningConfig
from fastlm.peft.layers import LoraLinear
from fastlm.peft.lora import LoraModel
from fastlm.peft.prompt import PromptTuningModel

__all__ = [
    "BASE_ADAPTER", "LINEAR_TARGETS", "LoraConfig", "LoraLinear", "LoraModel", "PromptTuningConfig",
    "PromptTuningModel", "from_pretrained", "get_peft_model",
]
