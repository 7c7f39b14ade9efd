"""Shared setup of the decode-step tests (test_decode_step_state, test_eager_step): a small
config, perturbed weights, and two caches holding the same prefilled prompt."""

from __future__ import annotations

import torch

import fastlm

SMALL = dict(vocab_size=97, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=96,
             max_position_embeddings=64)


def perturbed(model: fastlm.Model) -> fastlm.Model:
    """``model`` in eval mode with every parameter moved by 0.1·N(0, 1) (seeded by the caller):
    a dropped norm or bias shows in the logits."""
    model.eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def prefilled_pair(model: fastlm.Model, ragged: bool) -> tuple[list, torch.Tensor]:
    """Two static caches (batch 3, 24 positions) after the same 9-token prompt (ragged: key_lens
    9, 4, 6), and the first tokens (3,) to decode; call under torch.no_grad()."""
    prompt = torch.randint(0, 97, (3, 9), generator=torch.Generator().manual_seed(1))
    key_lens = torch.tensor([9, 4, 6]) if ragged else None
    caches = [model.new_cache(3, 24) for _ in range(2)]
    for cache in caches:
        model(prompt, cache=cache, key_lens=key_lens)
    return caches, torch.tensor([5, 17, 42])
