"""Magnitude and 2:4 pruning: requested sparsity and pattern reached, smallest weights removed."""

import copy

import pytest
import torch
from torch import nn

import fastlm
from fastlm.quant import is_2_4, prune_2_4, prune_magnitude, sparsity_report, to_semi_structured


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = fastlm.ModelConfig(arch="llama", vocab_size=128, hidden_size=64, num_layers=2, num_heads=4,
                                num_kv_heads=2, intermediate_size=96, max_position_embeddings=32)
    return fastlm.Model(config).eval()


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.9])
def test_magnitude_pruning_reaches_the_target(model, sparsity):
    original = copy.deepcopy(model)
    pruned = copy.deepcopy(model)
    report = prune_magnitude(pruned, sparsity)
    assert report.target == sparsity and abs(report.sparsity - sparsity) < 1e-3
    assert len(report.layers) == 14 and "lm_head" not in report.layers
    for name, fraction in report.layers.items():
        w = pruned.get_submodule(name).weight
        assert abs(fraction - sparsity) <= 1 / w.numel()
        before = original.get_submodule(name).weight.abs()
        kept, removed = before[w != 0], before[w == 0]
        if removed.numel() and kept.numel():
            assert removed.max() <= kept.min()  # the smallest magnitudes went
    assert torch.equal(pruned.lm_head.weight, original.lm_head.weight)


def test_2_4_pruning_pattern(model):
    original = copy.deepcopy(model)
    pruned = copy.deepcopy(model)
    report = prune_2_4(pruned, skip=["layers.1.*"])
    assert report.pattern_2_4 and report.sparsity == 0.5 and len(report.layers) == 7
    w = pruned.layers[0].mlp.up_proj.weight
    assert is_2_4(w) and not is_2_4(original.layers[0].mlp.up_proj.weight)
    groups_before = original.layers[0].mlp.up_proj.weight.abs().reshape(w.shape[0], -1, 4)
    kept = (w.reshape(w.shape[0], -1, 4) != 0)
    # the two kept weights of each group are its two largest
    top2 = groups_before.topk(2, dim=-1).indices
    assert torch.equal(kept, torch.zeros_like(kept).scatter_(-1, top2, True))
    assert not is_2_4(pruned.layers[1].mlp.up_proj.weight)
    assert sparsity_report(pruned, skip=["layers.1.*"]).pattern_2_4


def test_pruning_errors(model):
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
        prune_magnitude(copy.deepcopy(model), 1.0)
    with pytest.raises(ValueError, match="match no linear layer"):
        prune_magnitude(copy.deepcopy(model), 0.5, skip=["nope"])
    odd = nn.Sequential(nn.Linear(6, 4))
    with pytest.raises(ValueError, match="multiple of 4"):
        prune_2_4(odd)
    with pytest.raises(RuntimeError, match="needs CUDA"):
        to_semi_structured(copy.deepcopy(model))


@pytest.mark.gpu
def test_semi_structured_on_gpu():
    torch.manual_seed(1)
    config = fastlm.ModelConfig(arch="llama", vocab_size=256, hidden_size=256, num_layers=1, num_heads=4,
                                intermediate_size=512, max_position_embeddings=64)
    model = fastlm.Model(config).cuda().half().eval()
    prune_2_4(model)
    ids = torch.randint(0, 256, (2, 32), device="cuda")
    with torch.no_grad():
        dense = model(ids)
        result = to_semi_structured(model)
        assert "converted" in result.values(), result
        sparse = model(ids)
    torch.testing.assert_close(sparse.float(), dense.float(), atol=5e-2, rtol=5e-2)
