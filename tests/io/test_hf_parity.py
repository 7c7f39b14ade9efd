"""Parity with transformers on identical weights, and checkpoint round trips both ways."""

import json

import pytest
import torch

import fastlm
from fastlm.io import CheckpointError

transformers = pytest.importorskip("transformers")


def _hf_llama(**overrides):
    config = dict(vocab_size=131, hidden_size=64, intermediate_size=112, num_hidden_layers=3, num_attention_heads=8,
                  num_key_value_heads=2, max_position_embeddings=96, rope_theta=5000.0, rms_norm_eps=1e-5,
                  tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    config.update(overrides)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**config))


def _hf_gpt2(**overrides):
    config = dict(vocab_size=131, n_embd=64, n_layer=3, n_head=4, n_positions=96, bos_token_id=1, eos_token_id=2)
    config.update(overrides)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**config))


HF_MODELS = {
    "llama-gqa": lambda: _hf_llama(),
    "llama-mqa-tied-bias": lambda: _hf_llama(num_key_value_heads=1, tie_word_embeddings=True, attention_bias=True,
                                              mlp_bias=True, head_dim=16),
    "llama-mha": lambda: _hf_llama(num_key_value_heads=8),
    "gpt2": lambda: _hf_gpt2(),
}


def _randomize(model):
    """Non-trivial norms and biases too (transformers initializes them to 1 and 0)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name or "ln" in name else 0.0))
    return model.eval()


@pytest.fixture(params=list(HF_MODELS), scope="module")
def pair(request, tmp_path_factory):
    torch.manual_seed(0)
    hf = _randomize(HF_MODELS[request.param]())
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    return hf, fastlm.from_pretrained(path), path


@pytest.mark.parametrize("shape", [(1, 1), (1, 37), (3, 17), (2, 96)])
@torch.no_grad()
def test_logits_match_transformers(pair, shape):
    hf, ours, _ = pair
    ids = torch.randint(0, 131, shape, generator=torch.Generator().manual_seed(1))
    diff = (hf(ids).logits - ours(ids)).abs().max().item()
    assert diff <= 1e-4


@torch.no_grad()
def test_greedy_generation_matches_transformers(pair):
    hf, ours, _ = pair
    prompt = torch.randint(3, 131, (2, 5), generator=torch.Generator().manual_seed(2))
    expected = hf.generate(prompt, max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0,
                           attention_mask=torch.ones_like(prompt))
    assert torch.equal(fastlm.generate(ours, prompt, max_new_tokens=32), expected)


@torch.no_grad()
def test_saved_checkpoint_loads_in_transformers(pair, tmp_path):
    hf, ours, _ = pair
    ours.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 131, (2, 13))
    assert (reloaded(ids).logits - hf(ids).logits).abs().max().item() == 0.0
    again = fastlm.from_pretrained(tmp_path)
    assert (again(ids) - ours(ids)).abs().max().item() == 0.0


def test_sharded_save_and_load(pair, tmp_path):
    _, ours, _ = pair
    ours.save_pretrained(tmp_path, max_shard_bytes=60_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2 and not (tmp_path / "model.safetensors").exists()
    reloaded = fastlm.from_pretrained(tmp_path)
    ids = torch.randint(0, 131, (1, 9))
    torch.testing.assert_close(reloaded(ids), ours(ids), atol=0, rtol=0)
    # Saving unsharded over it removes the stale index.
    ours.save_pretrained(tmp_path)
    assert not (tmp_path / "model.safetensors.index.json").exists()
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert hf is not None


def test_dtype_and_device_arguments(pair):
    _, _, path = pair
    model = fastlm.from_pretrained(path, dtype=torch.bfloat16, device="cpu")
    assert model.dtype == torch.bfloat16 and model.device.type == "cpu"
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    if model.config.tie_word_embeddings:
        assert model.lm_head.weight is model.embed.weight


def _copy_checkpoint(src, dst, edit):
    """Write an edited copy of a checkpoint: edit(config_dict, tensors) mutates both."""
    from safetensors.torch import load_file, save_file

    config = json.loads((src / "config.json").read_text())
    tensors = load_file(src / "model.safetensors")
    edit(config, tensors)
    dst.mkdir(exist_ok=True)
    (dst / "config.json").write_text(json.dumps(config))
    save_file(tensors, dst / "model.safetensors")
    return dst


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    _hf_llama().save_pretrained(path)
    return path


def test_missing_tensor_is_named(llama_dir, tmp_path):
    path = _copy_checkpoint(llama_dir, tmp_path / "c", lambda c, t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match="missing tensor 'model.layers.1.mlp.up_proj.weight'"):
        fastlm.from_pretrained(path)


def test_extra_tensor_is_named(llama_dir, tmp_path):
    path = _copy_checkpoint(llama_dir, tmp_path / "c", lambda c, t: t.update({"model.extra.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match="unexpected tensor.*'model.extra.weight'"):
        fastlm.from_pretrained(path)


def test_misshaped_tensor_is_named(llama_dir, tmp_path):
    def edit(config, tensors):
        tensors["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(3, 64)

    path = _copy_checkpoint(llama_dir, tmp_path / "c", edit)
    with pytest.raises(CheckpointError, match=r"'layers.0.attn.k_proj.weight' has shape \(3, 64\), expected \(16, 64\)"):
        fastlm.from_pretrained(path)


def test_unknown_architecture(llama_dir, tmp_path):
    def edit(config, tensors):
        config["architectures"] = ["FalconForCausalLM"]
        config["model_type"] = "falcon"

    path = _copy_checkpoint(llama_dir, tmp_path / "c", edit)
    with pytest.raises(ValueError, match="unsupported architecture.*FalconForCausalLM.*LlamaForCausalLM.*"
                                         "Gemma3ForCausalLM.*GPT2LMHeadModel"):
        fastlm.from_pretrained(path)


@pytest.mark.parametrize("arch,extra", [("MixtralForCausalLM", {"num_local_experts": 8}),
                                        ("Qwen2MoeForCausalLM", {"num_experts": 60})])
def test_mixture_of_experts_is_refused(llama_dir, tmp_path, arch, extra):
    def edit(config, tensors):
        config.update(architectures=[arch], **extra)

    path = _copy_checkpoint(llama_dir, tmp_path / "c", edit)
    with pytest.raises(ValueError, match=f"unsupported architecture.*{arch}.*mixture-of-experts"):
        fastlm.from_pretrained(path)


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_gptq_awq_checkpoints_are_refused(llama_dir, tmp_path, method):
    path = _copy_checkpoint(llama_dir, tmp_path / "c",
                            lambda c, t: c.update(quantization_config={"quant_method": method, "bits": 4}))
    with pytest.raises(CheckpointError, match=f"{method}-quantized checkpoint.*GPTQ/AWQ"):
        fastlm.from_pretrained(path)


def test_config_missing_a_field(llama_dir, tmp_path):
    path = _copy_checkpoint(llama_dir, tmp_path / "c", lambda c, t: c.pop("hidden_size"))
    with pytest.raises(ValueError, match="config.json lacks the required field 'hidden_size'"):
        fastlm.from_pretrained(path)


def test_unsupported_rope_scaling(llama_dir, tmp_path):
    def edit(config, tensors):
        config["rope_scaling"] = {"rope_type": "mrope", "factor": 4.0}
        config.pop("rope_parameters", None)

    path = _copy_checkpoint(llama_dir, tmp_path / "c", edit)
    with pytest.raises(NotImplementedError, match="rope scaling of type 'mrope' is not supported.*llama3"):
        fastlm.from_pretrained(path)


def test_legacy_inv_freq_buffers_are_ignored(llama_dir, tmp_path):
    def edit(config, tensors):
        for i in range(3):
            tensors[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = torch.ones(4)

    path = _copy_checkpoint(llama_dir, tmp_path / "c", edit)
    ids = torch.randint(0, 131, (1, 9))
    torch.testing.assert_close(fastlm.from_pretrained(path)(ids), fastlm.from_pretrained(llama_dir)(ids), atol=0, rtol=0)


@torch.no_grad()
def test_tied_config_with_a_different_stored_head_follows_transformers(tmp_path, caplog):
    """tie_word_embeddings=true but the file stores another lm_head: transformers unties and
    uses the stored head (with a warning); fastlm does the same and warns."""
    src = tmp_path / "src"
    _randomize(_hf_llama(tie_word_embeddings=True)).save_pretrained(src)
    head = torch.randn(131, 64, generator=torch.Generator().manual_seed(3))
    path = _copy_checkpoint(src, tmp_path / "c", lambda c, t: t.update({"lm_head.weight": head}))
    with caplog.at_level("WARNING", logger="fastlm.io.hf_format"):
        ours = fastlm.from_pretrained(path)
    assert "NOT tied" in caplog.text
    assert not ours.config.tie_word_embeddings and torch.equal(ours.lm_head.weight, head)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    ids = torch.randint(0, 131, (2, 11))
    assert (hf(ids).logits - ours(ids)).abs().max().item() <= 1e-4
    # the same values stored twice stay tied
    same = _copy_checkpoint(src, tmp_path / "d", lambda c, t: t.update({"lm_head.weight": t["model.embed_tokens.weight"].clone()}))
    tied = fastlm.from_pretrained(same)
    assert tied.config.tie_word_embeddings and tied.lm_head.weight is tied.embed.weight


def test_mixed_dtype_checkpoint_loads_in_the_config_dtype(llama_dir, tmp_path):
    def edit(config, tensors):
        config["torch_dtype"] = "bfloat16"
        config.pop("dtype", None)
        for name in list(tensors)[::2]:
            tensors[name] = tensors[name].to(torch.float16)

    path = _copy_checkpoint(llama_dir, tmp_path / "c", edit)
    model = fastlm.from_pretrained(path)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    # transformers 5 writes "dtype"
    path2 = _copy_checkpoint(path, tmp_path / "d", lambda c, t: c.update(dtype="float16", torch_dtype=None))
    assert {p.dtype for p in fastlm.from_pretrained(path2).parameters()} == {torch.float16}
    assert fastlm.from_pretrained(path2, dtype=torch.float32).dtype == torch.float32


def test_pickle_only_checkpoint_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match="safetensors only"):
        fastlm.io.checkpoint.read_safetensors(tmp_path)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        fastlm.from_pretrained(tmp_path / "nowhere")


def test_gpt2_checkpoint_without_base_prefix_and_with_mask_buffers(tmp_path):
    """The original GPT-2 files store GPT2Model names (no 'transformer.') and attn.bias masks."""
    src = tmp_path / "src"
    _hf_gpt2().save_pretrained(src)

    def edit(config, tensors):
        for name in list(tensors):
            if name.startswith("transformer."):
                tensors[name.removeprefix("transformer.")] = tensors.pop(name)
        tensors["h.0.attn.bias"] = torch.ones(1, 1, 96, 96)

    path = _copy_checkpoint(src, tmp_path / "c", edit)
    model = fastlm.from_pretrained(path)
    hf = transformers.GPT2LMHeadModel.from_pretrained(src).eval()
    ids = torch.randint(0, 131, (1, 8))
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max().item() <= 1e-4
