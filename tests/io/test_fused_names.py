"""Hugging Face names for fastlm's fused projections, both ways: q/k/v and gate/up saved apart
(fused as Phi-3 and GPT-2's c_attn store them), loaded back bit for bit, and a transformers
checkpoint loaded, saved and compared tensor by tensor."""

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import fastlm
from fastlm.io.hf_format import hf_parts, state_dict_from_hf, state_dict_to_hf

transformers = pytest.importorskip("transformers")

BASE = dict(vocab_size=97, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=80,
            max_position_embeddings=64)
ARCHS = {
    "llama": dict(arch="llama", num_kv_heads=2),
    "qwen2": dict(arch="qwen2", num_kv_heads=2, qkv_bias=True),
    "qwen3": dict(arch="qwen3", num_kv_heads=2, qk_norm="head"),
    "phi3": dict(arch="phi3", num_kv_heads=2),
    "gpt2": dict(arch="gpt2"),
}


def _model(arch):
    torch.manual_seed(0)
    model = fastlm.Model(fastlm.ModelConfig(**{**BASE, **ARCHS[arch]}))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("arch", list(ARCHS))
def test_save_load_round_trip_is_bit_exact(arch, tmp_path):
    model = _model(arch)
    model.save_pretrained(tmp_path / "a")
    names = set(load_file(str(tmp_path / "a" / "model.safetensors")))
    if arch in ("llama", "qwen2", "qwen3"):
        assert {"model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
                "model.layers.0.self_attn.v_proj.weight", "model.layers.1.mlp.gate_proj.weight",
                "model.layers.1.mlp.up_proj.weight"} <= names
        assert not any("qkv_proj" in n or "gate_up_proj" in n for n in names)
    if arch == "qwen2":
        assert "model.layers.0.self_attn.k_proj.bias" in names
    if arch == "phi3":
        assert {"model.layers.0.self_attn.qkv_proj.weight", "model.layers.0.mlp.gate_up_proj.weight"} <= names
    if arch == "gpt2":
        assert {"transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_attn.bias"} <= names
    loaded = fastlm.from_pretrained(tmp_path / "a")
    original = model.state_dict()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, original[name]), name
    loaded.save_pretrained(tmp_path / "b")
    first, second = (load_file(str(tmp_path / d / "model.safetensors")) for d in "ab")
    assert first.keys() == second.keys() and all(torch.equal(first[n], second[n]) for n in first)


def test_hf_rows_are_the_fused_blocks():
    """Hugging Face's k_proj is rows q_out:q_out+kv_out of qkv_proj; gate/up halves of gate_up_proj;
    GPT-2's c_attn is qkv_proj transposed."""
    model = _model("qwen2")
    hf = state_dict_to_hf(model.config, model.state_dict())
    attn, mlp = model.layers[1].attn, model.layers[1].mlp
    assert torch.equal(hf["model.layers.1.self_attn.k_proj.weight"], attn.qkv_proj.weight[64:96])
    assert torch.equal(hf["model.layers.1.self_attn.v_proj.bias"], attn.qkv_proj.bias[96:128])
    assert torch.equal(hf["model.layers.1.mlp.up_proj.weight"], mlp.gate_up_proj.weight[80:])
    parts = hf_parts(model.config)
    assert parts["layers.1.attn.qkv_proj.weight"] == [("model.layers.1.self_attn.q_proj.weight", 0, 64),
                                                      ("model.layers.1.self_attn.k_proj.weight", 64, 96),
                                                      ("model.layers.1.self_attn.v_proj.weight", 96, 128)]
    gpt2 = _model("gpt2")
    hf = state_dict_to_hf(gpt2.config, gpt2.state_dict())
    assert torch.equal(hf["transformer.h.0.attn.c_attn.weight"], gpt2.layers[0].attn.qkv_proj.weight.t())
    back = state_dict_from_hf(gpt2.config, hf)
    assert torch.equal(back["layers.0.attn.qkv_proj.weight"], gpt2.layers[0].attn.qkv_proj.weight)


def test_transformers_checkpoint_loads_and_saves_the_same_tensors(tmp_path):
    torch.manual_seed(1)
    config = transformers.Qwen2Config(vocab_size=97, hidden_size=64, intermediate_size=80, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    transformers.Qwen2ForCausalLM(config).save_pretrained(tmp_path / "hf")
    fastlm.from_pretrained(tmp_path / "hf").save_pretrained(tmp_path / "ours")
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        theirs = {n: f.get_tensor(n) for n in f.keys()}
    ours = load_file(str(tmp_path / "ours" / "model.safetensors"))
    assert set(ours) == set(theirs) - {"lm_head.weight"} or set(ours) == set(theirs)
    assert all(torch.equal(ours[n], theirs[n]) for n in ours)
