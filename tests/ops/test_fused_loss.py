"""fused_linear_cross_entropy against F.cross_entropy(hidden @ weight.T): loss, d hidden and
d weight, on the reference backend (chunked plain PyTorch) and the triton backend (under the
interpreter on CPU), with ignored targets, tied weights, autocast, and the custom op's opcheck.

Low precision follows flash-attention's rule against the float64 truth on the same inputs:
error ≤ 2 · error of the unfused PyTorch in that dtype + atol.
"""

import math

import pytest
import torch
import torch.nn.functional as F

import fastlm
from fastlm.ops import backend
from fastlm.ops.fused_loss import NAME, default_chunk_size, fused_linear_cross_entropy

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 4e-3}


def _backends():
    params = [pytest.param("reference", id="reference")]
    try:
        import triton  # noqa: F401
    except ImportError:
        return params + [pytest.param("triton", id="triton", marks=pytest.mark.skip(reason="triton not installed"))]
    import fastlm.ops.triton  # noqa: F401  the kernel adapters

    return params + [pytest.param("triton", id="triton")]


BACKENDS = _backends()


def make(n, h, v, dtype=torch.float64, ignored=(), seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).to(DEVICE, dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g) / math.sqrt(h)).to(DEVICE, dtype).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=g).to(DEVICE)
    for i in ignored:
        targets[i] = -100
    return hidden, weight, targets


def fused(hidden, weight, targets, backend_name, grad=None, **kwargs):
    """(loss, d hidden, d weight) of the fused op on a forced backend."""
    h, w = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    with fastlm.use_backend(backend_name):
        loss = fused_linear_cross_entropy(h, w, targets, **kwargs)
    loss.backward(grad)
    return loss.detach(), h.grad, w.grad


def unfused(hidden, weight, targets, grad=None, ignore_index=-100, dtype=None):
    """The unfused PyTorch: logits = h·Wᵀ in the inputs' dtype, cross-entropy in float32
    (``dtype``: cast the inputs first, e.g. to float64 for the truth)."""
    h = hidden.detach().to(dtype or hidden.dtype).requires_grad_()
    w = weight.detach().to(dtype or weight.dtype).requires_grad_()
    logits = h @ w.t()
    loss = F.cross_entropy(logits.float() if logits.dtype != torch.float64 else logits, targets,
                           ignore_index=ignore_index)
    loss.backward(grad)
    return loss.detach(), h.grad, w.grad


# ---- exactness in float64 -------------------------------------------------------------------


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("n,chunk", [(1, None), (17, 5), (17, 17), (17, 1000), (129, 32)])
def test_matches_unfused_float64(backend_name, n, chunk):
    hidden, weight, targets = make(n, 40, 257, ignored=[0, 5] if n > 1 else [])  # n_valid 15, 127
    got = fused(hidden, weight, targets, backend_name, chunk_size=chunk)
    expected = unfused(hidden, weight, targets)
    for name, g, e in zip(("loss", "d hidden", "d weight"), got, expected):
        torch.testing.assert_close(g, e, atol=1e-10, rtol=1e-9, msg=name)


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_vocab_not_a_multiple_of_the_block_float32(backend_name):
    hidden, weight, targets = make(33, 40, 4097, dtype=torch.float32, ignored=[3, 4])
    targets[5] = 4096  # the last column
    got = fused(hidden, weight, targets, backend_name, chunk_size=8)
    expected = unfused(hidden, weight, targets, dtype=torch.float64)
    for name, g, e in zip(("loss", "d hidden", "d weight"), got, expected):
        torch.testing.assert_close(g.double(), e, atol=2e-6, rtol=1e-5, msg=name)


