"""The reference ops against explicit formulas and against PyTorch's own implementations."""

import math

import pytest
import torch
import torch.nn.functional as F

from fastlm import ops
from fastlm.ops import reference

SHAPES = [  # (B, H, Hkv, Tq, Tk, D)
    (1, 1, 1, 1, 1, 8),
    (2, 4, 4, 37, 37, 40),
    (2, 4, 2, 5, 37, 16),  # GQA, Tq < Tk (cached prefix)
    (1, 6, 1, 9, 9, 96),  # MQA
    (3, 2, 2, 1, 129, 8),  # one query over a long key range
]


def _explicit_attention(q, k, v, causal, scale, key_lens=None):
    """Loop over (batch, head, query) with the textbook formula in float64."""
    b, h, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    out = torch.zeros(b, h, tq, d, dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            kv = hi // (h // hkv)
            for i in range(tq):
                keys = [
                    j
                    for j in range(tk)
                    if (not causal or j <= i + tk - tq) and (key_lens is None or j < key_lens[bi])
                ]
                if not keys:
                    continue
                s = torch.stack([q[bi, hi, i].double() @ k[bi, kv, j].double() * scale for j in keys])
                p = torch.softmax(s, dim=0)
                out[bi, hi, i] = sum(p[n] * v[bi, kv, j].double() for n, j in enumerate(keys))
    return out


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("causal", [False, True])
def test_attention_matches_explicit_formula(shape, causal):
    b, h, hkv, tq, tk, d = shape
    torch.manual_seed(0)
    q, k, v = torch.randn(b, h, tq, d), torch.randn(b, hkv, tk, d), torch.randn(b, hkv, tk, d)
    out = ops.attention(q, k, v, causal=causal)
    expected = _explicit_attention(q, k, v, causal, 1 / math.sqrt(d))
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_attention_matches_torch_sdpa(causal):
    torch.manual_seed(1)
    q, k, v = (torch.randn(2, 4, 33, 24) for _ in range(3))
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=0.3)
    torch.testing.assert_close(ops.attention(q, k, v, causal=causal, scale=0.3), expected, atol=1e-5, rtol=1e-5)


def test_attention_key_lens_and_fully_masked_rows():
    torch.manual_seed(2)
    q, k, v = torch.randn(3, 2, 6, 8), torch.randn(3, 1, 6, 8), torch.randn(3, 1, 6, 8)
    key_lens = torch.tensor([6, 3, 0])
    out = ops.attention(q, k, v, causal=False, key_lens=key_lens)
    expected = _explicit_attention(q, k, v, False, 1 / math.sqrt(8), key_lens.tolist())
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(out).all()
    assert (out[2] == 0).all()  # a sequence with no valid key gives zeros, not NaN
    # A padded sequence gives what it gives unpadded.
    alone = ops.attention(q[1:2], k[1:2, :, :3], v[1:2, :, :3])
    torch.testing.assert_close(out[1:2], alone, atol=1e-6, rtol=1e-6)


def test_causal_rows_with_no_key_are_zero():
    # Tq > Tk with bottom-right alignment: the first Tq - Tk queries see no key.
    q, k, v = torch.randn(1, 1, 5, 4), torch.randn(1, 1, 2, 4), torch.randn(1, 1, 2, 4)
    out = ops.attention(q, k, v, causal=True)
    assert (out[0, 0, :3] == 0).all() and torch.isfinite(out).all()
    assert (out[0, 0, 3:] != 0).any()


@pytest.mark.parametrize("tq", [1, 3])
def test_decode_attention_equals_attention_over_valid_prefix(tq):
    torch.manual_seed(3)
    b, h, hkv, lmax, d = 3, 4, 2, 20, 16
    q = torch.randn(b, h, tq, d)
    kc, vc = torch.randn(b, hkv, lmax, d), torch.randn(b, hkv, lmax, d)
    lens = torch.tensor([tq, 11, 20])
    out = ops.decode_attention(q, kc, vc, lens)
    for i, n in enumerate(lens.tolist()):
        expected = ops.attention(q[i : i + 1], kc[i : i + 1, :, :n], vc[i : i + 1, :, :n], causal=True)
        torch.testing.assert_close(out[i : i + 1], expected, atol=1e-6, rtol=1e-6)


def test_rms_norm_formula():
    x, w = torch.randn(3, 5, 40, dtype=torch.float64), torch.randn(40, dtype=torch.float64)
    expected = x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6) * w
    torch.testing.assert_close(ops.rms_norm(x, w, 1e-6), expected)


def test_layer_norm_matches_torch():
    x, w, b = torch.randn(4, 7, 96), torch.randn(96), torch.randn(96)
    torch.testing.assert_close(ops.layer_norm(x, w, b, 1e-5), F.layer_norm(x, (96,), w, b, 1e-5), atol=1e-5, rtol=1e-5)


