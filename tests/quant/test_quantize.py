"""fastlm.quantize on whole models: closeness to the original, generation and evaluation, LoRA on
top, checkpoint round trips (bit-identical outputs), and the errors for bad input."""

import copy
import json

import pytest
import torch
from safetensors import safe_open
from torch import nn

import fastlm
from fastlm.eval import evaluate_loss
from fastlm.quant import (
    Int8WeightOnlyLinear,
    QuantizationError,
    W8A8Linear,
    accuracy_report,
    load_quantized,
    model_bytes,
    quantize,
    quantized_layers,
    save_quantized,
)


def _config(arch="llama", **kw):
    base = dict(arch=arch, vocab_size=256, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=96,
                max_position_embeddings=64)
    if arch == "llama":
        base.update(num_kv_heads=2, tie_word_embeddings=True)
    return fastlm.ModelConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    return fastlm.Model(_config()).eval()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))


def _cosine(a, b):
    return torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


@pytest.mark.parametrize("mode,kwargs", [
    ("int8_weight_only", {}),
    ("int8_weight_only", {"group_size": 16}),
    ("int8_weight_only", {"include_head": True}),
    ("w8a8", {}),
    ("w8a8", {"calibration": "ids"}),
])
def test_quantized_model_is_close_to_the_original(llama, ids, mode, kwargs):
    kwargs = {k: (ids if v == "ids" else v) for k, v in kwargs.items()}
    model = quantize(copy.deepcopy(llama), mode, **kwargs)
    layers = quantized_layers(model)
    expected = 4 * 2 + (1 if kwargs.get("include_head") else 0)  # qkv, o, gate_up, down per block
    assert len(layers) == expected and all(m.mode == mode for m in layers.values())
    assert isinstance(model.embed, nn.Embedding) and model.embed.weight.dtype == torch.float32
    assert ("lm_head" in layers) == bool(kwargs.get("include_head"))
    with torch.no_grad():
        assert _cosine(model(ids), llama(ids)) >= 0.999
    if kwargs.get("calibration") is not None:
        assert all(m.input_smooth is not None for m in layers.values())
        # q/k/v (and gate/up) read one activation: one fused layer, one set of factors
        assert isinstance(model.layers[0].attn.qkv_proj, W8A8Linear)
        assert model.layers[0].mlp.gate_up_proj.input_smooth.shape == (64,)


def test_quantize_head_of_tied_model_unties(llama):
    model = quantize(copy.deepcopy(llama), include_head=True)
    assert model.config.tie_word_embeddings is False and isinstance(model.lm_head, Int8WeightOnlyLinear)
    assert llama.config.tie_word_embeddings is True  # the original is untouched


def test_generation_and_evaluation_work(llama, ids):
    model = quantize(copy.deepcopy(llama), "w8a8")
    out = fastlm.generate(model, ids[:, :5], max_new_tokens=6)
    assert out.shape == (2, 11) and torch.equal(out[:, :5], ids[:, :5])
    stream = torch.randint(0, 256, (400,), generator=torch.Generator().manual_seed(2))
    q_loss = evaluate_loss(model, stream, seq_len=32, batch_size=4)
    f_loss = evaluate_loss(llama, stream, seq_len=32, batch_size=4)
    assert abs(q_loss - f_loss) / f_loss < 0.01


def test_scales_stay_float32_when_the_model_is_cast(llama, ids):
    model = quantize(copy.deepcopy(llama), "w8a8", calibration=ids).to(torch.bfloat16)
    proj = model.layers[0].mlp.down_proj
    assert proj.weight.dtype == torch.int8 and proj.weight_scale.dtype == torch.float32
    assert proj.input_smooth.dtype == torch.float32 and model.dtype == torch.bfloat16
    with torch.no_grad():
        assert model(ids).dtype == torch.bfloat16


def test_skip_and_patterns(llama, caplog):
    with caplog.at_level("WARNING", logger="fastlm.quant.quantize"):
        model = quantize(copy.deepcopy(llama), skip=["layers.*.mlp.down_proj", "layers.0.attn.q_proj"])
    assert type(model.layers[0].mlp.down_proj) is nn.Linear and type(model.layers[1].mlp.down_proj) is nn.Linear
    # q_proj is one weight with k_proj and v_proj: skipping it keeps the fused layer in float, said aloud
    assert type(model.layers[0].attn.qkv_proj) is nn.Linear
    assert "layers.0.attn.q_proj is packed with layers.0.attn.k_proj, layers.0.attn.v_proj" in caplog.text
    assert isinstance(model.layers[1].attn.qkv_proj, Int8WeightOnlyLinear)
    # the skipped layers can be quantized later, the others not twice
    quantize(model, "w8a8", skip=["layers.*.attn.*", "layers.*.mlp.gate_proj", "layers.*.mlp.up_proj"])
    assert isinstance(model.layers[0].mlp.down_proj, W8A8Linear)


