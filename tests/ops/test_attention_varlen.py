"""Variable-length (packed) attention: fastlm.ops.attention_varlen.

Packed sequences (cu_seqlens offsets as flash-attn's varlen API) must give exactly what
attention gives on each sequence alone: no attention across documents, causal alignment per
sequence. Triton kernels run under the interpreter without CUDA (tiny shapes) and on the GPU
otherwise; ``@pytest.mark.gpu`` tests add realistic packings.
"""

import importlib

import pytest
import torch

import fastlm
from fastlm import ops
from fastlm.ops import backend, reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def attention_triton():
    """The triton adapters of the attention family (registered when fastlm.ops is imported)."""
    return importlib.import_module("fastlm.ops.triton.attn")


def packed(q_lens, k_lens, h, hkv, d, dtype=torch.float32, device=DEVICE, seed=0):
    """Random packed q/k/v/do and int32 offsets for sequences of the given lengths."""
    gen = torch.Generator().manual_seed(seed)
    tq, tk = sum(q_lens), sum(k_lens)
    q, do = torch.randn(tq, h, d, generator=gen), torch.randn(tq, h, d, generator=gen)
    k, v = torch.randn(tk, hkv, d, generator=gen), torch.randn(tk, hkv, d, generator=gen)
    cu_q = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, *torch.tensor(k_lens).cumsum(0).tolist()], dtype=torch.int32, device=device)
    q, k, v, do = (t.to(device=device, dtype=dtype) for t in (q, k, v, do))
    return q, k, v, do, cu_q, cu_k


def run_varlen(name, q, k, v, do, cu_q, cu_k, q_lens, k_lens, causal, scale=None):
    """(out, dq, dk, dv) of attention_varlen on a forced backend, via autograd."""
    from fastlm.ops.attn import attention_varlen

    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    with fastlm.use_backend(name):
        out = attention_varlen(q, k, v, cu_q, cu_k, max_seqlen_q=max(q_lens), max_seqlen_k=max(k_lens),
                               causal=causal, scale=scale)
    out.backward(do)
    return out.detach(), q.grad, k.grad, v.grad


def per_sequence64(q, k, v, do, q_lens, k_lens, causal, scale=None):
    """(out, dq, dk, dv) in float64: reference attention on each sequence alone, concatenated."""
    outs, dqs, dks, dvs = [], [], [], []
    qs = ks = 0
    for lq, lk in zip(q_lens, k_lens):
        qb, kb, vb = (t.double().transpose(0, 1)[None].requires_grad_()
                      for t in (q[qs:qs + lq], k[ks:ks + lk], v[ks:ks + lk]))
        out = reference.attention(qb, kb, vb, causal, scale)
        out.backward(do[qs:qs + lq].double().transpose(0, 1)[None])
        outs.append(out.detach()[0].transpose(0, 1))
        for acc, t in ((dqs, qb), (dks, kb), (dvs, vb)):
            acc.append(t.grad[0].transpose(0, 1))
        qs, ks = qs + lq, ks + lk
    return tuple(torch.cat(parts) for parts in (outs, dqs, dks, dvs))


# (query lengths, key lengths, H, Hkv, D, causal)
CASES = [
    ([5, 37, 1, 20], [5, 37, 1, 20], 2, 2, 64, True),  # self-attention packing
    ([5, 37, 1, 20], [5, 37, 1, 20], 4, 1, 40, False),  # MQA, D = 40
    ([3, 17, 9], [12, 17, 30], 4, 2, 32, True),  # Tq < Tk per sequence (cached prefixes)
    ([12, 0, 9, 7], [3, 5, 0, 9], 2, 1, 96, True),  # Tq > Tk, an empty query seq, a seq with no key
]


@pytest.mark.parametrize("q_lens,k_lens,h,hkv,d,causal", CASES, ids=["self", "mqa-d40", "prefix", "empty-seqs"])
def test_varlen_equals_attention_on_each_sequence(q_lens, k_lens, h, hkv, d, causal):
    q, k, v, do, cu_q, cu_k = packed(q_lens, k_lens, h, hkv, d)
    got = run_varlen("triton", q, k, v, do, cu_q, cu_k, q_lens, k_lens, causal)
    want = per_sequence64(q, k, v, do, q_lens, k_lens, causal)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert not torch.isnan(g).any(), name
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