def test_custom_ignore_index_leading_dims_and_grad_scale():
    hidden, weight, targets = make(12, 16, 31)
    targets[[1, 7]] = 3  # ignore_index=3 drops these rows *and* any other row whose target is 3
    h3, t2 = hidden.detach().view(3, 4, 16).requires_grad_(), targets.view(3, 4)
    w = weight.detach().clone().requires_grad_()
    loss = fused_linear_cross_entropy(h3, w, t2, ignore_index=3, chunk_size=5)
    (loss * 2.5).backward()
    e_loss, e_dh, e_dw = unfused(hidden, weight, targets, grad=torch.tensor(2.5, dtype=torch.float64), ignore_index=3)
    torch.testing.assert_close(loss.detach(), e_loss)
    torch.testing.assert_close(h3.grad.view(12, 16), e_dh)
    torch.testing.assert_close(w.grad, e_dw)


def test_backward_twice_with_retain_graph_gives_the_same_gradients():
    """The saved gradients are scaled into new tensors, never in place."""
    hidden, weight, targets = make(9, 8, 13)
    loss = fused_linear_cross_entropy(hidden, weight, targets, chunk_size=4)
    first = torch.autograd.grad(loss * 3.0, [hidden, weight], retain_graph=True)
    second = torch.autograd.grad(loss * 3.0, [hidden, weight])
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_incoming_gradient_scales_in_float32(dtype):
    """loss / 3 (gradient accumulation): the saved gradients are scaled by a float32 1/3."""
    hidden, weight, targets = make(8, 16, 37, dtype=dtype)
    _, dh, dw = fused(hidden, weight, targets, "reference", chunk_size=3)
    _, dh3, dw3 = fused(hidden, weight, targets, "reference", grad=torch.tensor(1 / 3), chunk_size=3)
    if dtype == torch.bfloat16:  # the saved dh is the grad-1 one: one float32 scaling, one rounding
        assert torch.equal(dh3, (dh.float() / 3).to(dtype))
    ulp = torch.finfo(dtype).eps  # dw3 rounds the float32 accumulator / 3, dw / 3 rounds twice
    torch.testing.assert_close(dh3.float(), dh.float() / 3, atol=0, rtol=ulp)
    torch.testing.assert_close(dw3.float(), dw.float() / 3, atol=0, rtol=ulp)


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_all_targets_ignored_gives_nan_loss_and_zero_gradients(backend_name):
    """PyTorch's cross_entropy returns NaN (0/0) for the loss; the gradients here are zero."""
    hidden, weight, targets = make(5, 8, 11, ignored=range(5))
    loss, dh, dw = fused(hidden, weight, targets, backend_name, chunk_size=2)
    assert torch.isnan(loss) and torch.isnan(unfused(hidden, weight, targets)[0])
    assert (dh == 0).all() and (dw == 0).all()


def test_tied_weight_accumulates_embedding_and_head_gradients():
    """A weight shared by the embedding and the LM head gets the sum of both gradients."""
    torch.manual_seed(0)
    emb = torch.randn(23, 16, dtype=torch.float64, requires_grad=True)
    proj = torch.randn(16, 16, dtype=torch.float64, requires_grad=True)
    ids, targets = torch.randint(0, 23, (2, 7)), torch.randint(0, 23, (2, 7))
    targets[0, :2] = -100

    def grads(loss_fn):
        emb.grad = proj.grad = None
        hidden = torch.tanh(F.embedding(ids, emb) @ proj)  # (2, 7, 16)
        loss_fn(hidden).backward()
        return emb.grad.clone(), proj.grad.clone()

    got = grads(lambda h: fused_linear_cross_entropy(h, emb, targets, chunk_size=3))
    expected = grads(lambda h: F.cross_entropy((h @ emb.t()).view(-1, 23), targets.view(-1)))
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)


# ---- only the needed gradients ----------------------------------------------------------------


@pytest.fixture
def recorded_flags(monkeypatch):
    """The (need_dh, need_dw) flags each reference-kernel call received."""
    calls = []
    kernel = backend.kernel_for(NAME, "reference")

    def spy(hidden, weight, targets, ignore_index, chunk_size, need_dh, need_dw):
        calls.append((need_dh, need_dw))
        return kernel(hidden, weight, targets, ignore_index, chunk_size, need_dh, need_dw)

    monkeypatch.setitem(backend._KERNELS, (NAME, "reference"), spy)
    return calls


