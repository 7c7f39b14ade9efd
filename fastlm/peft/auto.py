"""PEFT-style entry points: wrap a model for a config, or load an adapter directory of either kind."""

from __future__ import annotations

from pathlib import Path

from fastlm.model import Model
from fastlm.peft.config import LoraConfig, PromptTuningConfig
from fastlm.peft.lora import LoraModel
from fastlm.peft.lora_io import read_config
from fastlm.peft.prompt import PromptTuningModel


def get_peft_model(model: Model, config: LoraConfig | PromptTuningConfig,
                   adapter_name: str = "default") -> LoraModel | PromptTuningModel:
    """PEFT's entry point: a :class:`LoraModel` for a LoraConfig, a :class:`PromptTuningModel`
    for a PromptTuningConfig, with a new adapter ``adapter_name``."""
    if isinstance(config, LoraConfig):
        return LoraModel(model, config, adapter_name)
    if isinstance(config, PromptTuningConfig):
        return PromptTuningModel(model, config, adapter_name)
    raise TypeError(f"get_peft_model: expected a LoraConfig or PromptTuningConfig, got {type(config).__name__}")


def from_pretrained(model: Model, path: str | Path, adapter_name: str = "default", *,
                    is_trainable: bool = False) -> LoraModel | PromptTuningModel:
    """``peft.PeftModel.from_pretrained`` for fastlm: wrap ``model`` and load the PEFT adapter
    directory ``path`` (LoRA or prompt tuning, from its adapter_config.json)."""
    kind = read_config(path).get("peft_type")
    if kind == "LORA":
        wrapper: LoraModel | PromptTuningModel = LoraModel(model)
    elif kind == "PROMPT_TUNING":
        wrapper = PromptTuningModel(model)
    else:
        raise ValueError(f"{path}: peft_type {kind!r} is not supported (fastlm loads LORA and PROMPT_TUNING)")
    wrapper.load_adapter(path, adapter_name, is_trainable=is_trainable)
    return wrapper
