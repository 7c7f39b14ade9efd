"""Perplexity of a causal LM on a token stream: exp of the mean next-token loss."""

from __future__ import annotations

import math

import torch

from fastlm import ops
from fastlm.model import Model


@torch.no_grad()
def evaluate_loss(
    model: Model,
    tokens: torch.Tensor,
    *,
    seq_len: int,
    batch_size: int = 8,
    max_batches: int | None = None,
) -> float:
    """Mean next-token cross-entropy over non-overlapping windows of ``tokens`` (1-D int64).

    Windows of seq_len + 1 tokens are taken from the start; every token after the first of
    each window is predicted once. ``max_batches`` bounds the work (None: the whole stream).
    """
    if tokens.dim() != 1:
        raise ValueError(f"evaluate_loss: expected a 1-D token stream, got shape {tuple(tokens.shape)}")
    num_windows = (tokens.numel() - 1) // seq_len
    if num_windows < 1:
        raise ValueError(f"evaluate_loss: need at least seq_len + 1 = {seq_len + 1} tokens, got {tokens.numel()}")
    if max_batches is not None:
        num_windows = min(num_windows, max_batches * batch_size)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, num_windows, batch_size):
        rows = torch.arange(start, min(start + batch_size, num_windows))
        index = rows[:, None] * seq_len + torch.arange(seq_len + 1)
        window = tokens[index].to(model.device)
        logits = model(window[:, :-1])
        loss = ops.cross_entropy(logits.flatten(0, 1), window[:, 1:].flatten())
        n = window[:, 1:].numel()
        total += loss.item() * n
        count += n
    model.train(was_training)
    return total / count


def perplexity(model: Model, tokens: torch.Tensor, *, seq_len: int, batch_size: int = 8,
               max_batches: int | None = None) -> float:
    """exp(evaluate_loss(...))."""
    return math.exp(evaluate_loss(model, tokens, seq_len=seq_len, batch_size=batch_size, max_batches=max_batches))
