"""Training loops."""

from fastlm.train.loop import TrainConfig, TrainResult, lr_at, random_windows, train

__all__ = ["TrainConfig", "TrainResult", "lr_at", "random_windows", "train"]
