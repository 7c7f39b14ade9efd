"""Int8 ops: weight-only int8 linear (per channel / group-wise), W8A8 linear, per-token quantization.

Kernels are checked against the dequantized float64 formula on CPU under TRITON_INTERPRET=1
(set by conftest) with odd shapes: rows 1 (GEMV), 5 (decode tile), 17 and 40 (prefill), inner dims
not a multiple of the block, split-K, and group sizes that align with the K tile (32), are
smaller than it (16) or straddle it (40). GPU versions run the same checks at model shapes.
"""

import pytest
import torch

import fastlm
from fastlm import ops
from fastlm.ops import int8 as int8_ops, reference
from fastlm.ops.backend import kernel_module
from fastlm.ops.int8_triton import dequantize_int8, quantize_per_token, w8a8_linear

K, N = 80, 48  # K: not a multiple of BLOCK_K = 32; N: a partial BLOCK_N = 32 tile


def _weights(group_size=None, n=N, k=K, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.logspace(-2, 0, n)[:, None]
    q, s = ops.quantize_int8(w.to(device), group_size=group_size)
    return q, s


def _formula(x, q, s, bias=None):
    """x·(q·s)ᵀ + bias in float64."""
    y = x.double() @ dequantize_int8(q, s).double().T
    return y if bias is None else y + bias.double()


def _check(out, x, q, s, bias, atol=1e-5):
    """flash-attention's rule: at most twice the reference backend's own error in this dtype."""
    truth = _formula(x, q, s, bias)
    with fastlm.use_backend("reference"):
        same_dtype = ops.int8_linear(x, q, s, bias)
    bound = 2 * (same_dtype.double() - truth).abs().max().item() + atol
    assert out.dtype == x.dtype and out.shape == truth.shape
    assert (out.double() - truth).abs().max().item() <= bound


@pytest.mark.parametrize(
    "rows,group_size,dtype,bias,k",
    [
        (1, None, torch.float32, True, K),  # GEMV
        (1, 16, torch.bfloat16, False, K),
        (1, 32, torch.float32, True, 96),
        (5, 40, torch.float32, True, K),  # decode tile (tl.dot), groups straddling the K tile
        (5, None, torch.bfloat16, True, K),
        (17, None, torch.float32, False, K),  # prefill
        (17, 32, torch.bfloat16, True, 96),  # groups aligned with the K tile: scaled partial sums
        (40, 16, torch.float32, True, K),
    ],
)
def test_int8_linear_triton_matches_dequantized_reference(rows, group_size, dtype, bias, k):
    q, s = _weights(group_size, k=k)
    x = torch.randn(rows, k).to(dtype)
    b = torch.randn(N).to(dtype) if bias else None
    with fastlm.use_backend("triton"):
        out = ops.int8_linear(x, q, s, b)
    _check(out, x, q, s, b)


def test_int8_linear_triton_batched_input():
    q, s = _weights(16)
    x = torch.randn(2, 3, K)  # 6 rows: decode path, leading dims flattened
    with fastlm.use_backend("triton"):
        out = ops.int8_linear(x, q, s)
    assert out.shape == (2, 3, N)
    _check(out, x, q, s, None)


@pytest.mark.parametrize("rows,group_size,split", [(1, None, 2), (4, 16, 2), (1, 40, 3)])
def test_decode_split_k(rows, group_size, split):
    q, s = _weights(group_size)
    x, b = torch.randn(rows, K), torch.randn(N)
    out = kernel_module("int8").int8_linear_forward(x, q, s, b, split_k=split)
    _check(out, x, q, s, b)


@pytest.mark.parametrize("group_size", [None, 16])
def test_int8_linear_backward_triton(group_size):
    q, s = _weights(group_size)
    x = torch.randn(17, K, requires_grad=True)
    b = torch.randn(N, requires_grad=True)
    dy = torch.randn(17, N)
    with fastlm.use_backend("triton"):
        ops.int8_linear(x, q, s, b).backward(dy)
    dx_expected = dy.double() @ dequantize_int8(q, s).double()
    torch.testing.assert_close(x.grad.double(), dx_expected, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(b.grad, dy.sum(0), atol=1e-5, rtol=1e-5)


def test_reference_group_wise_int8_linear_and_backward():
    q, s = _weights(20)
    x = torch.randn(3, K, dtype=torch.float32, requires_grad=True)
    out = ops.int8_linear(x, q, s)
    torch.testing.assert_close(out.double(), _formula(x.detach(), q, s), atol=1e-4, rtol=1e-5)
    out.sum().backward()
    torch.testing.assert_close(x.grad.double(), dequantize_int8(q, s).double().sum(0).expand(3, K), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("group_size", [None, 8, 40])
def test_quantize_int8_error_within_half_step(group_size):
    w = torch.randn(13, K) * torch.logspace(-3, 1, 13)[:, None]
    w[2] = 0.0
    q, s = ops.quantize_int8(w, group_size=group_size)
    expected_shape = (13,) if group_size is None else (13, K // group_size)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == expected_shape
    assert q.abs().max() <= 127
    step = s[:, None] if s.dim() == 1 else s.repeat_interleave(group_size, dim=1)
    assert ((dequantize_int8(q, s) - w).abs() <= step / 2 * (1 + 1e-5)).all()
    assert (q[2] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("smooth", [False, True])
def test_quantize_per_token_triton_is_exact(dtype, smooth):
    x = (torch.randn(17, K) * torch.logspace(-2, 1, 17)[:, None]).to(dtype)
    x[4] = 0.0  # zero row: scale 1, all zeros
    c = torch.rand(K) + 0.5 if smooth else None
    expected_q, expected_s = int8_ops.quantize_per_token_reference(x, c)
    with fastlm.use_backend("triton"):
        got_q, got_s = quantize_per_token(x, c)
    assert torch.equal(got_q, expected_q) and torch.equal(got_s, expected_s)
    assert expected_s[4] == 1.0 and (expected_q[4] == 0).all()
    xs = x.float() / (c if smooth else 1.0)
    assert ((expected_q.float() * expected_s[:, None] - xs).abs() <= expected_s[:, None] / 2 * (1 + 1e-5)).all()


def _w8a8_formula(x, q, ws, bias, smooth):
    xq, sx = int8_ops.quantize_per_token_reference(x, smooth)
    y = (xq.double() @ q.double().T) * sx.double()[:, None] * ws.double()[None, :]
    return y if bias is None else y + bias.double()


@pytest.mark.parametrize("rows,dtype,fused", [(1, torch.float32, True), (17, torch.bfloat16, True),
                                              (17, torch.float32, False), (40, torch.bfloat16, False)])
def test_w8a8_triton_matches_reference(rows, dtype, fused):
    c = torch.rand(K) + 0.5
    w = torch.randn(N, K) * c[None, :]  # a smoothed weight
    q, ws = ops.quantize_int8(w)
    x = torch.randn(rows, K).to(dtype)
    b = torch.randn(N).to(dtype)
    out = kernel_module("int8").w8a8_linear_forward(x, q, ws, b, c, fused=fused)
    ref = int8_ops.w8a8_linear_reference(x, q, ws, b, c)
    truth = _w8a8_formula(x, q, ws, b, c)
    # The int32 accumulators are identical; only the float epilogue's rounding may differ.
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.double(), truth, atol=tol * truth.abs().max().item(), rtol=0)
    torch.testing.assert_close(ref.double(), truth, atol=tol * truth.abs().max().item(), rtol=0)


def test_w8a8_dispatch_through_the_op():
    q, ws = _weights()
    x = torch.randn(2, 3, K)
    with fastlm.use_backend("triton"):
        out = w8a8_linear(x, q, ws)
    ref = w8a8_linear(x, q, ws)  # reference backend (CPU default): torch._int_mm
    assert out.shape == (2, 3, N)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # W8A8 stays close to the float product of the dequantized weight
    float_out = x @ dequantize_int8(q, ws).T
    assert (ref - float_out).abs().max() < 0.05 * float_out.abs().max()


@pytest.mark.parametrize("m,k,n", [(1, 13, 7), (17, 80, 48), (3, 8, 8)])
def test_int_mm_is_exact(m, k, n):
    a = torch.randint(-127, 128, (m, k), dtype=torch.int8)
    b = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    assert torch.equal(int8_ops.int_mm(a, b), a.long() @ b.long().T)


@pytest.mark.parametrize("name,args", [
    ("quantize_per_token", (torch.randn(3, 5, 12), None)),
    ("quantize_per_token", (torch.randn(4, 12), torch.rand(12) + 0.5)),
    ("w8a8_linear", (torch.randn(3, 5, 12), *reference.quantize_int8(torch.randn(10, 12)), torch.randn(10), None)),
    ("w8a8_linear", (torch.randn(4, 12), *reference.quantize_int8(torch.randn(10, 12)), None, torch.rand(12) + 0.5)),
])
def test_opcheck(name, args):
    torch.library.opcheck(getattr(torch.ops.fastlm, name).default, (*args, "reference"))


def _t(*shape, dtype=torch.float32):
    return torch.zeros(shape, dtype=dtype)


@pytest.mark.parametrize("call,error,match", [
    (lambda: ops.int8_linear(_t(2, 80), _t(5, 80, dtype=torch.int8), _t(5, 7)), ValueError, r"scales of shape \(5,\)"),
    (lambda: ops.int8_linear(_t(2, 80), _t(5, 80, dtype=torch.int8), _t(4, 8)), ValueError, r"\(5, G\)"),
    (lambda: ops.quantize_int8(_t(4, 80), group_size=7), ValueError, "group_size"),
    (lambda: ops.quantize_int8(_t(4, 80, 2), group_size=8), ValueError, "2 dims"),
    (lambda: w8a8_linear(_t(2, 8), _t(5, 8, dtype=torch.int8), _t(5, 2)), ValueError, r"w_scales of shape \(5,\)"),
    (lambda: w8a8_linear(_t(2, 8), _t(5, 8), _t(5)), TypeError, "int8"),
    (lambda: w8a8_linear(_t(2, 7), _t(5, 8, dtype=torch.int8), _t(5)), ValueError, "input features"),
    (lambda: w8a8_linear(_t(2, 8), _t(5, 8, dtype=torch.int8), _t(5), _t(4)), ValueError, "bias of shape"),
    (lambda: w8a8_linear(_t(2, 8), _t(5, 8, dtype=torch.int8), _t(5), None, _t(7)), ValueError, "smooth of shape"),
    (lambda: quantize_per_token(_t(2, 8), -torch.ones(8)), ValueError, "> 0"),
    (lambda: quantize_per_token(_t(2, 0)), ValueError, "K >= 1"),
    (lambda: quantize_per_token(_t(2, 4, dtype=torch.int8)), TypeError, "floating-point"),
    (lambda: dequantize_int8(_t(5, 8, dtype=torch.int8), _t(5, 3)), ValueError, "scales of shape"),
])
def test_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_triton_kernels_reject_float64():
    q, s = _weights()
    with fastlm.use_backend("triton"), pytest.raises(TypeError, match="float16/bfloat16/float32"):
        ops.int8_linear(torch.randn(2, K, dtype=torch.float64), q, s)


# ---- GPU ----------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 7, 16, 17, 300])
@pytest.mark.parametrize("group_size", [None, 128, 96])
def test_int8_linear_triton_gpu(rows, group_size):
    q, s = _weights(group_size, n=1000, k=1920, device="cuda")  # K: not a multiple of 256 or 512
    x = torch.randn(rows, 1920, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(1000, device="cuda", dtype=torch.bfloat16)
    with fastlm.use_backend("triton"):
        out = ops.int8_linear(x, q, s, b)
    _check(out, x, q, s, b, atol=1e-3)


@pytest.mark.gpu
def test_int8_linear_backward_triton_gpu():
    q, s = _weights(128, n=512, k=1024, device="cuda")
    x = torch.randn(33, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(33, 512, device="cuda", dtype=torch.bfloat16)
    with fastlm.use_backend("triton"):
        ops.int8_linear(x, q, s).backward(dy)
    truth = dy.double() @ dequantize_int8(q, s).double()
    bf16 = (dy.float() @ dequantize_int8(q, s)).bfloat16()
    assert (x.grad.double() - truth).abs().max() <= 2 * (bf16.double() - truth).abs().max() + 1e-3


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("rows", [1, 16, 17, 513])
@pytest.mark.parametrize("k,n", [(4096, 1024), (1000, 1003)])  # the second: K, N not multiples of 8
def test_w8a8_gpu(backend, rows, k, n):
    ok, why = fastlm.ops.backend_status(backend, "cuda")
    if not ok:
        pytest.skip(why)
    c = torch.rand(k, device="cuda") + 0.5
    q, ws = ops.quantize_int8(torch.randn(n, k, device="cuda") * c[None, :])
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    with fastlm.use_backend(backend):
        out = w8a8_linear(x, q, ws, b, c)
        xq, sx = quantize_per_token(x, c)
    ref_q, ref_s = int8_ops.quantize_per_token_reference(x, c)
    assert torch.equal(sx, ref_s)
    assert (xq.int() - ref_q.int()).abs().max() <= 1 and (xq != ref_q).float().mean() < 1e-4
    truth = _w8a8_formula(x, q, ws, b, c)
    torch.testing.assert_close(out.double(), truth, atol=1e-2 * truth.abs().max().item(), rtol=0)
