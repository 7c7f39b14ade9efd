"""The eager decode step's shared per-step state (fastlm.cache.DecodeStepState) computes what the
ops path computes, bit for bit: the same logits as a plain forward of one token through the
cache (cache.update -> ops.rope_append_kv, ops.decode_attention), for equal and ragged lengths,
sliding windows, soft-capped scores, q/k norms (separate rotation) and no RoPE (GPT-2)."""

from __future__ import annotations

import pytest
import torch

import fastlm
from fastlm.decoding.step import decode_logits

SMALL = dict(vocab_size=97, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=96,
             max_position_embeddings=64)
CASES = {
    "llama": ("tiny", SMALL),
    "llama-window": ("tiny", dict(SMALL, sliding_window=5)),
    "qwen3-qk-norm": ("tiny", dict(SMALL, arch="qwen3")),
    "gemma2-softcap-window": ("tiny", dict(SMALL, arch="gemma2", sliding_window=5, attn_softcap=2.0,
                                           final_softcap=5.0, head_dim=16)),
    "gpt2-no-rope": ("tiny-gpt2", dict(SMALL, num_kv_heads=4)),
}


def _model(case: str) -> fastlm.Model:
    preset, overrides = CASES[case]
    torch.manual_seed(0)
    model = fastlm.Model(fastlm.preset(preset, **overrides)).eval()
    with torch.no_grad():  # every parameter perturbed: a dropped norm or bias shows
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("ragged", [False, True])
@pytest.mark.parametrize("case", sorted(CASES))
def test_eager_step_matches_the_ops_path(case, ragged):
    model = _model(case)
    prompt = torch.randint(0, 97, (3, 9), generator=torch.Generator().manual_seed(1))
    key_lens = torch.tensor([9, 4, 6]) if ragged else None
    caches = [model.new_cache(3, 24) for _ in range(2)]
    tokens = torch.tensor([5, 17, 42])
    with torch.no_grad():
        for cache in caches:
            model(prompt, cache=cache, key_lens=key_lens)
        assert caches[0].uniform is not ragged
        for _ in range(8):  # past the window of 5
            ours = decode_logits(model, caches[0], tokens, caches[0].filled + 1)
            caches[0].filled += 1
            ops_path = model(tokens[:, None], cache=caches[1], validate=False)[:, -1].float()
            assert torch.equal(ours, ops_path)
            assert torch.equal(caches[0].lens, caches[1].lens)
            tokens = ours.argmax(-1)
    filled = caches[1].filled
    assert torch.equal(caches[0].k[:, :, :, :filled], caches[1].k[:, :, :, :filled])
    assert torch.equal(caches[0].v[:, :, :, :filled], caches[1].v[:, :, :, :filled])


def test_cache_tracks_equal_lengths():
    cache = fastlm.KVCache(1, 2, 1, 8, 4)
    assert cache.uniform
    cache.advance(3)
    assert cache.uniform
    cache.truncate(torch.tensor([2, 3]), 3)
    assert not cache.uniform
    cache.reset()
    assert cache.uniform
    cache.advance(3, lens=torch.tensor([3, 1]))
    assert not cache.uniform