def test_eval_computes_no_gradients(recorded_flags):
    hidden, weight, targets = make(6, 8, 13)
    with torch.no_grad():
        loss = fused_linear_cross_entropy(hidden, weight, targets)
    assert recorded_flags == [(False, False)]
    torch.testing.assert_close(loss, unfused(hidden, weight, targets)[0])
    out = torch.ops.fastlm.fused_linear_cross_entropy(hidden, weight, targets, -100, 4, False, False, "reference")
    assert out[1].numel() == 0 and out[2].numel() == 0


def test_frozen_head_gets_no_weight_gradient(recorded_flags):
    hidden, weight, targets = make(6, 8, 13)
    weight.requires_grad_(False)
    fused_linear_cross_entropy(hidden, weight, targets).backward()
    assert recorded_flags == [(True, False)] and weight.grad is None
    torch.testing.assert_close(hidden.grad, unfused(hidden, weight.detach().requires_grad_(), targets)[1])


# ---- low precision ----------------------------------------------------------------------------


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_within_twice_pytorch_error(backend_name, dtype):
    hidden, weight, targets = make(48, 40, 1000, dtype=dtype, ignored=[1, 2], seed=3)
    got = fused(hidden, weight, targets, backend_name, chunk_size=16)
    torch_same_dtype = unfused(hidden, weight, targets)
    truth = unfused(hidden, weight, targets, dtype=torch.float64)
    for name, g, t, e in zip(("loss", "d hidden", "d weight"), got, torch_same_dtype, truth):
        assert g.dtype == t.dtype, name
        err = (g.double() - e).abs().max().item()
        torch_err = (t.double() - e).abs().max().item()
        atol = ATOL[dtype] * max(1.0, e.abs().max().item()) * (1.0 if name == "loss" else 1e-2)
        assert err <= 2 * torch_err + atol, f"{name}: {err:.3g} > 2 × {torch_err:.3g} + {atol:.3g}"


