"""Sliding window and soft-cap in the triton attention kernels (forward, dq/dk/dv, varlen).

Oracle: the float64 reference (itself checked against transformers in
test_attention_window_softcap.py). fp32 within 1e-4; fp16/bf16 by the 2x rule against plain
PyTorch in the same dtype.
"""

import importlib

import pytest
import torch

import fastlm
from fastlm import ops
from fastlm.ops import backend, reference, reference_backward

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def attention_triton():
    """The triton adapters of the attention family (registered when fastlm.ops is imported)."""
    return importlib.import_module("fastlm.ops.triton.attn")


def make_inputs(b, h, hkv, tq, tk, d, dtype=torch.float32, seed=0, q_scale=2.0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, tq, d, generator=gen) * q_scale  # large scores: the soft-cap matters
    k, v = torch.randn(b, hkv, tk, d, generator=gen), torch.randn(b, hkv, tk, d, generator=gen)
    do = torch.randn(b, h, tq, d, generator=gen)
    return [t.to(device=DEVICE, dtype=dtype) for t in (q, k, v, do)]


def run_triton(q, k, v, do, **kwargs):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    with fastlm.use_backend("triton"):
        out = ops.attention(q, k, v, **kwargs)
    out.backward(do)
    return out.detach(), q.grad, k.grad, v.grad


def reference64(q, k, v, do, causal, key_lens, window, softcap):
    q, k, v, do = (t.double() for t in (q, k, v, do))
    out, lse = reference.attention_forward(q, k, v, causal, None, key_lens, window, softcap)
    grads = reference_backward.attention_backward(do, q, k, v, causal, None, key_lens, window, softcap, out, lse)
    return out, lse, grads


