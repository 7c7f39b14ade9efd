"""Shared pieces of the decoding strategies: prompts, logits processing, stopping."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class Prompts:
    """A batch of prompts right-padded into ids (B, T) with their lengths (B,).

    ``ragged`` is True when the caller gave a list of token lists (results are then a list of
    1-D tensors, one per prompt)."""

    ids: torch.Tensor
    lens: torch.Tensor
    ragged: bool

    @property
    def uniform(self) -> bool:
        return not self.ragged


def prepare_prompts(input_ids, device: torch.device, vocab_size: int, pad_id: int) -> Prompts:
    """Check and pad the prompts: a (B, T) integer tensor or a list of token-id lists."""
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() != 2:
            raise ValueError(f"generate: expected input_ids of shape (B, T), got {tuple(input_ids.shape)}")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"generate: expected integer input_ids, got {input_ids.dtype}")
        if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
            raise ValueError("generate: the prompt is empty; give at least one token per row")
        ids = input_ids.to(device=device, dtype=torch.int64)
        lens = torch.full((ids.shape[0],), ids.shape[1], dtype=torch.int64, device=device)
        ragged = False
    elif isinstance(input_ids, Sequence) and not isinstance(input_ids, (str, bytes)):
        rows = [list(map(int, row)) for row in input_ids]
        if not rows or any(len(row) == 0 for row in rows):
            raise ValueError("generate: the prompt is empty; give at least one token per prompt")
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), pad_id, dtype=torch.int64)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
        ids = ids.to(device)
        lens = torch.tensor([len(row) for row in rows], device=device)
        ragged = True
    else:
        raise TypeError(f"generate: expected a (B, T) tensor or a list of token-id lists, got {type(input_ids).__name__}")
    if ((ids < 0) | (ids >= vocab_size)).any():
        raise ValueError(f"generate: token ids must be in [0, {vocab_size})")
    return Prompts(ids, lens, ragged)


def apply_repetition_penalty(scores: torch.Tensor, present: torch.Tensor, penalty: float) -> torch.Tensor:
    """transformers' rule: for tokens already in the sequence, score / penalty if positive,
    score · penalty if negative. scores (B, V), present (B, V) bool."""
    if penalty == 1.0:
        return scores
    penalized = torch.where(scores < 0, scores * penalty, scores / penalty)
    return torch.where(present, penalized, scores)


def presence(prompts: Prompts, vocab_size: int) -> torch.Tensor:
    """(B, V) bool: which tokens occur in each prompt (padding excluded)."""
    b, t = prompts.ids.shape
    valid = torch.arange(t, device=prompts.ids.device)[None, :] < prompts.lens[:, None]
    counts = torch.zeros(b, vocab_size, dtype=torch.int32, device=prompts.ids.device)
    return counts.scatter_add_(1, torch.where(valid, prompts.ids, 0), valid.to(torch.int32)) > 0


class StopStrings:
    """Stop a sequence once its generated text contains one of ``strings`` (needs the tokenizer;
    reads the new tokens on the host, so it synchronizes each step)."""

    def __init__(self, strings: Sequence[str], tokenizer, batch_size: int) -> None:
        if tokenizer is None:
            raise ValueError("generate: stop_strings needs tokenizer= to turn tokens into text")
        if isinstance(strings, str) or not all(isinstance(s, str) and s for s in strings):
            raise ValueError("generate: stop_strings must be a list of non-empty strings")
        self.strings, self.tokenizer = list(strings), tokenizer
        self.generated: list[list[int]] = [[] for _ in range(batch_size)]

    def update(self, tokens: torch.Tensor, finished: torch.Tensor) -> torch.Tensor:
        """Record the new tokens (B,); returns (B,) bool: which sequences now hit a stop string."""
        hit = []
        for row, (token, done) in enumerate(zip(tokens.tolist(), finished.tolist())):
            if done:
                hit.append(False)
                continue
            self.generated[row].append(token)
            text = self.tokenizer.decode(self.generated[row][-64:], skip_special_tokens=True)
            hit.append(any(s in text for s in self.strings))
        return torch.tensor(hit, device=tokens.device)


def eos_set(eos_token_id: int | Sequence[int] | None, vocab_size: int) -> list[int]:
    if eos_token_id is None:
        return []
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    bad = [i for i in ids if not (isinstance(i, int) and 0 <= i < vocab_size)]
    if bad:
        raise ValueError(f"generate: eos_token_id must be in [0, {vocab_size}), got {bad}")
    return ids


def eos_tensor(eos_ids: list[int], device: torch.device) -> torch.Tensor | None:
    """The eos ids as a device tensor for :func:`hits_eos` (built once, outside the decode loop)."""
    return torch.tensor(eos_ids, dtype=torch.int64, device=device) if eos_ids else None


def hits_eos(tokens: torch.Tensor, eos: torch.Tensor | None) -> torch.Tensor:
    """(B,) bool: which tokens are one of the ``eos`` ids (from :func:`eos_tensor`)."""
    if eos is None:
        return torch.zeros_like(tokens, dtype=torch.bool)
    return torch.isin(tokens, eos)
