import pytest

from fastlm import Model, ModelConfig, preset
from fastlm.config import PRESETS


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(arch="bert"), "arch"),
        (dict(vocab_size=0), "vocab_size"),
        (dict(hidden_size=-4), "hidden_size"),
        (dict(num_layers=1.5), "num_layers"),
        (dict(num_heads=6, num_kv_heads=4, hidden_size=48), "num_kv_heads"),
        (dict(hidden_size=50, num_heads=4), "hidden_size"),
        (dict(hidden_size=48, num_heads=4, head_dim=7), "head_dim"),
        (dict(rope_theta=0), "rope_theta"),
        (dict(norm_eps=0), "norm_eps"),
        (dict(eos_token_id=99, vocab_size=10), "eos_token_id"),
        (dict(arch="gpt2", num_heads=4, num_kv_heads=2, hidden_size=32), "num_kv_heads"),
        (dict(intermediate_size=0), "intermediate_size"),
        (dict(norm="batch"), "norm"),
        (dict(norm_placement="middle"), "norm_placement"),
        (dict(activation="tanh"), "activation"),
        (dict(qk_norm="layer"), "qk_norm"),
        (dict(mlp="moe"), "mlp"),
        (dict(qkv_bias=1), "qkv_bias"),
        (dict(sliding_window=0), "sliding_window"),
        (dict(num_layers=2, layer_types=["full_attention"]), "layer_types"),
        (dict(num_layers=2, layer_types=["full_attention", "local"]), "layer_types"),
        (dict(attn_softcap=-1.0), "attn_softcap"),
        (dict(final_softcap=0), "final_softcap"),
        (dict(query_pre_attn_scalar=0), "query_pre_attn_scalar"),
        (dict(partial_rotary_factor=0.0), "partial_rotary_factor"),
        (dict(partial_rotary_factor=0.1), "head_dim"),  # 1.6 rotary dims: not even
        (dict(rope_scaling={"rope_type": "ntk"}), "rope_scaling"),
        (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "rope_scaling"),
        (dict(rope_scaling={"rope_type": "linear", "factor": -2.0}), "rope_scaling"),
        (dict(rope_scaling={"rope_type": "longrope", "original_max_position_embeddings": 8, "short_factor": [1.0],
                            "long_factor": [1.0] * 8}), "rope_scaling"),
        (dict(rope_scaling="yarn"), "rope_scaling"),
        (dict(arch="gpt2", attention_bias=False), "attention_bias"),
    ],
)
def test_invalid_values_name_the_field(kwargs, field):
    base = dict(hidden_size=64, num_heads=4, num_layers=1, vocab_size=32)
    with pytest.raises(ValueError, match=f"ModelConfig.{field}"):
        ModelConfig(**{**base, **kwargs})


def test_defaults_are_derived():
    c = ModelConfig(hidden_size=64, num_heads=4)
    assert c.num_kv_heads == 4 and c.head_dim == 16 and c.intermediate_size == 256
    g = ModelConfig(arch="gpt2", hidden_size=64, num_heads=4)
    assert g.intermediate_size == 256


def test_family_defaults_and_explicit_features():
    g = ModelConfig(arch="gemma2", hidden_size=64, num_heads=4)
    assert (g.norm, g.norm_placement, g.activation, g.scale_embeddings) == ("rms_offset", "sandwich", "gelu_tanh", True)
    assert ModelConfig(arch="olmo2", hidden_size=64, num_heads=4).qk_norm == "proj"
    assert ModelConfig(arch="llama", hidden_size=64, num_heads=4, qk_norm="head").qk_norm == "head"
    w = ModelConfig(num_layers=3, hidden_size=64, num_heads=4, sliding_window=5,
                    layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    assert [w.window(i) for i in range(3)] == [5, None, 5]
    assert ModelConfig(hidden_size=64, num_heads=4, sliding_window=5).window(1) == 5  # no layer_types: all slide
    d = ModelConfig(hidden_size=64, num_heads=4, max_position_embeddings=32,
                    rope_scaling={"rope_type": "dynamic", "factor": 4.0})
    assert d.context_length == 128
    for arch in ("llama", "gpt2", "gemma2", "gemma3", "olmo2", "qwen3", "phi3", "mistral", "qwen2"):
        config = ModelConfig(arch=arch, vocab_size=50, hidden_size=32, num_layers=2, num_heads=4,
                             qkv_bias=arch == "qwen2")
        assert Model(config).num_parameters() == config.num_parameters, arch


def test_presets_and_parameter_count():
    assert 1e6 < preset("tiny").num_parameters < 1e7  # "a few million"
    assert abs(preset("gpt2").num_parameters - 124_439_808) == 0  # GPT-2 small, tied head
    for name in ("tiny", "tiny-gpt2"):
        config = preset(name)
        assert Model(config).num_parameters() == config.num_parameters
    assert preset("tiny", vocab_size=100).vocab_size == 100
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        preset("huge")
    assert set(PRESETS) >= {"tiny", "tiny-gpt2", "gpt2", "llama-1b", "llama-7b"}