def naive_same_dtype(q, k, v, do, causal, key_lens, window, softcap):
    """(out, dq, dk, dv) of plain PyTorch attention entirely in q's dtype (autograd)."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    group = q.shape[1] // k.shape[1]
    kr, vr = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    visible = reference.attention_mask(q.shape[2], k.shape[2], causal=causal, key_lens=key_lens, device=q.device,
                                       window=window)
    scores = (q @ kr.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~visible, float("-inf")).masked_fill(~visible.any(-1, keepdim=True), 0.0)
    out = torch.softmax(scores, dim=-1).masked_fill(~visible, 0.0) @ vr
    out.backward(do)
    return out.detach(), q.grad, k.grad, v.grad


# (B, H, Hkv, Tq, Tk, D, causal, window, softcap, key_lens)
FP32_CASES = [
    (1, 2, 1, 1, 1, 40, True, 1, None, None),  # T = 1
    (1, 2, 2, 1, 37, 64, True, 4, 0.8, None),  # one query over a cached prefix
    (2, 2, 2, 37, 37, 40, True, 5, None, None),  # window < T, odd T, D = 40
    (1, 2, 1, 37, 37, 96, True, 100, 0.8, None),  # window > T, D = 96
    (1, 1, 1, 129, 129, 64, True, 17, 30.0, None),  # T = 129, window just over a tile
    (1, 4, 2, 5, 37, 64, True, 8, 1.0, None),  # GQA, Tq < Tk
    (1, 2, 2, 37, 5, 40, True, 2, None, None),  # Tq > Tk: the first rows see no key
    (2, 2, 1, 17, 29, 64, True, 6, 0.5, [29, 3]),  # padding hides whole windows
    (1, 2, 1, 20, 33, 32, False, None, 0.6, [30]),  # soft-cap alone, not causal
]


def _case_id(c):
    return f"B{c[0]}H{c[1]}kv{c[2]}q{c[3]}k{c[4]}D{c[5]}{'c' if c[6] else ''}-w{c[7]}-cap{c[8]}{'-kl' if c[9] else ''}"


@pytest.mark.parametrize("b,h,hkv,tq,tk,d,causal,window,softcap,key_lens", FP32_CASES,
                         ids=[_case_id(c) for c in FP32_CASES])
def test_fp32_output_lse_and_grads(b, h, hkv, tq, tk, d, causal, window, softcap, key_lens):
    q, k, v, do = make_inputs(b, h, hkv, tq, tk, d)
    key_lens = None if key_lens is None else torch.tensor(key_lens, device=DEVICE)
    got = run_triton(q, k, v, do, causal=causal, key_lens=key_lens, window=window, softcap=softcap)
    ref_out, ref_lse, ref_grads = reference64(q, k, v, do, causal, key_lens, window, softcap)
    for name, g, r in zip(("out", "dq", "dk", "dv"), got, (ref_out, *ref_grads)):
        assert not torch.isnan(g).any(), f"{name} has NaN"
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
    _, lse = torch.ops.fastlm.attention(q, k, v, causal, None, key_lens, window, softcap, "triton")
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    torch.testing.assert_close(lse.double().nan_to_num(neginf=0.0), ref_lse.nan_to_num(neginf=0.0),
                               rtol=1e-5, atol=1e-5)


LOW_PRECISION_CASES = [  # (B, H, Hkv, Tq, Tk, D, window, softcap, key_lens)
    (2, 4, 2, 37, 37, 64, 9, 1.0, None),
    (1, 2, 1, 33, 70, 40, 20, None, [50]),
    (1, 2, 2, 48, 20, 96, 100, 5.0, None),
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("b,h,hkv,tq,tk,d,window,softcap,key_lens", LOW_PRECISION_CASES,
                         ids=["gqa-w9-cap", "kl-w20", "tq>tk-D96-w100-cap"])
def test_low_precision_within_twice_torch_error(dtype, b, h, hkv, tq, tk, d, window, softcap, key_lens):
    q, k, v, do = make_inputs(b, h, hkv, tq, tk, d, dtype=dtype)
    key_lens = None if key_lens is None else torch.tensor(key_lens, device=DEVICE)
    got = run_triton(q, k, v, do, causal=True, key_lens=key_lens, window=window, softcap=softcap)
    ref_out, _, ref_grads = reference64(q, k, v, do, True, key_lens, window, softcap)
    torch_same = naive_same_dtype(q, k, v, do, True, key_lens, window, softcap)
    for name, g, t, r in zip(("out", "dq", "dk", "dv"), got, torch_same, (ref_out, *ref_grads)):
        assert g.dtype == dtype and not torch.isnan(g).any(), name
        err, torch_err = (g.double() - r).abs().max().item(), (t.double() - r).abs().max().item()
        assert err <= 2 * torch_err + 1e-3, f"{name}: kernel error {err:.3g} > 2 x torch error {torch_err:.3g}"


def test_key_tiles_outside_the_window_are_never_read():
    """NaN keys/values outside every query's window (for any tile size up to 128) do not reach
    the output or dq, and their dk/dv are exact zeros: the kernels skip those tiles."""
    q, k, v, do = make_inputs(1, 2, 1, 32, 512, 32)
    k_nan, v_nan = k.clone(), v.clone()
    k_nan[:, :, :384] = float("nan")
    v_nan[:, :, :384] = float("nan")
    out, dq, dk, dv = run_triton(q, k_nan, v_nan, do, causal=True, window=8)
    ref_out, _, (ref_dq, ref_dk, ref_dv) = reference64(q, k, v, do, True, None, 8, None)
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dq.double(), ref_dq, rtol=1e-4, atol=1e-4)
    assert torch.equal(dk[:, :, :384], torch.zeros_like(dk[:, :, :384]))
    assert torch.equal(dv[:, :, :384], torch.zeros_like(dv[:, :, :384]))
    torch.testing.assert_close(dk[:, :, 384:].double(), ref_dk[:, :, 384:], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dv[:, :, 384:].double(), ref_dv[:, :, 384:], rtol=1e-4, atol=1e-4)


def test_split_heads_atomic_backward_with_window_and_softcap(attention_triton):
    fwd_kernels, attention_bwd = attention_triton.kernel_modules()
    q, k, v, do = make_inputs(2, 4, 1, 29, 37, 64)
    key_lens = torch.tensor([37, 11], device=DEVICE)
    out, lse = fwd_kernels.attention_forward(q, k, v, True, None, key_lens, 7, 2.0)
    grads = attention_bwd.attention_backward(do, q, k, v, True, None, key_lens, out, lse, window=7, softcap=2.0,
                                             deterministic=False, split_heads=True)
    _, _, ref_grads = reference64(q, k, v, do, True, key_lens, 7, 2.0)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-4)


def packed(q_lens, k_lens, h, hkv, d, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    tq, tk = sum(q_lens), sum(k_lens)
    q = torch.randn(tq, h, d, generator=gen) * 2
    k, v = torch.randn(tk, hkv, d, generator=gen), torch.randn(tk, hkv, d, generator=gen)
    do = torch.randn(tq, h, d, generator=gen)
    cu = lambda lens: torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)  # noqa: E731
    return [t.to(device=DEVICE, dtype=dtype) for t in (q, k, v, do)] + [cu(q_lens).to(DEVICE), cu(k_lens).to(DEVICE)]


@pytest.mark.parametrize("window,softcap", [(3, None), (None, 0.7), (40, 1.5)])
def test_varlen_window_softcap_match_reference(window, softcap):
    q_lens, k_lens = [5, 1, 37, 0], [9, 1, 37, 3]
    q, k, v, do, cu_q, cu_k = packed(q_lens, k_lens, 4, 2, 40)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    with fastlm.use_backend("triton"):
        out = ops.attention_varlen(*leaves, cu_q, cu_k, max_seqlen_q=37, max_seqlen_k=37, causal=True,
                                   window=window, softcap=softcap)
    out.backward(do)
    leaves64 = [t.double().requires_grad_() for t in (q, k, v)]
    with fastlm.use_backend("reference"):
        ref = ops.attention_varlen(*leaves64, cu_q, cu_k, max_seqlen_q=37, max_seqlen_k=37, causal=True,
                                   window=window, softcap=softcap)
    ref.backward(do.double())
    torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-4, atol=1e-4)
    for got, want in zip(leaves, leaves64):
        torch.testing.assert_close(got.grad.double(), want.grad, rtol=1e-4, atol=1e-4)


def test_opcheck_with_window_and_softcap():
    q, k, v, _ = make_inputs(1, 2, 1, 9, 13, 32)
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), True, None,
            torch.tensor([12], device=DEVICE), 4, 1.5)
    torch.library.opcheck(torch.ops.fastlm.attention.default, (*args, "triton"))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("tq,tk,d,window,softcap", [(1024, 1024, 128, 256, 50.0), (777, 2048, 64, 4096, None),
                                                    (2048, 2048, 256, 100, 30.0)])
def test_gpu_window_softcap_within_twice_torch_error(dtype, tq, tk, d, window, softcap):
    q, k, v, do = make_inputs(2, 8, 2, tq, tk, d, dtype=dtype, q_scale=1.0)
    got = run_triton(q, k, v, do, causal=True, window=window, softcap=softcap)
    ref_out, _, ref_grads = reference64(q, k, v, do, True, None, window, softcap)
    torch_same = naive_same_dtype(q, k, v, do, True, None, window, softcap)
    for name, g, t, r in zip(("out", "dq", "dk", "dv"), got, torch_same, (ref_out, *ref_grads)):
        err, torch_err = (g.double() - r).abs().max().item(), (t.double() - r).abs().max().item()
        assert err <= 2 * torch_err + 1e-3, f"{name}: kernel error {err:.3g} > 2 x torch error {torch_err:.3g}"