def test_varlen_lse_layout_and_empty_rows():
    q_lens, k_lens = [4, 6], [0, 6]
    q, k, v, _, cu_q, cu_k = packed(q_lens, k_lens, 2, 2, 32)
    out, lse = torch.ops.fastlm.attention_varlen(q, k, v, cu_q, cu_k, 4, 6, True, None, None, None, "triton")
    ref_out, ref_lse = torch.ops.fastlm.attention_varlen(q, k, v, cu_q, cu_k, 4, 6, True, None, None, None, "reference")
    assert lse.shape == (2, 10) and lse.dtype == torch.float32
    assert torch.isinf(lse[:, :4]).all() and torch.isfinite(lse[:, 4:]).all()  # the first sequence has no key
    assert torch.equal(out[:4], torch.zeros_like(out[:4]))
    torch.testing.assert_close(lse[:, 4:], ref_lse[:, 4:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-4)


def test_no_attention_across_documents():
    """Changing one document's keys and values leaves every other document's outputs unchanged."""
    from fastlm.ops.attn import attention_varlen

    lens = [9, 14, 6]
    q, k, v, _, cu, _ = packed(lens, lens, 2, 1, 32)
    k2, v2 = k.clone(), v.clone()
    k2[9:23] += 3.0
    v2[9:23] -= 2.0
    with fastlm.use_backend("triton"):
        a = attention_varlen(q, k, v, cu, cu, max_seqlen_q=14, max_seqlen_k=14, causal=False)
        b = attention_varlen(q, k2, v2, cu, cu, max_seqlen_q=14, max_seqlen_k=14, causal=False)
    assert torch.equal(a[:9], b[:9]) and torch.equal(a[23:], b[23:])
    assert not torch.allclose(a[9:23], b[9:23])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_varlen_low_precision_within_twice_torch_error(dtype):
    """flash-attention's rule against torch's per-sequence attention in the same dtype."""
    q_lens, k_lens = [17, 33, 2], [17, 40, 9]
    q, k, v, do, cu_q, cu_k = packed(q_lens, k_lens, 4, 2, 64, dtype=dtype)
    got = run_varlen("triton", q, k, v, do, cu_q, cu_k, q_lens, k_lens, True)
    ref = per_sequence64(q, k, v, do, q_lens, k_lens, True)
    torch_same = _per_sequence_same_dtype(q, k, v, do, q_lens, k_lens, True)
    for name, g, t, r in zip(("out", "dq", "dk", "dv"), got, torch_same, ref):
        err, torch_err = (g.double() - r).abs().max().item(), (t.double() - r).abs().max().item()
        assert err <= 2 * torch_err + 1e-3, f"{name}: {err:.3g} > 2 x {torch_err:.3g} + 1e-3"


def _per_sequence_same_dtype(q, k, v, do, q_lens, k_lens, causal):
    """Plain PyTorch SDPA math in q's dtype per sequence (bottom-right causal mask), with autograd."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    outs, qs, ks = [], 0, 0
    group = q.shape[1] // k.shape[1]
    for lq, lk in zip(q_lens, k_lens):
        qb = q[qs:qs + lq].transpose(0, 1)
        kb, vb = (t[ks:ks + lk].transpose(0, 1).repeat_interleave(group, 0) for t in (k, v))
        mask = reference.attention_mask(lq, lk, causal=causal, key_lens=None, device=q.device)[0, 0]
        scores = (qb @ kb.transpose(-1, -2)) * q.shape[-1] ** -0.5
        probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
        outs.append((probs @ vb).transpose(0, 1))
        qs, ks = qs + lq, ks + lk
    out = torch.cat(outs)
    out.backward(do)
    return out.detach(), q.grad, k.grad, v.grad


def test_varlen_deterministic_backward_is_bit_identical(monkeypatch):
    monkeypatch.setenv("FASTLM_DETERMINISTIC", "1")
    lens = [7, 30, 12]
    q, k, v, do, cu, _ = packed(lens, lens, 4, 1, 32)
    first = run_varlen("triton", q, k, v, do, cu, cu, lens, lens, True)
    second = run_varlen("triton", q, k, v, do, cu, cu, lens, lens, True)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_varlen_split_heads_backward(attention_triton):
    fwd_kernels, attention_bwd = attention_triton.kernel_modules()

    q_lens, k_lens = [7, 30, 12], [9, 30, 4]
    q, k, v, do, cu_q, cu_k = packed(q_lens, k_lens, 4, 2, 32)
    out, lse = fwd_kernels.attention_varlen_forward(q, k, v, cu_q, cu_k, 30, 30, True)
    grads = attention_bwd.attention_varlen_backward(do, q, k, v, cu_q, cu_k, 30, 30, True, None, out, lse,
                                                    deterministic=False, split_heads=True)
    want = per_sequence64(q, k, v, do, q_lens, k_lens, True)
    for g, w in zip((out, *grads), want):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-4)


def test_reference_backend_equals_per_sequence_attention():
    q_lens, k_lens = [4, 9, 1], [6, 9, 3]
    q, k, v, do, cu_q, cu_k = packed(q_lens, k_lens, 4, 2, 16, dtype=torch.float64, device="cpu")
    got = run_varlen("reference", q, k, v, do, cu_q, cu_k, q_lens, k_lens, True, scale=0.4)
    want = per_sequence64(q, k, v, do, q_lens, k_lens, True, scale=0.4)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("causal", [False, True])
def test_opcheck_varlen_reference(causal):
    q, k, v, _, cu_q, cu_k = packed([3, 0, 5], [4, 2, 5], 4, 2, 8, dtype=torch.float64, device="cpu")
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), cu_q, cu_k, 5, 5, causal, None, None, None)
    torch.library.opcheck(torch.ops.fastlm.attention_varlen.default, (*args, "reference"))


def test_opcheck_varlen_triton():
    q, k, v, _, cu_q, cu_k = packed([3, 9], [4, 9], 2, 1, 32)
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), cu_q, cu_k, 9, 9, True, None, None, None)
    torch.library.opcheck(torch.ops.fastlm.attention_varlen.default, (*args, "triton"))


def test_torch_compile_traces_the_varlen_op():
    lens = [5, 12]
    q, k, v, do, cu, _ = packed(lens, lens, 2, 1, 32)

    def block(q, k, v, cu):
        return torch.ops.fastlm.attention_varlen(q, k, v, cu, cu, 12, 12, True, None, None, None, "triton")[0]

    torch._dynamo.reset()
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    out = compiled(qg, kg, vg, cu)
    out.backward(do)
    expected = run_varlen("triton", q, k, v, do, cu, cu, lens, lens, True)
    for got, want in zip((out.detach(), qg.grad, kg.grad, vg.grad), expected):
        torch.testing.assert_close(got, want)


def _call(q=None, k=None, v=None, cu_q=None, cu_k=None, max_q=4, max_k=4):
    from fastlm.ops.attn import attention_varlen

    q = torch.randn(6, 4, 8) if q is None else q
    k = torch.randn(6, 2, 8) if k is None else k
    v = torch.randn(*k.shape) if v is None else v
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    return attention_varlen(q, k, v, cu if cu_q is None else cu_q, cu if cu_k is None else cu_k,
                            max_seqlen_q=max_q, max_seqlen_k=max_k)


@pytest.mark.parametrize("call,error,match", [
    (lambda: _call(q=torch.randn(1, 6, 4, 8)), ValueError, "expected q with 3 dims"),
    (lambda: _call(k=torch.randn(6, 3, 8)), ValueError, "multiple of the 3 key/value heads"),
    (lambda: _call(k=torch.randn(6, 2, 16)), ValueError, "head dims differ"),
    (lambda: _call(v=torch.randn(5, 2, 8)), ValueError, "same shape"),
    (lambda: _call(k=torch.randn(6, 2, 8, dtype=torch.float64)), TypeError, "one dtype"),
    (lambda: _call(cu_q=torch.tensor([0, 2, 6])), TypeError, "torch.int32"),
    (lambda: _call(cu_q=torch.tensor([[0, 2, 6]], dtype=torch.int32)), ValueError, r"\(num_seqs \+ 1,\)"),
    (lambda: _call(cu_q=torch.tensor([1, 2, 6], dtype=torch.int32)), ValueError, "start at 0"),
    (lambda: _call(cu_q=torch.tensor([0, 4, 2], dtype=torch.int32)), ValueError, "non-decreasing"),
    (lambda: _call(cu_k=torch.tensor([0, 2, 5], dtype=torch.int32)), ValueError, "must equal the 6 packed tokens"),
    (lambda: _call(cu_k=torch.tensor([0, 6], dtype=torch.int32)), ValueError, "same number of sequences"),
    (lambda: _call(max_q=3), ValueError, r"max_seqlen_q=3 is shorter than the longest sequence \(4\)"),
    (lambda: _call(max_k=-1), ValueError, "max_seqlen_k must be an integer >= 0"),
], ids=["ndim", "heads", "head-dim", "kv-shape", "dtype", "cu-dtype", "cu-shape", "cu-start", "cu-order",
        "cu-total", "num-seqs", "max-seqlen", "max-negative"])
def test_varlen_input_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_varlen_triton_limits():
    from fastlm.ops.attn import attention_varlen

    q = torch.randn(4, 2, 300, device=DEVICE)
    cu = torch.tensor([0, 4], dtype=torch.int32, device=DEVICE)
    with fastlm.use_backend("triton"), pytest.raises(ValueError, match="head dims 1..256, got D=300"):
        attention_varlen(q, q, q, cu, cu, max_seqlen_q=4, max_seqlen_k=4)


def test_importing_fastlm_does_not_import_triton():
    import subprocess
    import sys

    code = "import fastlm, fastlm.ops.attention_triton, sys; assert 'triton' not in sys.modules, 'triton imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------------------------------
# GPU: realistic packings (autotuned kernels)
# ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("d,h,hkv", [(64, 8, 8), (128, 16, 4), (96, 8, 1)], ids=["d64", "d128-gqa", "d96-mqa"])
def test_gpu_varlen_within_twice_torch_error(dtype, d, h, hkv):
    q_lens = [1, 511, 2048, 77, 1000, 3]
    q, k, v, do, cu, _ = packed(q_lens, q_lens, h, hkv, d, dtype=dtype, device="cuda")
    got = run_varlen("triton", q, k, v, do, cu, cu, q_lens, q_lens, True)
    ref = per_sequence64(q, k, v, do, q_lens, q_lens, True)
    torch_same = _per_sequence_same_dtype(q, k, v, do, q_lens, q_lens, True)
    for name, g, t, r in zip(("out", "dq", "dk", "dv"), got, torch_same, ref):
        err, torch_err = (g.double() - r).abs().max().item(), (t.double() - r).abs().max().item()
        assert err <= 2 * torch_err + 1e-3, f"{name}: {err:.3g} > 2 x {torch_err:.3g} + 1e-3"


@pytest.mark.gpu
def test_gpu_varlen_equals_padded_dense_with_key_lens():
    """Packed documents vs the same documents right-padded into a dense batch with key_lens."""
    from fastlm.ops.attn import attention_varlen

    lens = [300, 1024, 17, 640]
    q, k, v, _, cu, _ = packed(lens, lens, 8, 2, 128, dtype=torch.bfloat16, device="cuda")
    with fastlm.use_backend("triton"):
        out = attention_varlen(q, k, v, cu, cu, max_seqlen_q=1024, max_seqlen_k=1024, causal=False)
        dense = [torch.zeros(len(lens), 1024, t.shape[1], 128, dtype=t.dtype, device="cuda") for t in (q, k, v)]
        for i, (s, n) in enumerate(zip(cu[:-1].tolist(), lens)):
            for pad, t in zip(dense, (q, k, v)):
                pad[i, :n] = t[s:s + n]
        key_lens = torch.tensor(lens, device="cuda")
        padded = ops.attention(*(t.transpose(1, 2) for t in dense), key_lens=key_lens).transpose(1, 2)
    for i, (s, n) in enumerate(zip(cu[:-1].tolist(), lens)):
        torch.testing.assert_close(out[s:s + n], padded[i, :n], rtol=2e-2, atol=2e-2)
