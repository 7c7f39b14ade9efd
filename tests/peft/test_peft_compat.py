"""PEFT compatibility in both directions, on identical weights (transformers model saved, then
loaded with fastlm.from_pretrained): an adapter trained with PEFT gives the same outputs in
fastlm, and one saved by fastlm loads in PEFT with the same outputs (1e-4 in float32)."""

import json
import warnings

import pytest
import torch

import fastlm
from fastlm.peft import LoraConfig, LoraModel, PromptTuningConfig, PromptTuningModel

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TOL = 1e-4
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]


def _hf(kind):
    torch.manual_seed(0)
    if kind == "llama":
        config = transformers.LlamaConfig(vocab_size=131, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                                          num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=96)
        return transformers.LlamaForCausalLM(config).eval()
    config = transformers.GPT2Config(vocab_size=131, n_embd=64, n_layer=2, n_head=4, n_positions=96, bos_token_id=1,
                                     eos_token_id=2)
    return transformers.GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def base(request, tmp_path_factory):
    """(kind, directory of the saved transformers model)."""
    path = tmp_path_factory.mktemp(request.param)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _hf(request.param).save_pretrained(path)
    return request.param, path


def _hf_model(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path).eval()


def _randomize_b(model, seed=0):
    """PEFT initializes lora_B to zero; give it values so the adapter matters."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    return model


def _ids(b=2, t=11):
    return torch.randint(0, 131, (b, t), generator=torch.Generator().manual_seed(3))


@torch.no_grad()
def test_peft_adapter_gives_same_outputs_in_fastlm(base, tmp_path):
    kind, path = base
    targets = LLAMA_TARGETS if kind == "llama" else GPT2_TARGETS
    patterns = ({"o_proj": 2}, {"v_proj": 3}) if kind == "llama" else ({"c_fc": 2}, {"c_proj": 5})
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, rank_pattern=patterns[0],
                             alpha_pattern=patterns[1], task_type="CAUSAL_LM")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = _randomize_b(peft.get_peft_model(_hf_model(path), config)).eval()
        theirs.save_pretrained(tmp_path)
    ours = LoraModel(fastlm.from_pretrained(path))
    ours.load_adapter(tmp_path, adapter_name="task")
    assert ours.active_adapter == "task" and ours.get_nb_trainable_parameters()[0] == 0  # loaded frozen
    ids = _ids()
    assert (ours(ids) - theirs(ids).logits).abs().max().item() <= TOL
    if kind == "gpt2":  # c_attn's lora_A is shared by q, k and v
        attn = ours.model.layers[0].attn
        assert attn.q_proj.lora_A["task"] is attn.v_proj.lora_A["task"]


@torch.no_grad()
def test_fastlm_adapter_loads_in_peft_with_same_outputs(base, tmp_path):
    kind, path = base
    targets = LLAMA_TARGETS if kind == "llama" else GPT2_TARGETS
    ours = LoraModel(fastlm.from_pretrained(path),
                     LoraConfig(r=3, lora_alpha=5, target_modules=targets, init_lora_weights=False,
                                rank_pattern={"down_proj" if kind == "llama" else "c_fc": 2}), "mine")
    ours.save_adapter(tmp_path, "mine")
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and sorted(saved["target_modules"]) == sorted(targets)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(_hf_model(path), tmp_path).eval()
    ids = _ids()
    assert (ours(ids) - theirs(ids).logits).abs().max().item() <= TOL
    # and PEFT's merge of our adapter agrees too
    merged = theirs.merge_and_unload()
    assert (ours(ids) - merged(ids).logits).abs().max().item() <= TOL


@torch.no_grad()
def test_rslora_and_partial_targets_round_trip(base, tmp_path):
    kind, path = base
    targets = ["q_proj", "v_proj"] if kind == "llama" else ["c_proj"]
    ours = LoraModel(fastlm.from_pretrained(path), LoraConfig(r=4, lora_alpha=6, use_rslora=True,
                                                              target_modules=targets, layers_to_transform=[1],
                                                              init_lora_weights=False))
    ours.save_adapter(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(_hf_model(path), tmp_path).eval()
    ids = _ids()
    assert (ours(ids) - theirs(ids).logits).abs().max().item() <= TOL
    again = LoraModel(fastlm.from_pretrained(path))
    again.load_adapter(tmp_path)
    assert torch.equal(again(ids), ours(ids))


def test_gpt2_qkv_subset_cannot_be_saved_as_peft(tmp_path):
    model = fastlm.Model(fastlm.ModelConfig(arch="gpt2", vocab_size=50, hidden_size=32, num_layers=1, num_heads=4))
    lora = LoraModel(model, LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"cannot save as PEFT's transformer.h.0.attn.c_attn: .*k_proj"):
        lora.save_adapter(tmp_path)


def test_adapter_for_another_base_names_the_module(base, tmp_path):
    kind, path = base
    other = fastlm.Model(fastlm.from_pretrained(path).config.replace(hidden_size=32, intermediate_size=48,
                                                                      head_dim=None if kind == "gpt2" else 4))
    LoraModel(other, LoraConfig(r=2, target_modules=["q_proj", "v_proj"] if kind == "llama" else ["c_attn"]),
              ).save_adapter(tmp_path)
    ours = LoraModel(fastlm.from_pretrained(path))
    with pytest.raises(ValueError, match=r"does not fit module layers.0.attn.q_proj .*different base model"):
        ours.load_adapter(tmp_path)
    assert ours.adapter_names == [] and not ours.lora_modules()  # nothing half-installed


def test_unsupported_or_foreign_adapters_are_refused(tmp_path):
    model = fastlm.Model(fastlm.ModelConfig(arch="llama", vocab_size=50, hidden_size=32, num_layers=1, num_heads=4))
    lora = LoraModel(model, LoraConfig(r=2, target_modules=["q_proj"]))
    lora.save_adapter(tmp_path)
    config_file = tmp_path / "adapter_config.json"
    config = json.loads(config_file.read_text())
    for key, value, match in [("use_dora", True, "use_dora=True is not supported"),
                              ("modules_to_save", ["lm_head"], "modules_to_save"),
                              ("peft_type", "IA3", "expected a LoRA adapter")]:
        config_file.write_text(json.dumps({**config, key: value}))
        with pytest.raises(ValueError, match=match):
            lora.load_adapter(tmp_path, "x")
    config_file.write_text(json.dumps(config))
    from safetensors.torch import load_file, save_file

    tensors = load_file(tmp_path / "adapter_model.safetensors")
    renamed = {k.replace("layers.0.self_attn.q_proj", "layers.0.self_attn.qkv"): v for k, v in tensors.items()}
    save_file(renamed, tmp_path / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="targets module 'model.layers.0.self_attn.qkv', which this llama model"):
        lora.load_adapter(tmp_path, "x")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        lora.load_adapter(tmp_path / "missing", "y")


@torch.no_grad()
def test_prompt_tuning_matches_peft_both_ways(base, tmp_path):
    kind, path = base
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(_hf_model(path), peft.PromptTuningConfig(num_virtual_tokens=5,
                                                                                 task_type="CAUSAL_LM")).eval()
        theirs.save_pretrained(tmp_path / "peft")
    ours = PromptTuningModel(fastlm.from_pretrained(path))
    ours.load_adapter(tmp_path / "peft", "task")
    ids = _ids()
    assert (ours(ids) - theirs(ids).logits[:, 5:]).abs().max().item() <= TOL  # PEFT returns the virtual positions too
    ours.add_adapter("mine", PromptTuningConfig(num_virtual_tokens=3, init="random"))
    ours.save_adapter(tmp_path / "mine", "mine")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(_hf_model(path), tmp_path / "mine").eval()
    assert (ours(ids, adapter_names=["mine"] * 2) - loaded(ids).logits[:, 3:]).abs().max().item() <= TOL