def test_autocast_casts_to_the_autocast_dtype():
    """Float32 parameters under bfloat16 autocast: the matmuls run in bfloat16 (as F.linear's
    would), the gradients come back in float32."""
    hidden, weight, targets = make(10, 16, 37, dtype=torch.float32)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        loss = fused_linear_cross_entropy(hidden, weight, targets, chunk_size=4)
    loss.backward()
    assert hidden.grad.dtype == weight.grad.dtype == torch.float32
    expected = unfused(hidden.bfloat16(), weight.bfloat16(), targets)
    torch.testing.assert_close(loss, expected[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(weight.grad, expected[2].float(), atol=1e-4, rtol=1e-2)


# ---- registration, compile, errors ------------------------------------------------------------


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("need_dh,need_dw", [(True, True), (True, False), (False, False)])
def test_opcheck(backend_name, need_dh, need_dw):
    hidden, weight, targets = make(7, 8, 19, dtype=torch.float32, ignored=[2])
    hidden.requires_grad_(need_dh)
    weight.requires_grad_(need_dw)
    args = (hidden, weight, targets, -100, 3, need_dh, need_dw, backend_name)
    torch.library.opcheck(getattr(torch.ops.fastlm, NAME).default, args)


def test_torch_compile_traces_the_op():
    hidden, weight, targets = make(9, 8, 19, dtype=torch.float32)

    def loss_fn(h, w, t):
        return 2.0 * torch.ops.fastlm.fused_linear_cross_entropy(h, w, t, -100, 4, True, True, "reference")[0]

    compiled = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)
    loss = compiled(hidden, weight, targets)
    dh, dw = torch.autograd.grad(loss, [hidden, weight])
    e_loss, e_dh, e_dw = unfused(hidden, weight, targets, grad=torch.tensor(2.0))
    torch.testing.assert_close(loss.detach(), 2 * e_loss)
    torch.testing.assert_close(dh, e_dh)
    torch.testing.assert_close(dw, e_dw)


def test_dw_accumulation_by_vocabulary_slabs():
    """The "mm" strategy (float32 products of a vocabulary slab, then added), emulated on CPU."""
    from fastlm.ops.fused_loss import accumulate_by_slabs

    g = torch.Generator().manual_seed(0)
    dlogits = torch.randn(6, 23, generator=g).bfloat16()  # (C, V)
    h_chunk = torch.randn(6, 5, generator=g).bfloat16()  # (C, H)
    acc = torch.randn(23, 5, generator=g)
    expected = acc + dlogits.float().t() @ h_chunk.float()
    accumulate_by_slabs(acc, dlogits, h_chunk, lambda a, b, out: torch.mm(a.float(), b.float(), out=out), slab_rows=7)
    torch.testing.assert_close(acc, expected)


def test_default_chunk_size():
    assert default_chunk_size(8192, 128256) == 2048
    assert default_chunk_size(8192, 32000) == 8192
    assert default_chunk_size(5, 50) == 5 and default_chunk_size(0, 50) == 1


@pytest.mark.parametrize("change,error,match", [
    (lambda h, w, t: (h, w, t.int()), TypeError, "targets of dtype torch.int64"),
    (lambda h, w, t: (h, w, t.double()), TypeError, "targets of dtype torch.int64"),
    (lambda h, w, t: (h.long(), w, t), TypeError, "floating-point hidden"),
    (lambda h, w, t: (h, w.float(), t), TypeError, "one dtype"),
    (lambda h, w, t: (h, w[:, :5], t), ValueError, "must end in the weight's H=5"),
    (lambda h, w, t: (h, w[0], t), ValueError, r"weight of shape \(V, H\)"),
    (lambda h, w, t: (h, w, t[:3]), ValueError, "targets must have hidden's leading shape"),
    (lambda h, w, t: (h, w, t.clone().fill_(13)), ValueError, r"targets must be in \[0, 13\)"),
    (lambda h, w, t: (h, w, t.clone().fill_(-1)), ValueError, "ignore_index=-100"),
    (lambda h, w, t: (h.to("meta"), w, t), ValueError, "one device"),
])
def test_input_errors(change, error, match):
    hidden, weight, targets = make(6, 8, 13)
    with pytest.raises(error, match=match):
        fused_linear_cross_entropy(*change(hidden.detach(), weight.detach(), targets))


@pytest.mark.parametrize("kwargs,match", [
    ({"chunk_size": 0}, "chunk_size must be an integer >= 1"),
    ({"chunk_size": True}, "chunk_size must be an integer >= 1"),
    ({"ignore_index": 1.5}, "ignore_index must be an int"),
])
def test_argument_errors(kwargs, match):
    hidden, weight, targets = make(6, 8, 13)
    with pytest.raises((ValueError, TypeError), match=match):
        fused_linear_cross_entropy(hidden, weight, targets, **kwargs)


# ---- GPU --------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("backend_name", ["triton", "reference"])
def test_gpu_bf16_matches_unfused_with_less_memory(backend_name):
    import fastlm.ops.triton  # noqa: F401  the kernel adapters

    hidden, weight, targets = make(4096, 1024, 32000, dtype=torch.bfloat16, ignored=range(0, 4096, 7), seed=1)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    got = fused(hidden, weight, targets, backend_name, chunk_size=1024)
    fused_peak = torch.cuda.max_memory_allocated() - base
    del got
    torch.cuda.reset_peak_memory_stats()
    torch_same_dtype = unfused(hidden, weight, targets)
    unfused_peak = torch.cuda.max_memory_allocated() - base
    got = fused(hidden, weight, targets, backend_name, chunk_size=1024)
    truth = unfused(hidden, weight, targets, dtype=torch.float64)
    for name, g, t, e in zip(("loss", "d hidden", "d weight"), got, torch_same_dtype, truth):
        err = (g.double() - e).abs().max().item()
        torch_err = (t.double() - e).abs().max().item()
        atol = 1e-3 * max(1.0, e.abs().max().item()) * (1.0 if name == "loss" else 1e-2)
        assert err <= 2 * torch_err + atol, f"{name}: {err:.3g} > 2 × {torch_err:.3g} + {atol:.3g}"
    assert fused_peak < unfused_peak, (fused_peak, unfused_peak)