def test_lora_runs_on_quantized_layers(llama, ids):
    from fastlm.peft import LoraConfig, get_peft_model

    model = quantize(copy.deepcopy(llama))
    with torch.no_grad():
        base = model(ids)
    peft = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    out = peft(ids)
    assert out.shape == base.shape and not torch.allclose(out, base)
    out.float().pow(2).mean().backward()  # gradients reach the adapters through the int8 layers
    grads = [p.grad for n, p in peft.named_parameters() if "lora_" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


def test_quantize_a_lora_wrapped_model(llama, ids):
    from fastlm.peft import LoraConfig, get_peft_model

    peft = get_peft_model(copy.deepcopy(llama), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    with torch.no_grad():
        before = peft(ids)
    quantize(peft)
    layers = quantized_layers(peft)
    assert "model.layers.0.attn.qkv_proj.base" in layers and not any("lm_head" in n for n in layers)
    with torch.no_grad():
        assert _cosine(peft(ids), before) >= 0.999


# ---- checkpoints ------------------------------------------------------------------------------


@pytest.mark.parametrize("arch,mode,kwargs", [
    ("llama", "int8_weight_only", {}),
    ("llama", "int8_weight_only", {"group_size": 32, "include_head": True}),
    ("llama", "w8a8", {"calibration": True}),
    ("gpt2", "int8_weight_only", {"group_size": 16}),
    ("gpt2", "w8a8", {"calibration": True}),
])
def test_checkpoint_round_trip_is_identical(tmp_path, ids, arch, mode, kwargs):
    torch.manual_seed(3)
    model = fastlm.Model(_config(arch)).eval()
    if kwargs.get("calibration"):
        kwargs["calibration"] = ids
    model = quantize(model, mode, **kwargs).to(torch.bfloat16)
    save_quantized(model, tmp_path)
    loaded = load_quantized(tmp_path)
    assert loaded.dtype == torch.bfloat16
    assert {n: type(m) for n, m in quantized_layers(loaded).items()} == {
        n: type(m) for n, m in quantized_layers(model).items()}
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))
    hf = json.loads((tmp_path / "config.json").read_text())
    entry = hf["quantization"]
    assert entry["format"] == "fastlm-int8" and entry["dtype"] == "bfloat16"
    assert set(entry["modules"]) == set(quantized_layers(model))
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        names = list(f.keys())
        weight = "model.layers.0.mlp.down_proj.weight" if arch == "llama" else "transformer.h.0.mlp.c_proj.weight"
        assert f.get_tensor(weight).dtype == torch.int8
        assert f.get_tensor(weight + "_scale").dtype == torch.float32
    assert any(n.endswith("input_smooth") for n in names) == bool(kwargs.get("calibration") is not None)


def test_checkpoint_errors(tmp_path, llama):
    with pytest.raises(ValueError, match="no quantized layer"):
        save_quantized(llama, tmp_path / "plain")
    llama.save_pretrained(tmp_path / "plain")
    with pytest.raises(fastlm.CheckpointError, match="not a quantized checkpoint"):
        load_quantized(tmp_path / "plain")
    gpt2 = quantize(fastlm.Model(_config("gpt2")), skip=["layers.0.attn.k_proj"])  # c_attn stays float
    assert type(gpt2.layers[0].attn.qkv_proj) is nn.Linear
    save_quantized(gpt2, tmp_path / "gpt2")
    assert type(load_quantized(tmp_path / "gpt2").layers[0].attn.qkv_proj) is nn.Linear
    model = quantize(copy.deepcopy(llama))
    save_quantized(model, tmp_path / "q")
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    fused = config["quantization"]["modules"].pop("layers.0.attn.qkv_proj")
    config["quantization"]["modules"]["layers.0.attn.q_proj"] = fused  # k_proj, v_proj not listed
    (tmp_path / "q" / "config.json").write_text(json.dumps(config))
    with pytest.raises(fastlm.CheckpointError, match=r"q_proj, layers.0.attn.k_proj, layers.0.attn.v_proj are one "
                                                     r"fused layer .*must list all of them"):
        load_quantized(tmp_path / "q")
    del config["quantization"]["modules"]["layers.0.attn.q_proj"]
    config["quantization"]["modules"]["layers.0.attn.qkv_proj"] = fused
    config["quantization"]["modules"]["layers.0.mlp.down_proj"]["group_size"] = 16  # scales are per channel
    (tmp_path / "q" / "config.json").write_text(json.dumps(config))
    with pytest.raises(fastlm.CheckpointError, match="weight_scale.*shape"):
        load_quantized(tmp_path / "q")


