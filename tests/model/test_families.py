"""Every supported family against transformers: small random models built with transformers
from the published config values (scaled down: 2 layers, hidden 64; windows, original
context lengths and soft-caps scaled so that they act on short prompts), every parameter
perturbed. fp32 logits within 1e-4, 32 greedy tokens identical (through the KV cache), and
save -> transformers load -> the same logits."""

import json

import pytest
import torch

import fastlm
from fastlm.io.families import config_from_hf, config_to_hf

transformers = pytest.importorskip("transformers")

VOCAB = 128
SMALL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0,
             initializer_range=0.1)


def _longrope(n):
    return dict(rope_type="longrope", original_max_position_embeddings=16,
                short_factor=[1.0 + 0.05 * i for i in range(n)], long_factor=[1.5 + 0.4 * i for i in range(n)])


# name -> (transformers config class, config values): published values, scaled down
FAMILIES = {
    # Llama-3.2-1B: rope_theta 5e5, llama3 scaling (factor 32, original 8192 -> 16), tied head
    "llama3.2": ("LlamaConfig", dict(SMALL, rope_theta=500000.0, tie_word_embeddings=True, head_dim=16, rms_norm_eps=1e-5,
                                     rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0,
                                                       high_freq_factor=4.0, original_max_position_embeddings=16))),
    "llama-linear": ("LlamaConfig", dict(SMALL, rope_scaling=dict(rope_type="linear", factor=4.0))),
    "llama-dynamic": ("LlamaConfig", dict(SMALL, max_position_embeddings=24,
                                          rope_scaling=dict(rope_type="dynamic", factor=3.0))),
    # Mistral-7B-v0.1: sliding window 4096 -> 8 on every layer
    "mistral": ("MistralConfig", dict(SMALL, sliding_window=8, rope_theta=10000.0)),
    # Qwen2.5-0.5B: q/k/v biases, tied, theta 1e6, no sliding window
    "qwen2.5": ("Qwen2Config", dict(SMALL, tie_word_embeddings=True, rope_theta=1000000.0, use_sliding_window=False,
                                    sliding_window=32768, max_window_layers=21)),
    # Qwen2 with use_sliding_window (layers >= max_window_layers slide) and YaRN (Qwen2.5 long context)
    "qwen2-window-yarn": ("Qwen2Config", dict(SMALL, use_sliding_window=True, sliding_window=8, max_window_layers=1,
                                              rope_scaling=dict(rope_type="yarn", factor=4.0,
                                                                original_max_position_embeddings=16))),
    # Qwen3-0.6B: head_dim 128 (not hidden/heads: here 24), per-head q/k RMSNorm, tied
    "qwen3": ("Qwen3Config", dict(SMALL, head_dim=24, tie_word_embeddings=True, rope_theta=1000000.0)),
    # gemma-2-2b: head_dim 256, query_pre_attn_scalar 256 (-> 24), soft-caps 50/30 (-> 2/5 so that
    # they bend these small scores), window 4096 -> 8 on alternate layers, (1+w) norms, sandwich
    "gemma2": ("Gemma2Config", dict(SMALL, head_dim=16, query_pre_attn_scalar=24, attn_logit_softcapping=2.0,
                                    final_logit_softcapping=5.0, sliding_window=8,
                                    hidden_activation="gelu_pytorch_tanh")),
    # gemma-3-4b text: q/k norms, local theta 1e4 / global 1e6 with linear scaling 8, pattern 6 -> 2
    "gemma3": ("Gemma3TextConfig", dict(SMALL, head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
                                        layer_types=["sliding_attention", "full_attention"],
                                        rope_parameters={"full_attention": dict(rope_type="linear", factor=8.0,
                                                                                rope_theta=1000000.0),
                                                         "sliding_attention": dict(rope_type="default",
                                                                                   rope_theta=10000.0)})),
    # Phi-3-mini-128k: fused qkv/gate_up, longrope (original 4096 -> 16)
    "phi3-longrope": ("Phi3Config", dict(SMALL, original_max_position_embeddings=16, rope_scaling=_longrope(8))),
    # Phi-3-mini-4k: sliding window 2047 -> 8
    "phi3-window": ("Phi3Config", dict(SMALL, sliding_window=8)),
    # Phi-4-mini: partial rotary 0.75, longrope, tied
    "phi4-mini": ("Phi3Config", dict(SMALL, partial_rotary_factor=0.75, tie_word_embeddings=True,
                                     original_max_position_embeddings=16, rope_scaling=_longrope(6))),
    # OLMo-2-1124-7B: post-norms, q/k RMSNorm over the whole projection, theta 5e5
    "olmo2": ("Olmo2Config", dict(SMALL, rope_theta=500000.0, rms_norm_eps=1e-6)),
}
GPT2 = dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2,
            initializer_range=0.1)
