"""The triton backend of fastlm.ops.attention: FlashAttention-2-style forward and backward kernels.

Without CUDA the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set by
tests/conftest.py) on tiny shapes; with CUDA the same tests run on the GPU, and the
``@pytest.mark.gpu`` tests add realistic shapes. fp32 results are compared with a float64
reference; fp16/bf16 ones with flash-attention's rule: max|kernel - ref| <= 2 · max|torch - ref|
+ atol, where torch is plain PyTorch math in the same low dtype and ref is float64.
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


def make_inputs(b, h, hkv, tq, tk, d, dtype=torch.float32, device=DEVICE, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, tq, d, generator=gen)
    k = torch.randn(b, hkv, tk, d, generator=gen)
    v = torch.randn(b, hkv, tk, d, generator=gen)
    do = torch.randn(b, h, tq, d, generator=gen)
    return [t.to(device=device, dtype=dtype) for t in (q, k, v, do)]


def run_backend(name, q, k, v, do, **kwargs):
    """(out, dq, dk, dv) of ops.attention on a forced backend, via autograd."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    with fastlm.use_backend(name):
        out = ops.attention(q, k, v, **kwargs)
    out.backward(do)
    return out.detach(), q.grad, k.grad, v.grad


def reference64(q, k, v, do, causal=False, scale=None, key_lens=None):
    """(out, lse, dq, dk, dv) in float64 from the reference formulas."""
    q, k, v, do = (t.double() for t in (q, k, v, do))
    out, lse = reference.attention_forward(q, k, v, causal, scale, key_lens)
    grads = reference_backward.attention_backward(do, q, k, v, causal, scale, key_lens, None, None, out, lse)
    return (out, lse, *grads)


def naive_same_dtype(q, k, v, do, causal=False, scale=None, key_lens=None):
    """(out, dq, dk, dv) of plain PyTorch attention computed entirely in q's dtype (autograd)."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    group = q.shape[1] // k.shape[1]
    kr, vr = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    visible = reference.attention_mask(q.shape[2], k.shape[2], causal=causal, key_lens=key_lens, device=q.device)
    scores = (q @ kr.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~visible, float("-inf")).masked_fill(~visible.any(-1, keepdim=True), 0.0)
    probs = torch.softmax(scores, dim=-1).masked_fill(~visible, 0.0)
    out = probs @ vr
    out.backward(do)
    return out.detach(), q.grad, k.grad, v.grad


def assert_close_to_reference(got, ref, rtol=1e-4, atol=1e-4):
    """Each of got (out, dq, dk, dv) close to the float64 reference, with no NaN."""
    for name, g, r in zip(("out", "dq", "dk", "dv"), got, ref):
        assert not torch.isnan(g).any(), f"{name} has NaN"
        torch.testing.assert_close(g.double(), r, rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


def assert_within_twice_torch_error(got, torch_same, ref, atol):
    """flash-attention's rule, for out and each gradient."""
    for name, g, t, r in zip(("out", "dq", "dk", "dv"), got, torch_same, ref):
        assert not torch.isnan(g).any(), f"{name} has NaN"
        err = (g.double() - r).abs().max().item()
        torch_err = (t.double() - r).abs().max().item()
        assert err <= 2 * torch_err + atol, f"{name}: kernel error {err:.3g} > 2 x torch error {torch_err:.3g} + {atol}"


# (B, H, Hkv, Tq, Tk, D, causal, key_lens)
FP32_CASES = [
    (1, 2, 2, 1, 1, 64, False, None),  # T = 1
    (1, 2, 1, 1, 1, 40, True, None),
    (2, 2, 2, 37, 37, 40, True, None),  # odd T, D = 40 (padded to 64)
    (1, 1, 1, 129, 129, 96, True, None),  # T = 129 (block + 1), D = 96
    (1, 4, 2, 37, 37, 64, True, None),  # GQA
    (1, 4, 1, 20, 33, 128, False, None),  # MQA, Tq != Tk, D = 128
    (1, 2, 1, 5, 37, 64, True, None),  # causal, Tq < Tk (cached prefix)
    (1, 2, 2, 37, 5, 40, True, None),  # causal, Tq > Tk: the first 32 rows see no key
    (2, 2, 1, 17, 29, 64, True, [29, 0]),  # padding + a fully masked sequence
    (2, 2, 2, 37, 37, 32, False, [20, 37]),
    (1, 2, 2, 37, 70, 80, False, None),  # D = 80
]


