"""LoRA on fused projections (attn.qkv_proj, mlp.gate_up_proj): adapters on subsets of the packed
projections, with per-projection ranks and scalings, give PEFT's outputs on the transformers
model (whose projections are separate) and save to the same PEFT file; merge/unmerge touch only
the targeted rows and restore them bit for bit; mixed-adapter batches, the unfused (dropout /
quantized) path and training reach only the targeted slices."""

import warnings

import pytest
import torch
from safetensors.torch import load_file

import fastlm
from fastlm.peft import LoraConfig, LoraModel
from fastlm.peft.packed import LoraSlice, PackedLoraLinear

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TOL = 1e-4
SUBSETS = {  # targets, rank_pattern, alpha_pattern: scalings differ within a fused layer in most
    "q_v": (["q_proj", "v_proj"], {"v_proj": 3}, {"q_proj": 5}),
    "k": (["k_proj"], {}, {}),
    "gate": (["gate_proj"], {}, {"gate_proj": 2}),
    "k_up_down": (["k_proj", "up_proj", "down_proj"], {"up_proj": 2}, {}),
}


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=131, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=96)
    path = tmp_path_factory.mktemp("llama")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        transformers.LlamaForCausalLM(config).save_pretrained(path)
    return path


def _ids(b=3, t=9):
    return torch.randint(0, 131, (b, t), generator=torch.Generator().manual_seed(3))


def _peft_adapter(hf_dir, out, subset, seed=0):
    targets, ranks, alphas = SUBSETS[subset]
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, rank_pattern=ranks, alpha_pattern=alphas,
                             task_type="CAUSAL_LM")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(hf_dir), config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    model.save_pretrained(out)
    return model.eval()


@pytest.mark.parametrize("subset", list(SUBSETS))
@torch.no_grad()
def test_subset_of_packed_targets_matches_peft(hf_dir, tmp_path, subset):
    theirs = _peft_adapter(hf_dir, tmp_path / "peft", subset)
    ours = LoraModel(fastlm.from_pretrained(hf_dir))
    ours.load_adapter(tmp_path / "peft", adapter_name="task")
    attn, mlp = ours.model.layers[0].attn, ours.model.layers[0].mlp
    targets = SUBSETS[subset][0]
    assert isinstance(attn.qkv_proj, PackedLoraLinear) == any(t in targets for t in ("q_proj", "k_proj", "v_proj"))
    for name in targets:
        if name != "down_proj":
            assert isinstance(getattr(attn if name[0] in "qkv" else mlp, name), LoraSlice)
    ids = _ids()
    assert (ours(ids) - theirs(input_ids=ids).logits).abs().max().item() <= TOL
    # saved back: the same PEFT tensors under the same names
    ours.save_adapter(tmp_path / "ours", "task")
    theirs_file = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    ours_file = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    assert ours_file.keys() == theirs_file.keys()
    assert all(torch.equal(ours_file[n], theirs_file[n]) for n in ours_file)


@torch.no_grad()
def test_merge_unmerge_touch_only_the_targeted_rows(hf_dir, tmp_path):
    _peft_adapter(hf_dir, tmp_path / "a", "q_v")
    ours = LoraModel(fastlm.from_pretrained(hf_dir))
    ours.load_adapter(tmp_path / "a", adapter_name="a")
    qkv = ours.model.layers[1].attn.qkv_proj
    original = qkv.base.weight.clone()
    ids = _ids()
    expected = ours(ids)
    ours.merge_adapter("a")
    merged = qkv.base.weight.clone()
    assert torch.equal(merged[64:80], original[64:80])  # k_proj rows: no adapter, untouched
    assert not torch.equal(merged[:64], original[:64]) and not torch.equal(merged[80:], original[80:])
    delta = ours.model.layers[1].attn.q_proj.delta_weight("a")
    torch.testing.assert_close(merged[:64].double(), original[:64].double() + delta, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours(ids), expected, rtol=1e-5, atol=1e-5)
    ours.unmerge_adapter()
    assert torch.equal(qkv.base.weight, original)  # bit for bit
    base = ours.merge_and_unload()
    attn = base.layers[1].attn
    assert type(attn.qkv_proj) is torch.nn.Linear and not hasattr(attn, "q_proj")
    torch.testing.assert_close(base(ids), expected, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_mixed_batch_with_adapters_on_different_slices(hf_dir, tmp_path):
    _peft_adapter(hf_dir, tmp_path / "a", "q_v", seed=1)
    _peft_adapter(hf_dir, tmp_path / "b", "k_up_down", seed=2)
    ours = LoraModel(fastlm.from_pretrained(hf_dir))
    ours.load_adapter(tmp_path / "a", adapter_name="a")
    ours.load_adapter(tmp_path / "b", adapter_name="b")
    ids = _ids(b=3)
    rows = ["b", "__base__", "a"]
    mixed = ours(ids, adapter_names=rows)
    for i, name in enumerate(rows):
        alone = ours(ids[i:i + 1], adapter_names=[name])
        torch.testing.assert_close(mixed[i:i + 1], alone, rtol=1e-5, atol=1e-5)


def test_unfused_path_and_training_reach_only_the_targeted_slices(hf_dir):
    torch.manual_seed(5)
    ours = LoraModel(fastlm.from_pretrained(hf_dir), LoraConfig(r=2, target_modules=["k_proj", "gate_proj"],
                                                                alpha_pattern={"k_proj": 3},
                                                                init_lora_weights=False))
    packed = ours.model.layers[0].attn.qkv_proj
    x = torch.randn(2, 5, 64)
    with torch.no_grad():  # the fused op (one GEMM + block-diagonal low-rank term) vs the per-slice terms
        fused = packed(x)
        unfused = packed.base(x) + packed._delta(x, "default", torch.float32)
        torch.testing.assert_close(fused, unfused, rtol=1e-5, atol=1e-6)
        assert torch.equal(fused[..., :64], packed.base(x)[..., :64])  # q rows: no adapter
    ours.train()
    ours(_ids()).float().pow(2).mean().backward()
    grads = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert grads and all(("k_proj" in n or "gate_proj" in n) and "lora_" in n for n in grads)
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())


@torch.no_grad()
def test_lora_on_a_quantized_fused_layer(hf_dir, tmp_path):
    _peft_adapter(hf_dir, tmp_path / "a", "q_v")
    model = fastlm.quantize(fastlm.from_pretrained(hf_dir), "int8_weight_only")
    ours = LoraModel(model)
    ours.load_adapter(tmp_path / "a")
    ids = _ids()
    with_adapter = ours(ids)
    with ours.disable_adapter():
        without = ours(ids)
    assert not torch.allclose(with_adapter, without)
    with pytest.raises(ValueError, match=r"cannot merge into module layers.0.attn.q_proj .*torch.int8"):
        ours.merge_adapter()
