"""Sliding-window attention and logit soft-capping in the reference ops (the oracle of the kernels).

The oracle for the semantics is transformers itself: the mask of
``masking_utils.sliding_window_causal_mask_function`` (Mistral, Gemma 2/3, Qwen2) and Gemma 2's
``eager_attention_forward`` (soft-capping before the mask), on the same float64 inputs.
"""

import math

import pytest
import torch
from transformers import masking_utils
from transformers.models.gemma2 import modeling_gemma2

import fastlm
from fastlm import ops
from fastlm.ops import reference, reference_backward
from fastlm.ops.attn import attention_varlen_reference
from fastlm.ops.decode import gather_pages


def _qkv(b, h, hkv, tq, tk, d, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)
            for shape in ((b, h, tq, d), (b, hkv, tk, d), (b, hkv, tk, d))]


class _Module(torch.nn.Module):
    def __init__(self, head_dim, groups):
        super().__init__()
        self.head_dim, self.num_key_value_groups = head_dim, groups


def transformers_attention(q, k, v, window, softcap, scale, key_lens=None):
    """Gemma 2's eager attention with transformers' (sliding-window) causal mask function; the
    queries are the last Tq positions of the Tk keys."""
    b, h, tq, d = q.shape
    tk = k.shape[2]
    mask_fn = (masking_utils.causal_mask_function if window is None
               else masking_utils.sliding_window_causal_mask_function(window))
    allowed = torch.zeros(b, 1, tq, tk, dtype=torch.bool)
    for bi in range(b):
        for i in range(tq):
            for j in range(tk):
                in_len = key_lens is None or j < int(key_lens[bi])
                pos = torch.tensor(i + tk - tq)
                allowed[bi, 0, i, j] = bool(mask_fn(bi, 0, pos, torch.tensor(j))) and in_len
    additive = torch.zeros(allowed.shape, dtype=q.dtype).masked_fill(~allowed, torch.finfo(q.dtype).min)
    out, _ = modeling_gemma2.eager_attention_forward(_Module(d, h // k.shape[1]).eval(), q, k, v, additive,
                                                     scaling=scale, softcap=softcap)
    return out.transpose(1, 2), allowed  # (B, H, Tq, D)


@pytest.mark.parametrize("window", [None, 1, 3, 6, 100])
@pytest.mark.parametrize("softcap", [None, 0.5, 30.0])
@pytest.mark.parametrize("tq,tk", [(7, 7), (3, 9), (1, 5)])
def test_reference_matches_transformers(window, softcap, tq, tk):
    q, k, v = _qkv(2, 4, 2, tq, tk, 8)
    q = q * 3  # large scores, so that a soft-cap of 0.5 or 30 changes them
    out = ops.attention(q, k, v, causal=True, scale=0.5, window=window, softcap=softcap)
    expected, _ = transformers_attention(q, k, v, window, softcap, 0.5)
    # transformers' eager softmax runs in float32 (dtype=torch.float32): its own error, ~1e-7
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_window_mask_is_the_last_window_keys():
    """Query at position p sees exactly keys p - window < j <= p (itself included)."""
    mask = reference.attention_mask(3, 8, causal=True, key_lens=None, device="cpu", window=3)[0, 0]
    expected = torch.zeros(3, 8, dtype=torch.bool)
    for i, p in enumerate((5, 6, 7)):
        expected[i, p - 2: p + 1] = True
    assert torch.equal(mask, expected)
    full = reference.attention_mask(3, 8, causal=True, key_lens=None, device="cpu", window=8)
    assert torch.equal(full, reference.attention_mask(3, 8, causal=True, key_lens=None, device="cpu"))


def test_softcap_is_tanh_before_mask_and_softmax():
    q, k, v = _qkv(1, 2, 2, 4, 4, 8)
    q = q * 4
    out = ops.attention(q, k, v, causal=True, softcap=2.0)
    s = q @ k.transpose(-1, -2) / math.sqrt(8)
    s = 2.0 * torch.tanh(s / 2.0)
    s = s.masked_fill(torch.ones(4, 4, dtype=torch.bool).triu(1), float("-inf"))
    torch.testing.assert_close(out, torch.softmax(s, -1) @ v)


def test_key_lens_with_window_gives_zero_rows():
    """Padding hides every key in the window of the last queries: their rows are 0, not NaN."""
    q, k, v = _qkv(2, 2, 1, 6, 6, 8)
    key_lens = torch.tensor([6, 2])
    out = ops.attention(q, k, v, causal=True, window=2, key_lens=key_lens, softcap=5.0)
    expected, allowed = transformers_attention(q, k, v, 2, 5.0, 8 ** -0.5, key_lens)
    rows = allowed.any(-1)[:, 0]  # (B, Tq)
    assert not rows[1, 3:].any()
    assert torch.equal(out[1, :, 3:], torch.zeros_like(out[1, :, 3:]))
    torch.testing.assert_close(out[rows[:, None].expand(-1, 2, -1)],
                               expected[rows[:, None].expand(-1, 2, -1)], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("window,softcap", [(3, None), (None, 0.7), (2, 1.5), (50, 0.3)])
def test_reference_backward_formula_matches_autograd(window, softcap):
    q, k, v = _qkv(2, 4, 2, 5, 9, 8)
    q = q * 2
    key_lens = torch.tensor([9, 6])
    do = torch.randn(q.shape, dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = reference.attention(*leaves, True, 0.6, key_lens, window, softcap)
    out.backward(do)
    o, lse = reference.attention_forward(q, k, v, True, 0.6, key_lens, window, softcap)
    grads = reference_backward.attention_backward(do, q, k, v, True, 0.6, key_lens, window, softcap, o, lse)
    for got, leaf in zip(grads, leaves):
        torch.testing.assert_close(got, leaf.grad, rtol=1e-10, atol=1e-10)


def test_gradcheck_through_the_custom_op():
    q, k, v = (t.requires_grad_() for t in _qkv(1, 2, 1, 4, 6, 4))
    key_lens = torch.tensor([5])
    torch.autograd.gradcheck(
        lambda q, k, v: torch.ops.fastlm.attention(q, k, v, True, None, key_lens, 2, 0.8, "reference")[0],
        (q, k, v))


@pytest.mark.parametrize("tq", [1, 3])
@pytest.mark.parametrize("window,softcap", [(None, None), (4, None), (None, 0.6), (2, 2.0), (100, 0.6)])
def test_decode_equals_attention_over_valid_prefix(tq, window, softcap):
    q, kc, vc = _qkv(3, 4, 2, tq, 12, 8)
    lens = torch.tensor([12, tq, 7])
    out = ops.decode_attention(q, kc, vc, lens, window=window, softcap=softcap)
    for i, n in enumerate(lens.tolist()):
        expected = ops.attention(q[i:i + 1], kc[i:i + 1, :, :n], vc[i:i + 1, :, :n], causal=True,
                                 window=window, softcap=softcap)
        torch.testing.assert_close(out[i:i + 1], expected, rtol=1e-10, atol=1e-10)


def test_paged_decode_equals_contiguous_with_window_and_softcap():
    g = torch.Generator().manual_seed(3)
    pages_k, pages_v = torch.randn(10, 2, 4, 16, generator=g), torch.randn(10, 2, 4, 16, generator=g)
    table = torch.tensor([[3, 7, 1], [2, -1, -1], [9, 4, 5]], dtype=torch.int32)
    lens = torch.tensor([11, 3, 12])
    q = torch.randn(3, 4, 2, 16, generator=g)
    out = ops.decode_attention_paged(q, pages_k, pages_v, table, lens, window=3, softcap=1.0)
    expected = ops.decode_attention(q, gather_pages(pages_k, table), gather_pages(pages_v, table), lens,
                                    window=3, softcap=1.0)
    torch.testing.assert_close(out, expected)
    torch.library.opcheck(torch.ops.fastlm.decode_attention_paged.default,
                          (q, pages_k, pages_v, table, lens, None, 3, 1.0, "reference"))


def test_varlen_reference_equals_dense_per_sequence():
    q_lens, k_lens = [3, 1, 6], [5, 4, 6]
    qs = [_qkv(1, 4, 2, tq, tk, 8, seed=i) for i, (tq, tk) in enumerate(zip(q_lens, k_lens))]
    pack = lambda ts: torch.cat([t[0].transpose(0, 1) for t in ts])  # noqa: E731
    q, k, v = pack([t[0] for t in qs]), pack([t[1] for t in qs]), pack([t[2] for t in qs])
    cu_q = torch.tensor([0, 3, 4, 10], dtype=torch.int32)
    cu_k = torch.tensor([0, 5, 9, 15], dtype=torch.int32)
    out = ops.attention_varlen(q, k, v, cu_q, cu_k, max_seqlen_q=6, max_seqlen_k=6, causal=True, window=2,
                               softcap=0.9)
    for (qb, kb, vb), a, b in zip(qs, cu_q[:-1].tolist(), cu_q[1:].tolist()):
        expected = ops.attention(qb, kb, vb, causal=True, window=2, softcap=0.9)
        torch.testing.assert_close(out[a:b], expected[0].transpose(0, 1), rtol=1e-10, atol=1e-10)
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), cu_q, cu_k, 6, 6, True, None, 2, 0.9)
    torch.library.opcheck(torch.ops.fastlm.attention_varlen.default, (*args, "reference"))
    assert attention_varlen_reference(*args)[0].shape == q.shape


def _t(*shape):
    return torch.randn(*shape)


BAD = [
    (dict(window=0), ValueError, "window must be an integer >= 1"),
    (dict(window=-2), ValueError, "window must be an integer >= 1"),
    (dict(window=2.5), ValueError, "window must be an integer >= 1"),
    (dict(window=True), ValueError, "window must be an integer >= 1"),
    (dict(softcap=0.0), ValueError, "softcap must be a finite number > 0"),
    (dict(softcap=-1.0), ValueError, "softcap must be a finite number > 0"),
    (dict(softcap=float("nan")), ValueError, "softcap must be a finite number > 0"),
    (dict(softcap=float("inf")), ValueError, "softcap must be a finite number > 0"),
    (dict(softcap="1"), ValueError, "softcap must be a finite number > 0"),
]


@pytest.mark.parametrize("kwargs,exc,match", BAD)
def test_bad_values_raise_clear_errors(kwargs, exc, match):
    q, kv = _t(1, 2, 3, 8), _t(1, 2, 5, 8)
    lens = torch.tensor([5])
    table = torch.zeros(1, 2, dtype=torch.int32)
    pages = _t(2, 2, 4, 8)
    cu = torch.tensor([0, 3], dtype=torch.int32)
    calls = {
        "attention": lambda: ops.attention(q, kv, kv, causal=True, **kwargs),
        "attention_varlen": lambda: ops.attention_varlen(q[0].transpose(0, 1), kv[0, :, :3].transpose(0, 1),
                                                         kv[0, :, :3].transpose(0, 1), cu, cu, max_seqlen_q=3,
                                                         max_seqlen_k=3, causal=True, **kwargs),
        "decode_attention": lambda: ops.decode_attention(q, kv, kv, lens, **kwargs),
        "decode_attention_paged": lambda: ops.decode_attention_paged(q, pages, pages, table, lens, **kwargs),
    }
    for name, call in calls.items():
        with pytest.raises(exc, match=f"{name}: {match}"):
            call()


def test_window_requires_causal():
    q = _t(1, 2, 3, 8)
    with pytest.raises(ValueError, match="attention: window=4 .*requires causal=True"):
        ops.attention(q, q, q, window=4)
    cu = torch.tensor([0, 3], dtype=torch.int32)
    with pytest.raises(ValueError, match="attention_varlen: window=4 .*requires causal=True"):
        qv = q[0].transpose(0, 1)
        ops.attention_varlen(qv, qv, qv, cu, cu, max_seqlen_q=3, max_seqlen_k=3, window=4)
    with fastlm.use_backend("reference"):
        assert ops.attention(q, q, q, causal=True, window=4, softcap=3).shape == q.shape  # ints accepted
