"""The reference backend's attention through PyTorch's SDPA (fastlm.ops.attn.attention_sdpa)
against the explicit formula (fastlm.ops.reference.attention, unchanged): outputs and gradients,
bottom-right causal alignment with Tq != Tk, key_lens padding with fully padded rows (zeros, not
NaN), GQA/MQA, T = 1; window and soft-cap stay on the explicit formula."""

import pytest
import torch

from fastlm import ops
from fastlm.ops import reference
from fastlm.ops.attn import attention_sdpa

CASES = [  # (B, H, Hkv, Tq, Tk, causal, key_lens)
    (1, 1, 1, 1, 1, True, None),
    (2, 4, 2, 5, 9, True, None),  # causal, Tq < Tk: bottom-right
    (2, 4, 4, 7, 7, True, None),  # the is_causal fast path
    (2, 6, 1, 7, 7, False, [7, 3]),  # MQA + padding
    (2, 4, 2, 3, 6, True, [6, 0]),  # a fully padded sequence
    (3, 2, 2, 4, 4, True, [0, 2, 4]),  # rows that see no key inside a sequence
    (1, 2, 1, 1, 13, False, None),  # one query over many keys
]


def _inputs(b, h, hkv, tq, tk, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
            for s in ((b, h, tq, 16), (b, hkv, tk, 16), (b, hkv, tk, 16))]


def _run(fn, inputs, causal, key_lens, grad):
    out = fn(*inputs, causal, None, key_lens)
    return [out, *torch.autograd.grad(out, inputs, grad)]


@pytest.mark.parametrize("case", CASES, ids=[str(c) for c in CASES])
def test_sdpa_equals_explicit_formula_float64(case):
    b, h, hkv, tq, tk, causal, lens = case
    key_lens = None if lens is None else torch.tensor(lens)
    inputs = _inputs(b, h, hkv, tq, tk, torch.float64)
    grad = torch.randn(b, h, tq, 16, dtype=torch.float64)
    got = _run(attention_sdpa, inputs, causal, key_lens, grad)
    expected = _run(reference.attention, inputs, causal, key_lens, grad)
    for g, e in zip(got, expected):
        assert not torch.isnan(g).any()
        torch.testing.assert_close(g, e, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES[1:5], ids=[str(c) for c in CASES[1:5]])
def test_sdpa_within_twice_the_reference_error(case, dtype):
    """2× rule against the float64 oracle, outputs and gradients, in float32 and bfloat16."""
    b, h, hkv, tq, tk, causal, lens = case
    key_lens = None if lens is None else torch.tensor(lens)
    oracle_in = _inputs(b, h, hkv, tq, tk, torch.float64)
    low_in = [t.detach().to(dtype).requires_grad_() for t in oracle_in]
    low_in2 = [t.detach().to(dtype).requires_grad_() for t in oracle_in]
    grad = torch.randn(b, h, tq, 16, dtype=torch.float64)
    oracle = _run(reference.attention, oracle_in, causal, key_lens, grad)
    ref = _run(reference.attention, low_in, causal, key_lens, grad.to(dtype))
    got = _run(attention_sdpa, low_in2, causal, key_lens, grad.to(dtype))
    for g, r, o in zip(got, ref, oracle):
        bound = 2 * (r.double() - o).abs().max() + 1e-6
        assert (g.double() - o).abs().max() <= bound


def test_window_and_softcap_use_the_explicit_formula():
    q, k, v = _inputs(2, 4, 2, 3, 6, torch.float32)
    key_lens = torch.tensor([6, 4])
    for kwargs in ({"window": 2}, {"softcap": 1.5}, {"window": 3, "softcap": 0.7}):
        got = attention_sdpa(q, k, v, True, None, key_lens, kwargs.get("window"), kwargs.get("softcap"))
        expected = reference.attention(q, k, v, True, None, key_lens, kwargs.get("window"), kwargs.get("softcap"))
        assert torch.equal(got, expected)


def test_public_attention_on_cpu_goes_through_sdpa(monkeypatch):
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append(kwargs.get("is_causal", False))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    q, k, v = _inputs(1, 2, 1, 4, 4, torch.float32)
    out = ops.attention(q, k, v, causal=True)
    torch.testing.assert_close(out, reference.attention(q, k, v, True))
    assert calls == [True]
