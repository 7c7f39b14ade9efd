"""Training: the engine (:class:`Trainer`), deterministic data sources, checkpoints, recipes."""

from fastlm.train.data import PackedSource, SFTSource
from fastlm.train.interrupt import TrainingInterrupted
from fastlm.train.recipes import finetune, pretrain, pretrain_texts
from fastlm.train.rundir import ResumeMismatchError, RunDirectoryError
from fastlm.train.trainer import Trainer, TrainerConfig, TrainResult

__all__ = ["PackedSource", "ResumeMismatchError", "RunDirectoryError", "SFTSource", "TrainResult", "Trainer",
           "TrainerConfig", "TrainingInterrupted", "finetune", "pretrain", "pretrain_texts"]
