"""A minimal causal-LM training loop: AdamW, warmup + cosine decay, gradient clipping.

The training issue replaces it with the full engine (accumulation, mixed precision,
checkpoints that resume); this one trains the demo model and backs the tests.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from fastlm import ops
from fastlm.eval.perplexity import evaluate_loss
from fastlm.model import Model

logger = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    steps: int = 200
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr · min_lr_ratio
    warmup_steps: int = 20
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_batches: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "eval_batches"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TrainConfig.{name} must be a positive integer, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"TrainConfig.lr must be > 0, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"TrainConfig.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.warmup_steps < 0:
            raise ValueError(f"TrainConfig.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.weight_decay < 0 or self.grad_clip <= 0:
            raise ValueError("TrainConfig.weight_decay must be >= 0 and grad_clip > 0")


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)
    val_loss: float | None = None

    @property
    def val_perplexity(self) -> float | None:
        return None if self.val_loss is None else math.exp(self.val_loss)


def lr_at(step: int, config: TrainConfig) -> float:
    """Linear warmup to lr over warmup_steps, then cosine decay to lr · min_lr_ratio."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return config.lr * (config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine)


def random_windows(
    tokens: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets, (B, T) each, from random windows of a 1-D token stream."""
    if tokens.dim() != 1 or tokens.numel() < seq_len + 1:
        raise ValueError(f"need a 1-D token stream of at least seq_len + 1 = {seq_len + 1} tokens, got {tuple(tokens.shape)}")
    starts = torch.randint(0, tokens.numel() - seq_len, (batch_size,), generator=generator)
    offsets = torch.arange(seq_len + 1)
    windows = tokens[starts[:, None] + offsets]
    return windows[:, :-1], windows[:, 1:]


def _optimizer(model: Model, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (not on norms, biases)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.95))


def train(
    model: Model,
    train_tokens: torch.Tensor,
    config: TrainConfig,
    *,
    val_tokens: torch.Tensor | None = None,
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """Train ``model`` on random windows of ``train_tokens`` (1-D int64) for config.steps steps.

    Returns the per-step losses and, with ``val_tokens``, the validation loss at the end.
    """
    if config.seq_len > model.config.max_position_embeddings:
        raise ValueError(
            f"seq_len {config.seq_len} exceeds the model's context of {model.config.max_position_embeddings}"
        )
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = _optimizer(model, config)
    result = TrainResult()
    model.train()
    bar = tqdm(range(config.steps), desc="train", disable=not progress, dynamic_ncols=True)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, config)
        inputs, targets = random_windows(train_tokens, config.batch_size, config.seq_len, generator)
        inputs, targets = inputs.to(model.device), targets.to(model.device)
        logits = model(inputs)
        loss = ops.cross_entropy(logits.flatten(0, 1), targets.flatten())
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at step {step}; lower the learning rate")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        result.losses.append(loss.item())
        bar.set_postfix(loss=f"{result.losses[-1]:.3f}", lr=f"{lr_at(step, config):.2e}")
        if on_step is not None:
            on_step(step, result.losses[-1])
    model.eval()
    if val_tokens is not None:
        result.val_loss = evaluate_loss(model, val_tokens, seq_len=config.seq_len, max_batches=config.eval_batches,
                                        batch_size=config.batch_size)
        logger.info("validation loss %.4f, perplexity %.2f", result.val_loss, result.val_perplexity)
    return result
