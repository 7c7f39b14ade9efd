"""The eager decode step's shared per-step state (fastlm.cache.DecodeStepState) computes what the
ops path computes, bit for bit: the same logits as a plain forward of one token through the
cache (cache.update -> ops.rope_append_kv, ops.decode_attention), for equal and ragged lengths,
sliding windows, soft-capped scores, q/k norms (separate rotation) and no RoPE (GPT-2)."""

from __future__ import annotations

import pytest
import torch

import fastlm
from fastlm.decoding.step import decode_logits
from tests.model.decode_cases import SMALL, perturbed, prefilled_pair

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
    return perturbed(fastlm.Model(fastlm.preset(preset, **overrides)))


@pytest.mark.parametrize("ragged", [False, True])
@pytest.mark.parametrize("case", sorted(CASES))
def test_eager_step_matches_the_ops_path(case, ragged):
    model = _model(case)
    with torch.no_grad():
        caches, tokens = prefilled_pair(model, ragged)
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