def test_rope_matches_complex_rotation():
    """Rotate-half RoPE = multiplying (x_i + i·x_{i+D/2}) by e^{i·p·θ_i}."""
    b, h, t, d, theta = 2, 3, 7, 16, 500.0
    x = torch.randn(b, h, t, d, dtype=torch.float64)
    positions = torch.tensor([[0, 1, 2, 3, 4, 5, 6], [10, 11, 12, 13, 14, 15, 16]])
    freqs = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    angle = positions[:, None, :, None].double() * freqs
    z = torch.complex(x[..., : d // 2], x[..., d // 2 :]) * torch.exp(1j * angle)
    expected = torch.cat((z.real, z.imag), dim=-1)
    torch.testing.assert_close(ops.rope(x, positions, theta=theta), expected, atol=1e-6, rtol=1e-6)
    # (T,) positions broadcast over the batch
    torch.testing.assert_close(ops.rope(x[:1], positions[0], theta=theta), expected[:1], atol=1e-6, rtol=1e-6)


def test_rope_preserves_norm_and_relative_positions():
    q, k = torch.randn(1, 1, 1, 32, dtype=torch.float64), torch.randn(1, 1, 1, 32, dtype=torch.float64)
    dots = []
    for p in (0, 5, 40):
        rq = ops.rope(q, torch.tensor([p + 3]))
        rk = ops.rope(k, torch.tensor([p]))
        torch.testing.assert_close(rq.norm(), q.norm())
        dots.append((rq * rk).sum())
    torch.testing.assert_close(dots[0], dots[1])
    torch.testing.assert_close(dots[0], dots[2])


def test_swiglu_and_gelu_formulas():
    g, u = torch.randn(5, 33, dtype=torch.float64), torch.randn(5, 33, dtype=torch.float64)
    torch.testing.assert_close(ops.swiglu(g, u), g / (1 + torch.exp(-g)) * u)
    x = torch.randn(100, dtype=torch.float64) * 4
    torch.testing.assert_close(ops.gelu(x), F.gelu(x, approximate="tanh"))


def test_lora_linear_equals_merged_weight():
    torch.manual_seed(4)
    x = torch.randn(2, 7, 24, dtype=torch.float64)
    w, a, b, bias = (torch.randn(s, dtype=torch.float64) for s in ((40, 24), (4, 24), (40, 4), (40,)))
    expected = x @ (w + 0.5 * b @ a).T + bias
    torch.testing.assert_close(ops.lora_linear(x, w, a, b, 0.5, bias), expected)
    torch.testing.assert_close(ops.lora_linear(x, w, a, b, 0.5), expected - bias)


def test_quantize_int8_error_within_half_step():
    torch.manual_seed(5)
    w = torch.randn(17, 45) * torch.logspace(-3, 1, 17)[:, None]
    w[3] = 0.0
    q, scales = ops.quantize_int8(w)
    assert q.dtype == torch.int8 and scales.dtype == torch.float32 and scales.shape == (17,)
    assert q.abs().max() <= 127
    err = (q.float() * scales[:, None] - w).abs()
    assert (err <= scales[:, None] / 2 * (1 + 1e-5)).all()
    assert (q[3] == 0).all() and scales[3] == 1.0
    # the largest magnitude of each row maps to ±127
    assert (q.abs().amax(dim=1)[w.abs().amax(dim=1) > 0] == 127).all()


def test_int8_linear_equals_dequantized_matmul():
    torch.manual_seed(6)
    w, x, bias = torch.randn(33, 20), torch.randn(3, 20), torch.randn(33)
    q, s = ops.quantize_int8(w)
    expected = x @ (q.float() * s[:, None]).T + bias
    torch.testing.assert_close(ops.int8_linear(x, q, s, bias), expected, atol=1e-5, rtol=1e-5)


def test_cross_entropy_matches_torch():
    torch.manual_seed(7)
    logits, targets = torch.randn(9, 31), torch.randint(0, 31, (9,))
    targets[2] = targets[5] = -100
    torch.testing.assert_close(ops.cross_entropy(logits, targets), F.cross_entropy(logits, targets))
    targets = targets.clamp(min=0)
    torch.testing.assert_close(
        ops.cross_entropy(logits, targets, ignore_index=7), F.cross_entropy(logits, targets, ignore_index=7)
    )


def test_reference_filtered_probs_formula():
    logits = torch.log(torch.tensor([[0.05, 0.4, 0.1, 0.3, 0.15]]))
    probs = reference.filtered_probs(logits, 1.0, 3, None)
    torch.testing.assert_close(probs, torch.tensor([[0.0, 0.4, 0.0, 0.3, 0.15]]) / 0.85)
    # top-p keeps the smallest prefix reaching the mass: 0.4 + 0.3 = 0.7 >= 0.7
    probs = reference.filtered_probs(logits, 1.0, None, 0.7)
    torch.testing.assert_close(probs, torch.tensor([[0.0, 0.4 / 0.7, 0.0, 0.3 / 0.7, 0.0]]))
    # top-k first, then top-p on the renormalized distribution: 0.4/0.85 < 0.5 so two are kept
    probs = reference.filtered_probs(logits, 1.0, 3, 0.5)
    torch.testing.assert_close(probs, torch.tensor([[0.0, 0.4 / 0.7, 0.0, 0.3 / 0.7, 0.0]]))
    # temperature sharpens: p ∝ p0^(1/T)
    p0 = torch.tensor([0.05, 0.4, 0.1, 0.3, 0.15])
    torch.testing.assert_close(reference.filtered_probs(logits, 0.5, None, None)[0], p0**2 / (p0**2).sum())