@pytest.mark.parametrize("b,h,hkv,tq,tk,d,causal,key_lens", FP32_CASES,
                         ids=[f"B{c[0]}H{c[1]}kv{c[2]}q{c[3]}k{c[4]}D{c[5]}{'c' if c[6] else ''}{'-kl' if c[7] else ''}"
                              for c in FP32_CASES])
def test_fp32_output_lse_and_grads_match_reference(b, h, hkv, tq, tk, d, causal, key_lens):
    q, k, v, do = make_inputs(b, h, hkv, tq, tk, d)
    key_lens = None if key_lens is None else torch.tensor(key_lens, device=DEVICE)
    got = run_backend("triton", q, k, v, do, causal=causal, key_lens=key_lens)
    ref = reference64(q, k, v, do, causal, None, key_lens)
    assert_close_to_reference(got, (ref[0], *ref[2:]))
    _, lse = torch.ops.fastlm.attention(q, k, v, causal, None, key_lens, None, None, "triton")
    assert lse.dtype == torch.float32 and lse.shape == (b, h, tq)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref[1]))  # -inf exactly on rows that see no key
    torch.testing.assert_close(lse.double().nan_to_num(neginf=0.0), ref[1].nan_to_num(neginf=0.0), rtol=1e-5, atol=1e-5)