def test_version_1_checkpoint_with_projections_named_apart_loads(tmp_path, ids):
    """Files written before q/k/v and gate/up were fused list them apart in "modules"."""
    torch.manual_seed(4)
    model = quantize(fastlm.Model(_config()).eval(), "w8a8", calibration=ids)
    save_quantized(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    entry = config["quantization"]
    assert entry["version"] == 2
    for i in range(2):
        for fused, parts in ((f"layers.{i}.attn.qkv_proj", ("q_proj", "k_proj", "v_proj")),
                             (f"layers.{i}.mlp.gate_up_proj", ("gate_proj", "up_proj"))):
            spec = entry["modules"].pop(fused)
            for part in parts:
                entry["modules"][fused.rsplit(".", 1)[0] + "." + part] = spec
    entry["version"] = 1
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = load_quantized(tmp_path)
    assert set(quantized_layers(loaded)) == set(quantized_layers(model))
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:  # Hugging Face's names, q/k/v apart
        assert f.get_tensor("model.layers.0.self_attn.k_proj.weight").shape == (32, 64)
        assert f.get_tensor("model.layers.0.self_attn.k_proj.weight_scale").shape == (32,)
        assert torch.equal(f.get_tensor("model.layers.0.self_attn.q_proj.input_smooth"),
                           f.get_tensor("model.layers.0.self_attn.v_proj.input_smooth"))


# ---- errors -----------------------------------------------------------------------------------


def test_errors(llama, ids):
    model = copy.deepcopy(llama)
    with pytest.raises(ValueError, match="mode must be one of"):
        quantize(model, "int4")
    with pytest.raises(ValueError, match="group_size applies to mode='int8_weight_only'"):
        quantize(model, "w8a8", group_size=32)
    with pytest.raises(ValueError, match="calibration"):
        quantize(model, "int8_weight_only", calibration=ids)
    with pytest.raises(ValueError, match="match no linear layer"):
        quantize(model, skip=["layers.0.attn.qproj"])
    with pytest.raises(QuantizationError, match="does not divide"):
        quantize(model, group_size=48)
    quantize(model)
    with pytest.raises(QuantizationError, match="already quantized"):
        quantize(model)
    bad = nn.Linear(4, 3)
    bad.weight = nn.Parameter(torch.randn(3, 4, 1))
    with pytest.raises(QuantizationError, match="2-D weight"):
        Int8WeightOnlyLinear.from_linear(bad, name="bad")
    q = torch.zeros(5, 8, dtype=torch.int8)
    with pytest.raises(QuantizationError, match="weight_scale of shape"):
        Int8WeightOnlyLinear(q, torch.ones(5, 3), None)
    with pytest.raises(QuantizationError, match="weight_scale of shape"):
        W8A8Linear(q, torch.ones(5, 2), None)
    with pytest.raises(QuantizationError, match="input_smooth"):
        W8A8Linear(q, torch.ones(5), None, torch.ones(7))


def test_accuracy_report_and_memory(llama, ids):
    stream = torch.randint(0, 256, (300,), generator=torch.Generator().manual_seed(4))
    rows = accuracy_report(llama, stream, seq_len=32, batch_size=4, max_batches=1, calibration=ids,
                           variants=("bf16", "int8_weight_only", "w8a8", "w8a8_smoothquant"))
    assert [r["variant"] for r in rows] == ["bfloat16", "int8_weight_only", "w8a8", "w8a8_smoothquant"]
    assert rows[0]["delta_pct"] == 0.0 and all(r["perplexity"] > 1 for r in rows)
    assert rows[1]["weight_mb"] < rows[0]["weight_mb"]
    quantized = quantize(copy.deepcopy(llama))
    layers = quantized_layers(quantized).values()
    saved = sum(3 * m.weight.numel() - 4 * m.out_features for m in layers)  # fp32 -> int8 + fp32 scales
    assert model_bytes(llama) - model_bytes(quantized) == saved


# ---- GPU ----------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["int8_weight_only", "w8a8"])
def test_quantized_model_gpu(tmp_path, mode):
    torch.manual_seed(5)
    model = fastlm.Model(_config(hidden_size=256, intermediate_size=512, num_heads=8)).cuda().to(torch.bfloat16).eval()
    ids = torch.randint(0, 256, (4, 48), device="cuda")
    with torch.no_grad():
        ref = model(ids)
        q = quantize(copy.deepcopy(model), mode, calibration=ids if mode == "w8a8" else None)
        out = q(ids)  # automatic backend: triton/cuda kernels
        assert _cosine(out, ref) >= 0.999
        with fastlm.use_backend("reference"):
            torch.testing.assert_close(out.float(), q(ids).float(), atol=0.1, rtol=0.05)
    save_quantized(q, tmp_path)
    with torch.no_grad():
        assert torch.equal(load_quantized(tmp_path, device="cuda")(ids), q(ids))
    assert fastlm.generate(q, ids[:, :8], max_new_tokens=8).shape == (4, 16)
