"""LoraModel: injection, trainable parameters, named adapters, mixed batches, merge/unmerge, errors."""

import pytest
import torch

import fastlm
from fastlm.config import ModelConfig
from fastlm.generate import generate
from fastlm.model import Model
from fastlm.peft import LoraConfig, LoraLinear, LoraModel, get_peft_model

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def tiny(arch="llama", **overrides):
    config = dict(arch=arch, vocab_size=67, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=48,
                  max_position_embeddings=64)
    config.update(overrides)
    torch.manual_seed(0)
    return Model(ModelConfig(**config)).eval()


def ids(b=3, t=7, seed=1):
    return torch.randint(0, 67, (b, t), generator=torch.Generator().manual_seed(seed))


def random_lora(r=4, targets="all-linear", **kw):
    return LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False, **kw)


def test_injection_and_trainable_count():
    model = tiny()
    lora = LoraModel(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    wrapped = lora.lora_modules()
    assert sorted(wrapped) == sorted(f"layers.{i}.{m}" for i in range(2)
                                     for m in ("attn.q_proj", "attn.v_proj", "mlp.down_proj"))
    assert all(isinstance(m, LoraLinear) for m in wrapped.values())
    # q: 4·32 + 32·4, v (GQA-free here: 32 out), down: 4·48 + 32·4, per layer
    expected = 2 * ((4 * 32 + 32 * 4) * 2 + (4 * 48 + 32 * 4))
    trainable, total = lora.get_nb_trainable_parameters()
    assert trainable == expected and total == model.num_parameters()
    assert [n for n, p in lora.named_parameters() if p.requires_grad] and \
        all("lora_" in n for n, p in lora.named_parameters() if p.requires_grad)
    assert f"trainable params: {expected:,d} ||" in lora.trainable_parameters_summary()
    with torch.no_grad():  # PEFT's init: B = 0, the adapter starts as a no-op
        torch.testing.assert_close(lora(ids()), tiny()(ids()), atol=0, rtol=0)


def test_only_adapter_parameters_get_gradients():
    lora = LoraModel(tiny(), random_lora())
    lora.train()
    lora(ids()).float().square().mean().backward()
    for name, p in lora.named_parameters():
        assert (p.grad is not None) == ("lora_" in name), name


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_mixed_batch_equals_per_row_runs(arch):
    lora = LoraModel(tiny(arch), random_lora(), "a")
    lora.add_adapter("b", random_lora(r=2, targets=["q_proj", "up_proj"]))
    x = ids(4)
    names = ["a", "b", "__base__", "b"]
    with torch.no_grad():
        mixed = lora(x, adapter_names=names)
        for i, name in enumerate(names):
            if name == "__base__":
                with lora.disable_adapter():
                    row = lora(x[i:i + 1])
            else:
                lora.set_adapter(name)
                row = lora(x[i:i + 1])
            torch.testing.assert_close(mixed[i:i + 1], row, atol=1e-5, rtol=1e-5)
        assert lora.active_adapter == "b"
        torch.testing.assert_close(lora(x, adapter_names=["a"] * 4), lora(x, adapter_names=["a", "a", "a", "a"]))


def test_mixed_batch_triton_kernels_match_reference():
    """The same mixed batch through the triton kernels (interpreter on CPU) and the reference."""
    pytest.importorskip("triton")
    from fastlm.ops import triton_fused  # noqa: F401  the norm/rope/swiglu kernels
    lora = LoraModel(tiny(num_layers=1), random_lora(targets=["q_proj", "down_proj"]), "a")
    lora.add_adapter("b", random_lora(r=2, targets=["q_proj"]))
    x, names = ids(3, 5), ["b", "__base__", "a"]
    with torch.no_grad():
        expected = lora(x, adapter_names=names)
        with fastlm.use_backend("triton"):  # every fastlm op of the model, LoRA's included
            got = lora(x, adapter_names=names)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_generate_with_per_row_adapters():
    lora = LoraModel(tiny(), random_lora(), "a")
    lora.add_adapter("b", random_lora(r=2))
    prompt = ids(2, 5)
    with lora.use_adapters(["a", "b"]):
        both = generate(lora, prompt, max_new_tokens=6)
    lora.set_adapter("a")
    only_a = generate(lora, prompt[:1], max_new_tokens=6)
    lora.set_adapter("b")
    only_b = generate(lora, prompt[1:], max_new_tokens=6)
    assert torch.equal(both, torch.cat([only_a, only_b]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_merge_equals_unmerged_and_unmerge_restores_exactly(dtype):
    model = tiny(arch="gpt2").to(dtype)
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    lora = LoraModel(model, random_lora(r=4, targets=["c_attn", "c_fc", "c_proj"]))
    with torch.no_grad():
        for module in lora.lora_modules().values():  # a large update: W + ΔW crosses binades
            module.lora_B["default"].mul_(20.0)
        unmerged = lora(ids()).float()
        lora.merge_adapter()
        merged = lora(ids()).float()
        assert lora.merged_adapter == "default"
        lora.unmerge_adapter()
        again = lora(ids()).float()
    tol = 1e-4 if dtype == torch.float32 else 0.1 * unmerged.abs().max().item()
    assert (merged - unmerged).abs().max().item() <= tol
    torch.testing.assert_close(again, unmerged, atol=0, rtol=0)
    for name, p in model.named_parameters():
        if name in original:
            assert torch.equal(p, original[name]), name  # bit for bit, well within 1e-6
    assert all(m._merge is None for m in lora.lora_modules().values())


def test_merge_refuses_quantized_and_tied_head():
    lora = LoraModel(tiny(tie_word_embeddings=True), random_lora(targets=["q_proj", "lm_head"]))
    with pytest.raises(ValueError, match="module lm_head: it shares its weight"):
        lora.merge_adapter()
    lora2 = LoraModel(tiny(), random_lora(targets=["q_proj"]))
    module = lora2.lora_modules()["layers.0.attn.q_proj"]
    module.base.weight.data = module.base.weight.data.to(torch.int8)
    with pytest.raises(ValueError, match=r"cannot merge into module layers.0.attn.q_proj .*torch.int8"):
        lora2.merge_adapter()
    assert all(m._merge is None for m in lora2.lora_modules().values())  # nothing was changed


def test_merged_model_refuses_other_rows_then_unloads():
    lora = LoraModel(tiny(), random_lora())
    with torch.no_grad():
        expected = lora(ids())
        lora.merge_adapter()
        with pytest.raises(RuntimeError, match="unmerge_adapter"):
            lora(ids(), adapter_names=["__base__"] * 3)
        base = lora.merge_and_unload()
    assert not any(isinstance(m, LoraLinear) for m in base.modules())
    torch.testing.assert_close(base(ids()), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("combination", ["cat", "svd"])
def test_weighted_adapter(arch, combination):
    lora = LoraModel(tiny(arch), random_lora(r=3), "a")
    lora.add_adapter("b", random_lora(r=2, targets=["q_proj", "k_proj", "v_proj", "down_proj"]))
    lora.add_weighted_adapter(["a", "b"], [0.5, -2.0], "ab", combination_type=combination, svd_rank=5)
    for name, module in lora.lora_modules().items():
        expected = 0.5 * module.delta_weight("a") - 2.0 * (module.delta_weight("b") if "b" in module.lora_A else 0)
        torch.testing.assert_close(module.delta_weight("ab"), expected, atol=1e-5, rtol=1e-5)
    if arch == "gpt2":  # q/k/v keep one shared lora_A (PEFT's c_attn)
        attn = lora.model.layers[0].attn
        assert attn.q_proj.lora_A["ab"] is attn.k_proj.lora_A["ab"] is attn.v_proj.lora_A["ab"]


def test_set_delete_and_unknown_adapter():
    lora = LoraModel(tiny(), random_lora(), "a")
    lora.add_adapter("b", random_lora(r=2))
    assert lora.active_adapter == "a" and lora.adapter_names == ["a", "b"]
    trainable_a = lora.get_nb_trainable_parameters()[0]
    lora.set_adapter("b")
    assert lora.get_nb_trainable_parameters()[0] < trainable_a  # only the active adapter trains
    with pytest.raises(ValueError, match=r"unknown adapter 'c'; this model has: 'a', 'b'"):
        lora.set_adapter("c")
    with pytest.raises(ValueError, match="unknown adapter 'zz'"):
        lora(ids(), adapter_names=["a", "zz", "a"])
    with pytest.raises(ValueError, match="3 rows"):
        lora(ids(), adapter_names=["a"])
    lora.delete_adapter("b")
    assert lora.active_adapter == "a" and all("b" not in m.lora_A for m in lora.lora_modules().values())
    with pytest.raises(ValueError, match="already exists"):
        lora.add_adapter("a", random_lora())
    with pytest.raises(ValueError, match="adapter names"):
        lora.add_adapter("__base__", random_lora())


@pytest.mark.parametrize("config,match", [
    (lambda: LoraConfig(r=0), "LoraConfig.r must be a positive integer, got 0"),
    (lambda: LoraConfig(r=-2), "LoraConfig.r must be a positive integer"),
    (lambda: LoraConfig(rank_pattern={"q_proj": 0}), r"rank_pattern\['q_proj'\] must be a positive integer"),
    (lambda: LoraConfig(lora_dropout=1.0), "lora_dropout"),
    (lambda: LoraConfig(target_modules=[]), "target_modules"),
])
def test_config_errors(config, match):
    with pytest.raises(ValueError, match=match):
        config()


def test_unknown_target_and_bad_layers_name_the_module():
    with pytest.raises(ValueError, match=r"'qkv_proj' matches no module of this llama model; available: .*q_proj"):
        LoraModel(tiny(), LoraConfig(target_modules=["q_proj", "qkv_proj"]))
    with pytest.raises(ValueError, match="layer\\(s\\) \\[5\\] do not exist"):
        LoraModel(tiny(), LoraConfig(target_modules=["q_proj"], layers_to_transform=[1, 5]))
    lora = LoraModel(tiny(), LoraConfig(target_modules=["q_proj"], layers_to_transform=1))
    assert list(lora.lora_modules()) == ["layers.1.attn.q_proj"]


def test_rank_pattern_and_regex_targets():
    config = LoraConfig(r=4, target_modules=r".*layers\.0\.(self_attn|attn)\.(q|v)_proj", rank_pattern={"v_proj": 2})
    lora = LoraModel(tiny(), config)
    modules = lora.lora_modules()
    assert sorted(modules) == ["layers.0.attn.q_proj", "layers.0.attn.v_proj"]
    assert modules["layers.0.attn.q_proj"].rank("default") == 4 and modules["layers.0.attn.v_proj"].rank("default") == 2


def test_dropout_path_trains_and_is_identity_in_eval():
    lora = LoraModel(tiny(), random_lora(lora_dropout=0.5))
    x = ids()
    with torch.no_grad():
        eval_out = lora(x)
        lora.train()
        torch.manual_seed(0)
        train_out = lora(x)
        lora.eval()
        with lora.use_adapters(["default", "__base__", "default"]):  # mixed path, eval: no dropout
            torch.testing.assert_close(lora(x)[0], eval_out[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(train_out, eval_out)


def test_wrapping_and_get_peft_model_type_errors():
    with pytest.raises(TypeError, match="fastlm.Model"):
        LoraModel(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="LoraConfig or PromptTuningConfig"):
        get_peft_model(tiny(), {"r": 4})


@pytest.mark.gpu
def test_lora_model_bf16_on_gpu_uses_triton_and_matches_reference():
    lora = LoraModel(tiny().to(DEVICE, torch.bfloat16), random_lora(), "a")
    lora.add_adapter("b", random_lora(r=8))
    x = ids(4).to(DEVICE)
    names = ["a", "b", "__base__", "a"]
    with torch.no_grad():
        got = lora(x, adapter_names=names).float()
        with fastlm.use_backend("reference"):
            expected = lora(x, adapter_names=names).float()
    assert (got - expected).abs().max().item() <= 0.05 * expected.abs().max().item()


def test_per_row_adapters_follow_beam_search_rows():
    lora = LoraModel(tiny(), random_lora(), "a")
    lora.add_adapter("b", random_lora(r=2))
    prompt = ids(2, 5)
    with lora.use_adapters(["a", "b"]):
        both = generate(lora, prompt, max_new_tokens=4, num_beams=2)
    lora.set_adapter("b")
    assert torch.equal(both[1:], generate(lora, prompt[1:], max_new_tokens=4, num_beams=2))
