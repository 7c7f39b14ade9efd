"""Fine-tuning adapters (LoRA or a soft prompt) with fastlm's training engine.

:class:`AdapterTrainer` is :class:`fastlm.train.Trainer` whose optimizer sees only the adapter
(the base is frozen) and whose checkpoints hold the active adapter in PEFT's format (plus the
trainer state: optimizer, scheduler, RNG, step), so resuming works and every checkpoint
directory is a PEFT adapter. :func:`finetune_adapter` is the recipe: prompt/completion jsonl,
loss on completion tokens only (``fastlm.train.SFTSource`` / ``encode_example``).

Under ``precision="bf16"``/``"fp16"`` the forward runs under autocast while the adapter keeps
float32 master weights (also on a bf16 base). Several processes (torchrun) train with DDP,
which synchronizes the adapter's gradients only; N processes give one process's losses on the
same global batch (without LoRA dropout, whose masks depend on the split). FSDP is refused.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

from fastlm.io import from_pretrained
from fastlm.peft.config import LoraConfig, PromptTuningConfig
from fastlm.peft.layers import LoraLinear
from fastlm.peft.lora import LoraModel
from fastlm.peft.prompt import PromptTuningModel
from fastlm.train.recipes import RecipeOutput, prepare_finetune
from fastlm.train.trainer import Trainer, TrainerConfig, TrainResult

logger = logging.getLogger(__name__)

METHODS = ("lora", "prompt")
AdapterModel = LoraModel | PromptTuningModel


class AdapterTrainer(Trainer):
    """Trains the active adapter of a LoraModel / PromptTuningModel; checkpoints are PEFT adapter
    directories (adapter_config.json, adapter_model.safetensors) plus trainer_state.pt."""

    def __init__(self, model: AdapterModel, train_source, config: TrainerConfig, **kwargs) -> None:
        if not isinstance(model, (LoraModel, PromptTuningModel)):
            raise TypeError(f"AdapterTrainer trains a LoraModel or PromptTuningModel, got {type(model).__name__}")
        if model.active_adapter is None:
            raise ValueError("AdapterTrainer: the model has no active adapter to train")
        if not any(p.requires_grad for p in model.parameters()):
            raise ValueError(f"AdapterTrainer: adapter {model.active_adapter!r} is frozen (loaded without "
                             "is_trainable=True)")
        if config.fsdp:
            raise ValueError("AdapterTrainer: TrainerConfig.fsdp=True is not supported for adapter training (the "
                             "adapter checkpoint is written from the main process's unsharded model); several "
                             "processes train adapters with DDP (fsdp=False), which synchronizes only the adapter's "
                             "gradients")
        if config.fused_loss and isinstance(model.lm_head, LoraLinear):
            raise ValueError("AdapterTrainer: TrainerConfig.fused_loss=True computes the loss from lm_head's weight "
                             "alone, which would skip the LoRA adapter on lm_head; drop lm_head from "
                             "target_modules or train without fused_loss")
        super().__init__(model, train_source, config, **kwargs)

    def _gather_model(self) -> None:
        return None  # the adapter is saved from the main process's own (unsharded) model

    def _write_model(self, directory: Path, gathered) -> None:
        self.model.save_adapter(directory)

    def _load_model(self, directory: Path, optimizer_state: dict) -> None:
        self.model.load_adapter_weights(directory, self.model.active_adapter)
        options = StateDictOptions(full_state_dict=True, strict=True)
        set_optimizer_state_dict(self.wrapped, self.optimizer, optimizer_state, options=options)

    def _extra_state(self) -> dict:
        return {"adapter_name": self.model.active_adapter}


def train_adapter(model: AdapterModel, train_source, config: TrainerConfig, *, val_source=None, extra_files=None,
                  resume: bool = False) -> TrainResult:
    """Train ``model``'s active adapter on a batch source (e.g. an SFTSource); the base stays frozen."""
    trainer = AdapterTrainer(model, train_source, config, val_source=val_source, extra_files=extra_files)
    return trainer.fit(resume=resume)


def finetune_adapter(
    config: TrainerConfig,
    *,
    data: str,
    model_dir: str,
    method: str = "lora",
    lora: LoraConfig | None = None,
    prompt: PromptTuningConfig | None = None,
    adapter_name: str = "default",
    template: str | None = None,
    seq_len: int = 512,
    val_data: str | None = None,
    val_fraction: float = 0.05,
    resume: bool = False,
    overwrite: bool = False,
    truncation: str = "right",
) -> RecipeOutput:
    """LoRA (``method="lora"``) or soft-prompt (``"prompt"``) tuning of the checkpoint in
    ``model_dir`` on a prompt/completion jsonl file, loss on the completion tokens only.
    Checkpoints (``<out>/checkpoints/step-*``) are PEFT adapter directories with the tokenizer,
    recording the base model's path (``base_model_name_or_path``). ``resume``, ``overwrite`` and
    ``truncation`` as in :func:`fastlm.train.recipes.finetune`."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    lora = dataclasses.replace(lora or LoraConfig(), base_model_name_or_path=str(Path(model_dir).resolve()))
    prompt = dataclasses.replace(prompt or PromptTuningConfig(), base_model_name_or_path=str(Path(model_dir).resolve()))
    adapter_settings = (dict(lora_r=lora.r, lora_alpha=lora.lora_alpha, lora_dropout=lora.lora_dropout,
                             lora_targets=lora.target_modules) if method == "lora"
                        else dict(num_virtual_tokens=prompt.num_virtual_tokens))
    prepared = prepare_finetune(config, data=data, model_dir=model_dir, template=template, seq_len=seq_len,
                                val_data=val_data, val_fraction=val_fraction, resume=resume, overwrite=overwrite,
                                truncation=truncation, settings=dict(command="finetune", method=method,
                                                                     **adapter_settings),
                                reserved=prompt.num_virtual_tokens if method == "prompt" else 0)
    base = from_pretrained(model_dir, dtype=torch.float32)
    torch.manual_seed(config.seed)  # the same adapter initialization in every process and every run
    if method == "lora":
        model: AdapterModel = LoraModel(base, lora, adapter_name)
    else:
        model = PromptTuningModel(base, prompt, adapter_name)
    trainable, total = model.get_nb_trainable_parameters()
    logger.info("%s tuning: %d trainable parameters of %d (%.3f%%)", method, trainable, total, 100 * trainable / total)
    result = train_adapter(model, prepared.train, config, val_source=prepared.val, extra_files=prepared.extra_files,
                           resume=resume)
    return RecipeOutput(model, prepared.tokenizer, result)
