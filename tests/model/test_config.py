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