LOW_PRECISION_CASES = [
    (2, 4, 2, 37, 37, 64, True, None),
    (1, 2, 1, 33, 70, 40, False, [50]),
    (1, 2, 2, 48, 20, 96, True, None),
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("b,h,hkv,tq,tk,d,causal,key_lens", LOW_PRECISION_CASES,
                         ids=["gqa-causal", "kl-noncausal", "tq>tk-D96"])
def test_low_precision_within_twice_torch_error(dtype, b, h, hkv, tq, tk, d, causal, key_lens):
    q, k, v, do = make_inputs(b, h, hkv, tq, tk, d, dtype=dtype)
    key_lens = None if key_lens is None else torch.tensor(key_lens, device=DEVICE)
    got = run_backend("triton", q, k, v, do, causal=causal, key_lens=key_lens)
    assert all(t.dtype == dtype for t in got)
    ref = reference64(q, k, v, do, causal, None, key_lens)
    torch_same = naive_same_dtype(q, k, v, do, causal, None, key_lens)
    assert_within_twice_torch_error(got, torch_same, (ref[0], *ref[2:]), atol=1e-3)


def test_fully_masked_rows_and_hidden_keys_get_exact_zeros():
    """Rows that see no key: out = 0, lse = -inf, dq = 0; keys nobody sees: dk = dv = 0."""
    q, k, v, do = make_inputs(2, 2, 1, 37, 9, 32)
    key_lens = torch.tensor([9, 0], device=DEVICE)
    out, dq, dk, dv = run_backend("triton", q, k, v, do, causal=True, key_lens=key_lens)
    _, lse = torch.ops.fastlm.attention(q, k, v, True, None, key_lens, None, None, "triton")
    # Batch 0: causal with Tq - Tk = 28, rows 0..27 see nothing. Batch 1: no key at all.
    for rows in (out[0, :, :28], dq[0, :, :28], out[1], dq[1], dk[1], dv[1]):
        assert torch.equal(rows, torch.zeros_like(rows))
    assert torch.isinf(lse[0, :, :28]).all() and torch.isinf(lse[1]).all() and torch.isfinite(lse[0, :, 28:]).all()
    assert not any(torch.isnan(t).any() for t in (out, dq, dk, dv))


def test_scale_and_strided_inputs():
    """q/k/v as (B, T, H, D) tensors viewed as (B, H, T, D) (the model's layout), a custom scale
    and a non-contiguous output gradient: no copies needed, same results."""
    b, t, h, hkv, d = 2, 21, 4, 2, 64
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(b, t, h, d, generator=gen).to(DEVICE).transpose(1, 2)
    k = torch.randn(b, t, hkv, d, generator=gen).to(DEVICE).transpose(1, 2)
    v = torch.randn(b, t, hkv, d, generator=gen).to(DEVICE).transpose(1, 2)
    do = torch.randn(b, t, h, d, generator=gen).to(DEVICE).transpose(1, 2)
    assert not q.is_contiguous()
    got = run_backend("triton", q, k, v, do, causal=True, scale=0.3)
    ref = reference64(q, k, v, do, True, 0.3)
    assert_close_to_reference(got, (ref[0], *ref[2:]))


def test_only_needed_gradients_are_computed():
    q, k, v, do = make_inputs(1, 2, 1, 17, 17, 32)
    q = q.clone().requires_grad_()
    with fastlm.use_backend("triton"):
        out = ops.attention(q, k, v, causal=True)  # k, v take no gradient
    out.backward(do)
    ref = reference64(q.detach(), k, v, do, True)
    torch.testing.assert_close(q.grad.double(), ref[2], rtol=1e-4, atol=1e-4)
    needs = torch.ops.fastlm.attention_backward(do, q.detach(), k, v, True, None, None, None, None, out, ref[1].float(),
                                                [False, True, False], "triton")
    assert [t.numel() for t in needs] == [0, k.numel(), 0]


def test_deterministic_backward_is_bit_identical(monkeypatch, attention_triton):
    monkeypatch.setenv("FASTLM_DETERMINISTIC", "1")
    assert attention_triton.deterministic_backward()
    q, k, v, do = make_inputs(2, 4, 1, 37, 45, 40)  # MQA: dk/dv summed over 4 query heads
    first = run_backend("triton", q, k, v, do, causal=True)
    second = run_backend("triton", q, k, v, do, causal=True)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    monkeypatch.setenv("FASTLM_DETERMINISTIC", "0")
    assert attention_triton.deterministic_backward() == torch.are_deterministic_algorithms_enabled()


@pytest.mark.parametrize("hkv", [1, 2])
def test_split_heads_gqa_backward_with_atomics(hkv, attention_triton):
    """The non-deterministic GQA path (one program per query head, fp32 atomics) is correct."""
    fwd_kernels, attention_bwd = attention_triton.kernel_modules()

    q, k, v, do = make_inputs(2, 4, hkv, 29, 37, 64)
    key_lens = torch.tensor([37, 11], device=DEVICE)
    out, lse = fwd_kernels.attention_forward(q, k, v, True, None, key_lens)
    grads = attention_bwd.attention_backward(do, q, k, v, True, None, key_lens, out, lse,
                                             deterministic=False, split_heads=True)
    ref = reference64(q, k, v, do, True, None, key_lens)
    assert_close_to_reference((out, *grads), (ref[0], *ref[2:]))
    assert all(g.shape == t.shape and g.dtype == t.dtype for g, t in zip(grads, (q, k, v)))


def test_triton_limits_raise_clear_errors():
    q = torch.randn(1, 1, 4, 264, device=DEVICE)
    with fastlm.use_backend("triton"), pytest.raises(ValueError, match="head dims 1..256, got D=264"):
        ops.attention(q, q, q)
    q = torch.randn(1, 1, 4, 16, device=DEVICE, dtype=torch.float64)
    match = "float16, bfloat16 and float32, got torch.float64"
    with fastlm.use_backend("triton"), pytest.raises(TypeError, match=match):
        ops.attention(q, q, q)
    with fastlm.use_backend("triton"), pytest.raises(ValueError, match="multiple of the 3 key/value heads"):
        ops.attention(torch.randn(1, 4, 2, 8), torch.randn(1, 3, 2, 8), torch.randn(1, 3, 2, 8))


def test_opcheck_attention_triton():
    q, k, v, _ = make_inputs(1, 2, 1, 9, 13, 32)
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), True, None, torch.tensor([13], device=DEVICE),
            None, None)
    torch.library.opcheck(torch.ops.fastlm.attention.default, (*args, "triton"))


