"""fastlm.rope.Rotary against transformers' ROPE_INIT_FUNCTIONS, type by type and option by
option, and a factor of 1.0 being plain RoPE (the fused path)."""

import pytest
import torch

import fastlm
from fastlm.rope import Rotary

transformers = pytest.importorskip("transformers")
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402

HEAD_DIM, MAX_POS, THETA = 32, 64, 50000.0
CASES = {
    "linear": dict(rope_type="linear", factor=3.0),
    "llama3": dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=16),
    "yarn": dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=16),
    "yarn-betas-untruncated": dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=16, beta_fast=16,
                                   beta_slow=2, truncate=False),
    "yarn-mscale": dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=16, mscale=0.707,
                        mscale_all_dim=1.0),
    "yarn-attention-factor": dict(rope_type="yarn", factor=2.0, original_max_position_embeddings=32,
                                  attention_factor=1.3),
    "longrope": dict(rope_type="longrope", original_max_position_embeddings=16,
                     short_factor=[1.0 + 0.1 * i for i in range(16)], long_factor=[2.0 + 0.5 * i for i in range(16)]),
    "longrope-factor": dict(rope_type="longrope", original_max_position_embeddings=16, factor=2.0,
                            short_factor=[1.0] * 16, long_factor=[3.0] * 16),
}


def _hf_config(spec):
    return transformers.LlamaConfig(hidden_size=128, num_attention_heads=4, head_dim=HEAD_DIM,
                                    max_position_embeddings=MAX_POS, rope_parameters={**spec, "rope_theta": THETA})


@pytest.mark.parametrize("case", list(CASES))
def test_inv_freq_and_scaling_match_transformers(case):
    spec = CASES[case]
    config = _hf_config(dict(spec))
    ours = Rotary(THETA, HEAD_DIM, HEAD_DIM, dict(spec), MAX_POS)
    init = ROPE_INIT_FUNCTIONS[spec["rope_type"]]
    short, scaling = init(config, "cpu")
    assert ours.scaling == pytest.approx(scaling, rel=1e-12)
    for length in (8, 16, 17, 40):  # below and beyond original_max_position_embeddings
        positions = torch.arange(length)
        expected = short
        if spec["rope_type"] == "longrope" and length > 16:
            expected = init(config, "cpu", seq_len=length)[0]
        torch.testing.assert_close(ours.inv_freq_for(positions), expected, rtol=0, atol=0)


@pytest.mark.parametrize("length", [10, MAX_POS, MAX_POS + 1, 3 * MAX_POS])
def test_dynamic_ntk_matches_transformers(length):
    spec = dict(rope_type="dynamic", factor=4.0)
    config = _hf_config(dict(spec))
    ours = Rotary(THETA, HEAD_DIM, HEAD_DIM, dict(spec), MAX_POS)
    seq_len = torch.tensor(length)  # transformers passes max(position_ids) + 1 as a tensor
    expected = ROPE_INIT_FUNCTIONS["dynamic"](config, "cpu", seq_len=seq_len)[0]
    if length <= MAX_POS:
        expected = ROPE_INIT_FUNCTIONS["dynamic"](config, "cpu")[0]
    torch.testing.assert_close(ours.inv_freq_for(torch.arange(length)), expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("kind", ["linear", "llama3", "yarn", "dynamic"])
def test_factor_one_is_plain_rope(kind):
    spec = {"rope_type": kind, "factor": 1.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16}
    config = fastlm.ModelConfig(vocab_size=40, hidden_size=64, num_layers=1, num_heads=2, max_position_embeddings=32,
                                rope_scaling=spec)
    model = fastlm.Model(config)
    assert model.layers[0].attn.rotary.fused_theta == config.rope_theta  # the fused plain path
    plain = fastlm.Model(config.replace(rope_scaling=None))
    plain.load_state_dict(model.state_dict())
    ids = torch.randint(0, 40, (2, 30))
    torch.testing.assert_close(model(ids), plain(ids), rtol=0, atol=0)


def test_partial_rotary_leaves_the_other_dims():
    rot = Rotary(THETA, 16, 12, None, 64)
    assert rot.fused_theta is None
    q, k = torch.randn(1, 2, 5, 16), torch.randn(1, 1, 5, 16)
    q2, k2 = rot.apply(q, k, torch.arange(5))
    assert torch.equal(q2[..., 12:], q[..., 12:]) and torch.equal(k2[..., 12:], k[..., 12:])
    assert torch.equal(q2[:, :, 0], q[:, :, 0])  # position 0: no rotation
    assert not torch.allclose(q2[..., :12], q[..., :12])
