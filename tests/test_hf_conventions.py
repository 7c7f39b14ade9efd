"""The Hugging Face conventions on fastlm.Model: load_adapter / set_adapter / delete_adapter /
disable_adapters / enable_adapters with PEFT's files (against PEFT on transformers), and
save_pretrained of a quantized model read back by fastlm.from_pretrained with identical outputs."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors import safe_open

import fastlm
from fastlm.peft import LoraConfig, get_peft_model
from fastlm.quant import load_quantized, quantize, quantized_layers

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=131, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                                   num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=96)
    path = tmp_path_factory.mktemp("base")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def _peft_adapter(hf_dir, out, seed, targets):
    """An adapter trained-looking with PEFT itself (lora_B random), saved in PEFT's format."""
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    model.save_pretrained(out)
    return model.eval()


@pytest.fixture(scope="module")
def adapters(hf_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    a = _peft_adapter(hf_dir, root / "a", 1, TARGETS)
    b = _peft_adapter(hf_dir, root / "b", 2, ["q_proj", "v_proj"])
    return {"a": (root / "a", a), "b": (root / "b", b)}


def _ids():
    return torch.randint(0, 131, (2, 9), generator=torch.Generator().manual_seed(3))


def test_adapter_methods_on_the_model_match_peft(hf_dir, adapters):
    ids = _ids()
    model = fastlm.from_pretrained(hf_dir)
    with torch.no_grad():
        base = model(ids)
        model.load_adapter(adapters["a"][0], adapter_name="a")
        model.load_adapter(adapters["b"][0], adapter_name="b")
        assert model.active_adapters() == ["a"] and set(model.peft_config) == {"a", "b"}
        for name in ("a", "b"):
            model.set_adapter(name)
            expected = adapters[name][1](input_ids=ids).logits
            torch.testing.assert_close(model(ids), expected, rtol=1e-4, atol=1e-4)
            generated = fastlm.generate(model, ids, max_new_tokens=4)
            assert generated.shape[1] == ids.shape[1] + 4
        model.disable_adapters()
        torch.testing.assert_close(model(ids), base, rtol=0, atol=0)
        model.enable_adapters()
        torch.testing.assert_close(model(ids), adapters["b"][1](input_ids=ids).logits, rtol=1e-4, atol=1e-4)
        model.delete_adapter("b")
        assert model.active_adapters() == ["a"]
        model.delete_adapter("a")  # the last one: the plain layers and requires_grad come back
    attn = model.layers[0].attn  # q/k/v are one fused layer; the LoRA slices at q_proj, ... are gone
    assert type(attn.qkv_proj) is torch.nn.Linear and not hasattr(attn, "q_proj")
    assert all(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        assert torch.equal(model(ids), base)
    with pytest.raises(ValueError, match="no adapter; load one with model.load_adapter"):
        model.set_adapter("a")


def test_save_pretrained_with_adapters_writes_the_adapter(hf_dir, adapters, tmp_path):
    model = fastlm.from_pretrained(hf_dir)
    model.load_adapter(adapters["a"][0], adapter_name="a")
    model.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "adapter_config.json").exists()
    assert not (tmp_path / "saved" / "config.json").exists()
    hf = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(hf_dir), tmp_path / "saved")
    with torch.no_grad():
        torch.testing.assert_close(model(_ids()), hf.eval()(input_ids=_ids()).logits, rtol=1e-4, atol=1e-4)


def test_errors_and_get_peft_model_keeps_working(hf_dir, adapters):
    model = fastlm.from_pretrained(hf_dir)
    with pytest.raises(ValueError, match="has no adapter"):
        model.disable_adapters()
    model.load_adapter(adapters["b"][0], adapter_name="b")
    with pytest.raises(ValueError, match="unknown adapter 'nope'"):
        model.set_adapter("nope")
    with pytest.raises(ValueError, match="adapter 'b' already exists"):
        model.load_adapter(adapters["b"][0], adapter_name="b")
    wrapped = get_peft_model(fastlm.from_pretrained(hf_dir), LoraConfig(r=2, target_modules=["q_proj"]))
    assert wrapped.adapter_names == ["default"]


def test_add_adapter_trains_only_the_adapter(hf_dir):
    model = fastlm.from_pretrained(hf_dir)
    model.add_adapter(LoraConfig(r=2, target_modules=["q_proj", "v_proj"]), adapter_name="new")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora" in n for n in trainable)


@pytest.mark.parametrize("mode,kwargs", [("int8_weight_only", {}), ("int8_weight_only", {"group_size": 16}),
                                         ("w8a8", {"calibration": True})])
def test_save_pretrained_of_quantized_model_round_trips(hf_dir, tmp_path, mode, kwargs):
    ids = _ids()
    model = fastlm.from_pretrained(hf_dir)
    if kwargs.get("calibration"):
        kwargs = {**kwargs, "calibration": ids}
    quantize(model, mode, **kwargs)
    model.save_pretrained(tmp_path / "q")
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization"]["format"] == "fastlm-int8"
    assert set(config["quantization"]["modules"]) == set(quantized_layers(model))
    with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.layers.0.self_attn.q_proj.weight").dtype == torch.int8
        assert f.get_tensor("model.layers.0.self_attn.q_proj.weight_scale").dtype == torch.float32
    loaded = fastlm.from_pretrained(tmp_path / "q")
    assert set(quantized_layers(loaded)) == set(quantized_layers(model))
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))
    alias = load_quantized(tmp_path / "q")  # the explicit functions stay as aliases
    with torch.no_grad():
        assert torch.equal(alias(ids), model(ids))
    with pytest.raises(TypeError, match="quantized model takes no options"):
        model.save_pretrained(tmp_path / "q2", max_shard_bytes=10)