def test_torch_compile_traces_the_triton_op():
    """aot_eager with fullgraph over the custom op with the triton backend and over ops.attention."""
    q, k, v, do = make_inputs(1, 2, 1, 17, 17, 32)

    def block(q, k, v):
        return torch.ops.fastlm.attention(q, k, v, True, None, None, None, None, "triton")[0]

    def public(q, k, v):
        return ops.attention(q, k, v, causal=True)

    expected = run_backend("triton", q, k, v, do, causal=True)
    for fn, fullgraph in ((block, True), (public, True)):
        torch._dynamo.reset()
        compiled = torch.compile(fn, backend="aot_eager", fullgraph=fullgraph)
        qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
        with fastlm.use_backend("triton"):
            out = compiled(qg, kg, vg)
        out.backward(do)
        for got, want in zip((out.detach(), qg.grad, kg.grad, vg.grad), expected):
            torch.testing.assert_close(got, want)


# ---------------------------------------------------------------------------------------------
# GPU: realistic shapes (autotuned kernels)
# ---------------------------------------------------------------------------------------------

GPU_CASES = [  # (B, H, Hkv, Tq, Tk, D, causal)
    (4, 8, 8, 512, 512, 64, True),
    (2, 8, 2, 1024, 1024, 128, True),
    (1, 8, 1, 2048, 2048, 128, False),
    (2, 4, 4, 1000, 1000, 96, True),
    (2, 4, 2, 777, 2048, 80, True),  # Tq < Tk
    (2, 4, 4, 1025, 517, 112, True),  # Tq > Tk
    (1, 4, 2, 512, 512, 256, True),
    (2, 4, 4, 333, 1111, 40, False),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("b,h,hkv,tq,tk,d,causal", GPU_CASES, ids=[f"q{c[3]}k{c[4]}D{c[5]}" for c in GPU_CASES])
def test_gpu_low_precision_within_twice_torch_error(dtype, b, h, hkv, tq, tk, d, causal):
    q, k, v, do = make_inputs(b, h, hkv, tq, tk, d, dtype=dtype, device="cuda")
    got = run_backend("triton", q, k, v, do, causal=causal)
    ref = reference64(q, k, v, do, causal)
    torch_same = naive_same_dtype(q, k, v, do, causal)
    assert_within_twice_torch_error(got, torch_same, (ref[0], *ref[2:]), atol=1e-3)


@pytest.mark.gpu
def test_gpu_key_lens_and_fp32():
    q, k, v, do = make_inputs(3, 8, 2, 300, 1200, 64, device="cuda")
    key_lens = torch.tensor([1200, 517, 0], device="cuda")
    got = run_backend("triton", q, k, v, do, causal=True, key_lens=key_lens)
    ref = reference64(q, k, v, do, True, None, key_lens)
    assert_close_to_reference(got, (ref[0], *ref[2:]), rtol=1e-3, atol=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("hkv", [1, 2])
def test_gpu_split_heads_and_deterministic_paths_agree(hkv, attention_triton):
    fwd_kernels, attention_bwd = attention_triton.kernel_modules()

    q, k, v, do = make_inputs(1, 16, hkv, 1024, 1024, 128, dtype=torch.bfloat16, device="cuda")
    out, lse = fwd_kernels.attention_forward(q, k, v, True)
    det = attention_bwd.attention_backward(do, q, k, v, True, None, None, out, lse, deterministic=True)
    again = attention_bwd.attention_backward(do, q, k, v, True, None, None, out, lse, deterministic=True)
    split = attention_bwd.attention_backward(do, q, k, v, True, None, None, out, lse,
                                             deterministic=False, split_heads=True)
    assert all(torch.equal(a, b) for a, b in zip(det, again))
    for a, b in zip(det, split):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)