FAMILIES.update({
    "gpt2-gelu": ("GPT2Config", dict(GPT2, activation_function="gelu")),
    "gpt2-gelu_fast-inverse-layer": ("GPT2Config", dict(GPT2, activation_function="gelu_fast",
                                                        scale_attn_by_inverse_layer_idx=True)),
})
LONG = 40  # longer than every window (8) and original context (16); dynamic: beyond max_position_embeddings


def _perturb(model):
    """Every parameter moved off its initial value (norms 1 or 0, biases 0), so a dropped one shows."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.add_(torch.randn(p.shape, generator=gen) * (0.1 if p.dim() == 1 else 0.02))
    return model.eval()


@pytest.fixture(scope="module", params=list(FAMILIES))
def pair(request, tmp_path_factory):
    cls, values = FAMILIES[request.param]
    config = getattr(transformers, cls)(**values)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    hf = _perturb(transformers.AutoModelForCausalLM.from_config(config))
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    return request.param, hf, fastlm.from_pretrained(path), path


def _ids(shape, seed):
    return torch.randint(3, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_logits_match_transformers(pair):
    name, hf, ours, _ = pair
    for shape in ((1, 1), (2, 13), (2, LONG)):
        ids = _ids(shape, 1)
        diff = (hf(ids).logits - ours(ids)).abs().max().item()
        assert diff <= 1e-4, (name, shape, diff)


@torch.no_grad()
def test_cached_decoding_matches_transformers(pair):
    """Prefill past the window / original context, then one token at a time through the KV
    cache, as transformers does with its cache (dynamic RoPE: each step at its own length)."""
    name, hf, ours, _ = pair
    ids = _ids((2, LONG + 6), 2)
    out = hf(ids[:, :LONG], use_cache=True)
    expected, past = [out.logits], out.past_key_values
    for t in range(LONG, LONG + 6):
        out = hf(ids[:, t : t + 1], past_key_values=past, use_cache=True)
        expected.append(out.logits)
        past = out.past_key_values
    for paged in (False, True):
        cache = ours.new_cache(2, LONG + 6, paged=paged)
        got = [ours(ids[:, :LONG], cache=cache)]
        for t in range(LONG, LONG + 6):
            got.append(ours(ids[:, t : t + 1], cache=cache))
        assert (torch.cat(got, dim=1) - torch.cat(expected, dim=1)).abs().max().item() <= 1e-4, (name, paged)


@torch.no_grad()
def test_greedy_generation_matches_transformers(pair):
    name, hf, ours, _ = pair
    prompt = _ids((2, 20), 3)  # past the windows and the original contexts (16)
    expected = hf.generate(prompt, max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0,
                           attention_mask=torch.ones_like(prompt))
    got = fastlm.generate(ours, prompt, max_new_tokens=32, eos_token_id=None)  # no eos on either side
    assert torch.equal(got, expected), name


@torch.no_grad()
def test_saved_checkpoint_loads_in_transformers(pair, tmp_path):
    name, hf, ours, path = pair
    ours.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert type(reloaded) is type(hf)
    original = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    ids = _ids((2, LONG), 4)  # (fresh models: transformers' dynamic RoPE keeps state between calls)
    assert (reloaded(ids).logits - original(ids).logits).abs().max().item() == 0.0, name
    again = fastlm.from_pretrained(tmp_path)
    assert again.config == ours.config
    assert (again(ids) - ours(ids)).abs().max().item() == 0.0


def test_config_round_trip(pair):
    _, _, ours, path = pair
    hf_config = json.loads((path / "config.json").read_text())
    assert config_from_hf(config_to_hf(ours.config, torch.float32)) == ours.config
    assert config_from_hf(hf_config) == ours.config


def test_family_features_are_read_from_the_config(pair):
    """The features each family is known for, as read from its config.json."""
    name, _, ours, _ = pair
    c = ours.config
    expected = {
        "llama3.2": dict(arch="llama", head_dim=16, tie_word_embeddings=True),
        "mistral": dict(sliding_window=8, layer_types=None),
        "qwen2.5": dict(qkv_bias=True, attention_bias=False, sliding_window=None),
        "qwen2-window-yarn": dict(sliding_window=8, layer_types=("full_attention", "sliding_attention")),
        "qwen3": dict(qk_norm="head", head_dim=24),
        "gemma2": dict(norm="rms_offset", norm_placement="sandwich", attn_softcap=2.0, final_softcap=5.0,
                       query_pre_attn_scalar=24, scale_embeddings=True, activation="gelu_tanh",
                       layer_types=("sliding_attention", "full_attention")),
        "gemma3": dict(qk_norm="head", local_rope_theta=10000.0, rope_theta=1000000.0),
        "phi3-longrope": dict(arch="phi3"),
        "phi4-mini": dict(partial_rotary_factor=0.75),
        "olmo2": dict(norm_placement="post", qk_norm="proj"),
        "gpt2-gelu": dict(activation="gelu", positions="learned", norm="layer"),
        "gpt2-gelu_fast-inverse-layer": dict(activation="gelu_fast", scale_attn_by_inverse_layer_idx=True),
    }.get(name, {})
    for field, value in expected.items():
        assert getattr(c, field) == value, (name, field)


@pytest.mark.parametrize("name", ["mistral", "gemma2"])
@torch.no_grad()
def test_window_and_softcap_through_the_triton_kernels(name, tmp_path, monkeypatch):
    """Sliding window (and Gemma 2's soft-caps) on the Triton attention, decode and paged decode
    kernels (interpreter): prefill longer than the window, then cached steps, = transformers."""
    monkeypatch.setattr(fastlm.ops, "gelu", fastlm.ops.reference.gelu)  # no Triton GELU kernel (Gemma's MLP)
    cls, values = FAMILIES[name]
    config = getattr(transformers, cls)(**values)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    hf = _perturb(transformers.AutoModelForCausalLM.from_config(config))
    hf.save_pretrained(tmp_path)
    ours = fastlm.from_pretrained(tmp_path)
    ids = _ids((1, 14), 5)
    expected = hf(ids).logits
    with fastlm.use_backend("triton"):
        assert (ours(ids) - expected).abs().max().item() <= 1e-4
        for paged in (False, True):
            cache = ours.new_cache(1, 16, paged=paged, **({"block_size": 4} if paged else {}))
            got = [ours(ids[:, :11], cache=cache)] + [ours(ids[:, t : t + 1], cache=cache) for t in range(11, 14)]
            assert (torch.cat(got, dim=1) - expected).abs().max().item() <= 1e-4, paged
        tokens = fastlm.generate(ours, ids[:, :10], max_new_tokens=4)
    assert torch.equal(tokens, hf.generate(ids[:, :10], max_new_tokens=4, do_sample=False, eos_token_id=None,
                                           pad_token_id=0, attention_mask=torch.ones_like(ids[:, :10])))
