"""Training: the engine (:class:`Trainer`), deterministic data sources, checkpoints, recipes."""

from fastlm.train.data import PackedSource, SFTSource
from fastlm.train.recipes import finetune, pretrain, pretrain_texts
from fastlm.train.trainer import Trainer, TrainerConfig, TrainResult

__all__ = ["PackedSource", "SFTSource", "TrainResult", "Trainer", "TrainerConfig", "finetune", "pretrain",
           "pretrain_texts"]
