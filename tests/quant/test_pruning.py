"""Magnitude and 2:4 pruning: requested sparsity and pattern reached, smallest weights removed."""

import copy

import pytest
import torch
from torch import nn

import fastlm
from fastlm.model import packed_modules
from fastlm.quant import is_2_4, prune_2_4, prune_magnitude, sparsity_report, to_semi_structured


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = fastlm.ModelConfig(arch="llama", vocab_size=128, hidden_size=64, num_layers=2, num_heads=4,
                                num_kv_heads=2, intermediate_size=96, max_position_embeddings=32)
    return fastlm.Model(config).eval()


def _weight(model, name):
    """The weight rows of linear layer ``name``, also of a projection packed in a fused layer."""
    for fused, parts in packed_modules(model).items():
        for part, start, stop in parts:
            if part == name:
                return model.get_submodule(fused).weight[start:stop]
    return model.get_submodule(name).weight


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.9])
def test_magnitude_pruning_reaches_the_target(model, sparsity):
    original = copy.deepcopy(model)
    pruned = copy.deepcopy(model)
    report = prune_magnitude(pruned, sparsity)
    assert report.target == sparsity and abs(report.sparsity - sparsity) < 1e-3
    assert len(report.layers) == 14 and "lm_head" not in report.layers
    for name, fraction in report.layers.items():
        w = _weight(pruned, name)  # q/k/v and gate/up each pruned on their own rows of the fused layer
        assert abs(fraction - sparsity) <= 1 / w.numel()
        before = _weight(original, name).abs()
        kept, removed = before[w != 0], before[w == 0]
        if removed.numel() and kept.numel():
            assert removed.max() <= kept.min()  # the smallest magnitudes went
    assert torch.equal(pruned.lm_head.weight, original.lm_head.weight)


def test_2_4_pruning_pattern(model):
    original = copy.deepcopy(model)
    pruned = copy.deepcopy(model)
    report = prune_2_4(pruned, skip=["layers.1.*"])
    assert report.pattern_2_4 and report.sparsity == 0.5 and len(report.layers) == 7
    w = _weight(pruned, "layers.0.mlp.up_proj")
    assert is_2_4(w) and not is_2_4(_weight(original, "layers.0.mlp.up_proj"))
    groups_before = _weight(original, "layers.0.mlp.up_proj").abs().reshape(w.shape[0], -1, 4)
    kept = (w.reshape(w.shape[0], -1, 4) != 0)
    # the two kept weights of each group are its two largest
    top2 = groups_before.topk(2, dim=-1).indices
    assert torch.equal(kept, torch.zeros_like(kept).scatter_(-1, top2, True))
    assert not is_2_4(_weight(pruned, "layers.1.mlp.up_proj"))
    assert sparsity_report(pruned, skip=["layers.1.*"]).pattern_2_4


def test_pruning_fused_projections_one_by_one(model):
    """A subset of a fused layer's projections can be pruned or skipped by their Hugging Face names;
    the result equals pruning separate layers with those weights."""
    pruned = copy.deepcopy(model)
    report = prune_magnitude(pruned, 0.5, skip=["layers.*.attn.k_proj", "layers.*.mlp.gate_proj"])
    assert "layers.0.attn.q_proj" in report.layers and "layers.0.attn.k_proj" not in report.layers
    assert "layers.0.mlp.up_proj" in report.layers and "layers.0.mlp.gate_proj" not in report.layers
    for name in ("layers.0.attn.k_proj", "layers.1.mlp.gate_proj"):
        assert torch.equal(_weight(pruned, name), _weight(model, name))  # skipped rows untouched
    for name in ("layers.0.attn.q_proj", "layers.0.attn.v_proj", "layers.1.mlp.up_proj"):
        separate = nn.Sequential(nn.Linear(64, _weight(model, name).shape[0], bias=False))
        with torch.no_grad():
            separate[0].weight.copy_(_weight(model, name))
        prune_magnitude(separate, 0.5)
        assert torch.equal(_weight(pruned, name), separate[0].weight), name
    # 2:4 on the fused weight: skipping the whole layer by its own name works too
    report = prune_2_4(copy.deepcopy(model), skip=["layers.*.attn.qkv_proj"])
    assert not any(".attn.q_proj" in n for n in report.layers) and "layers.0.attn.o_proj" in report.layers


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
