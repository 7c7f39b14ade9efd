"""Triton LoRA kernels (fastlm.kernels.lora, .lora_sgmv) against the float64 reference.

On CPU they run under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1) with
tiny odd shapes (rows 1 and 17, in/out dims that are not multiples of the 16/32 tiles, ranks 1
and 8); the ``gpu`` tests repeat the checks at Llama sizes. Low precision follows
flash-attention's rule: max|kernel − truth| ≤ 2·max|PyTorch same dtype − truth| + atol, truth
being the float64 reference. The forward and every gradient (x, A, B, bias; W when it asks for
one) are checked.

fastlm.ops.lora is imported inside the tests, not at collection: importing it registers
the triton lora_linear kernel, which tests/ops/test_dispatch.py uses as its "op without a triton
kernel" until fastlm.ops imports this module for good.
"""

import pytest
import torch

import fastlm
from fastlm import ops
from fastlm.ops import reference

pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


@pytest.fixture(scope="module")
def lora_triton():
    from fastlm.ops import lora as lora_ops

    return lora_ops


def assert_within_rule(name, out, truth, torch_out):
    assert out.shape == truth.shape and out.dtype == torch_out.dtype, name
    err = (out.double() - truth).abs().max().item()
    torch_err = (torch_out.double() - truth).abs().max().item()
    atol = ATOL[out.dtype] * max(1.0, truth.abs().max().item())
    assert err <= 2 * torch_err + atol, (
        f"{name}: kernel error {err:.3g} > 2 × torch error {torch_err:.3g} + {atol:.3g}")


def run_op(fn, inputs, grad_out, backend):
    inputs = [t.detach().clone().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t for t in inputs]
    with fastlm.use_backend(backend):
        out = fn(*inputs)
    wanted = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    return out, list(torch.autograd.grad(out, wanted, grad_out))


def check(name, op, inputs, grad_out):
    """Triton backend vs float64 truth vs PyTorch in the same dtype, through the same public op."""
    out, grads = run_op(op, inputs, grad_out, "triton")
    torch_out, torch_grads = run_op(op, inputs, grad_out, "reference")
    as64 = [t.detach().double().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor)
            and t.dtype.is_floating_point else t for t in inputs]
    truth, truth_grads = run_op(op, as64, grad_out.double(), "reference")
    assert_within_rule(f"{name} out", out, truth, torch_out)
    assert len(grads) == len(truth_grads)
    for i, (g, t, tg) in enumerate(zip(grads, truth_grads, torch_grads)):
        assert g.dtype == tg.dtype, f"{name} grad {i} dtype"
        assert_within_rule(f"{name} grad {i}", g, t, tg)


def randn(*shape, dtype=torch.float32, grad=True, std=1.0):
    return (torch.randn(*shape, device=DEVICE) * std).to(dtype).requires_grad_(grad)


def lora_inputs(rows, in_f, out_f, r, dtype, bias=True, lead=()):
    x = randn(*lead, rows, in_f, dtype=dtype)
    w = randn(out_f, in_f, dtype=dtype, grad=False, std=in_f ** -0.5)
    a = randn(r, in_f, dtype=dtype, std=in_f ** -0.5)
    b = randn(out_f, r, dtype=dtype, std=0.5)
    return [x, w, a, b, 0.75, randn(out_f, dtype=dtype) if bias else None]


# ---- fastlm::lora_linear ---------------------------------------------------------------------


@pytest.mark.parametrize("rows,in_f,out_f,r", [(17, 40, 24, 8), (1, 40, 24, 1), (17, 24, 40, 1), (1, 33, 50, 8)])
def test_lora_linear_fp32(lora_triton, rows, in_f, out_f, r):
    torch.manual_seed(rows + in_f + r)
    inputs = lora_inputs(rows, in_f, out_f, r, torch.float32, bias=r == 8)
    check("lora_linear", ops.lora_linear, inputs, torch.randn(rows, out_f, device=DEVICE))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_lora_linear_half(lora_triton, dtype):
    torch.manual_seed(3)
    inputs = lora_inputs(17, 40, 24, 8, dtype, lead=(2,))  # 3-D x: (2, 17, 40)
    check("lora_linear", ops.lora_linear, inputs, torch.randn(2, 17, 24, device=DEVICE).to(dtype))


def test_lora_linear_weight_grad(lora_triton):
    """A W that asks for a gradient gets one."""
    torch.manual_seed(4)
    x, w, a, b, s, bias = lora_inputs(9, 30, 20, 4, torch.float32)
    check("lora_linear", ops.lora_linear, [x, w.detach().requires_grad_(), a, b, s, bias], torch.randn(9, 20))


def test_lora_linear_strided_input(lora_triton):
    """A column slice of a wider tensor is read with its row stride."""
    torch.manual_seed(5)
    _, w, a, b, s, bias = lora_inputs(9, 30, 20, 4, torch.float32)
    x = torch.randn(9, 60)[:, :30].requires_grad_()
    with fastlm.use_backend("triton"):
        out = ops.lora_linear(x, w, a, b, s, bias)
    (dx,) = torch.autograd.grad(out, [x], torch.ones_like(out))
    expected = reference.lora_linear(x, w, a, b, s, bias)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dx, torch.autograd.grad(expected, [x], torch.ones_like(out))[0], atol=1e-5, rtol=1e-5)


def test_frozen_weight_gets_no_gradient_or_copy(lora_triton, monkeypatch):
    torch.manual_seed(5)
    x, w, a, b, s, _ = lora_inputs(5, 24, 16, 2, torch.float32)
    kernels = fastlm.ops.backend.kernel_module("lora")
    seen = {}
    original = kernels.matmul

    def spy(xx, wt, *args, **kwargs):
        seen.setdefault("weights", []).append(wt.data_ptr())
        return original(xx, wt, *args, **kwargs)

    monkeypatch.setattr(kernels, "matmul", spy)
    with fastlm.use_backend("triton"):
        ops.lora_linear(x, w, a, b, s).sum().backward()
    assert w.grad is None and x.grad is not None and a.grad is not None and b.grad is not None
    assert seen["weights"] == [w.data_ptr(), w.data_ptr()]  # forward and dx read W in place


def test_lora_linear_opcheck(lora_triton):
    torch.manual_seed(6)
    x, w, a, b, s, bias = lora_inputs(5, 20, 12, 2, torch.float32)
    torch.library.opcheck(torch.ops.fastlm.lora_linear.default, (x, w, a, b, s, bias, "triton"))


def test_lora_linear_rejects_float64(lora_triton):
    x, w, a, b, s, _ = lora_inputs(3, 8, 8, 1, torch.float64)
    with fastlm.use_backend("triton"), pytest.raises(TypeError, match="float16, bfloat16 and float32"):
        ops.lora_linear(x, w, a, b, s)


# ---- fastlm::lora_linear_mixed ---------------------------------------------------------------


def mixed_inputs(rows, in_f, out_f, r, n, dtype, bias=True, seed=0):
    torch.manual_seed(seed)
    x = randn(rows, in_f, dtype=dtype)
    w = randn(out_f, in_f, dtype=dtype, grad=False, std=in_f ** -0.5)
    a = randn(n, r, in_f, dtype=dtype, std=in_f ** -0.5)
    b = randn(n, out_f, r, dtype=dtype, std=0.5)
    scales = torch.rand(n, device=DEVICE) + 0.5
    index = torch.randint(-1, n, (rows,), device=DEVICE)
    return [x, w, a, b, scales, index, randn(out_f, dtype=dtype) if bias else None]


@pytest.mark.parametrize("rows,r,n,dtype", [(17, 8, 3, torch.float32), (1, 1, 2, torch.float32),
                                            (17, 1, 4, torch.bfloat16), (17, 8, 3, torch.float16)],
                         ids=["17-r8-fp32", "1-r1-fp32", "17-r1-bf16", "17-r8-fp16"])
def test_lora_linear_mixed(lora_triton, rows, r, n, dtype):
    inputs = mixed_inputs(rows, 40, 24, r, n, dtype, bias=r == 8, seed=rows + r + n)
    check("lora_linear_mixed", lora_triton.lora_linear_mixed, inputs, torch.randn(rows, 24, device=DEVICE).to(dtype))


def test_mixed_equals_lora_linear_per_row(lora_triton):
    """Each row of a mixed batch equals lora_linear with that row's adapter (or plain linear)."""
    x, w, a, b, scales, index, bias = mixed_inputs(17, 40, 24, 4, 3, torch.float32, seed=7)
    index[:4] = torch.tensor([-1, 0, 1, 2])
    with fastlm.use_backend("triton"):
        out = lora_triton.lora_linear_mixed(x, w, a, b, scales, index, bias)
    for i in range(17):
        k = int(index[i])
        row = x[i:i + 1]
        expected = (torch.nn.functional.linear(row, w, bias) if k < 0 else
                    reference.lora_linear(row, w, a[k], b[k], float(scales[k]), bias))
        torch.testing.assert_close(out[i:i + 1], expected, atol=2e-5, rtol=1e-5)


def test_mixed_all_rows_without_adapter_and_empty(lora_triton):
    x, w, a, b, scales, index, bias = mixed_inputs(5, 24, 16, 2, 2, torch.float32, seed=8)
    with fastlm.use_backend("triton"):
        out = lora_triton.lora_linear_mixed(x, w, a, b, scales, torch.full_like(index, -1), bias)
        empty = lora_triton.lora_linear_mixed(x[:0], w, a, b, scales, index[:0], bias)
    torch.testing.assert_close(out, torch.nn.functional.linear(x, w, bias))
    assert empty.shape == (0, 16)


def test_mixed_opcheck(lora_triton):
    inputs = mixed_inputs(6, 20, 12, 2, 2, torch.float32, seed=9)
    torch.library.opcheck(torch.ops.fastlm.lora_linear_mixed.default, (*inputs, "triton"))
    torch.library.opcheck(torch.ops.fastlm.lora_linear_mixed.default, (*inputs, "reference"))


def test_mixed_reference_backward_formula_matches_autograd(lora_triton):
    """The explicit backward formula of the reference equals autograd through the reference."""
    torch.manual_seed(10)

    def t(*shape):
        return torch.randn(*shape, dtype=torch.float64, requires_grad=True)

    x, w, a, b, bias = t(7, 12), t(10, 12), t(2, 3, 12), t(2, 10, 3), t(10)
    scales, index = torch.tensor([0.5, 2.0]), torch.tensor([0, 1, -1, 1, 0, 0, -1])
    grad = torch.randn(7, 10, dtype=torch.float64)
    args = [x, w, a, b, scales, index, bias]
    expected = torch.autograd.grad(lora_triton.lora_linear_mixed_reference(*args), [x, w, a, b, bias], grad)
    formula = lora_triton.lora_linear_mixed_reference_backward(grad, *args)
    for e, f in zip(expected, formula):
        torch.testing.assert_close(f, e)


@pytest.mark.parametrize("call,error,match", [
    (lambda m, t: m(t(4, 8), t(6, 8), t(2, 3, 8), t(2, 6, 3), [1.0, 1.0], torch.zeros(4, dtype=torch.int64)),
     None, None),
    (lambda m, t: m(t(4, 8), t(6, 8), t(2, 3, 7), t(2, 6, 3), [1.0, 1.0], torch.zeros(4, dtype=torch.int64)),
     ValueError, "inner dims differ"),
    (lambda m, t: m(t(4, 8), t(6, 8), t(2, 3, 8), t(2, 6, 2), [1.0, 1.0], torch.zeros(4, dtype=torch.int64)),
     ValueError, r"lora_b of shape \(2, 6, 3\)"),
    (lambda m, t: m(t(4, 8), t(6, 8), t(2, 3, 8), t(2, 6, 3), [1.0], torch.zeros(4, dtype=torch.int64)),
     ValueError, "2 floating-point scales"),
    (lambda m, t: m(t(4, 8), t(6, 8), t(2, 3, 8), t(2, 6, 3), [1.0, 1.0], torch.zeros(3, dtype=torch.int64)),
     ValueError, r"adapter_index of shape \(4,\)"),
    (lambda m, t: m(t(4, 8), t(6, 8), t(2, 3, 8), t(2, 6, 3), [1.0, 1.0], torch.tensor([0, 1, 2, -1])),
     ValueError, r"in \[-1, 2\)"),
    (lambda m, t: m(t(4, 8), t(6, 8), t(2, 3, 8), t(2, 6, 3), [1.0, 1.0], torch.zeros(4)),
     TypeError, "int32/int64"),
])
def test_mixed_errors(lora_triton, call, error, match):
    def t(*shape):
        return torch.randn(*shape)

    if error is None:
        assert call(lora_triton.lora_linear_mixed, t).shape == (4, 6)
    else:
        with pytest.raises(error, match=match):
            call(lora_triton.lora_linear_mixed, t)


# ---- GPU: Llama-7B-sized projections ---------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,in_f,out_f", [(4096, 4096, 4096), (1000, 4096, 11008), (4097, 11008, 4096)])
def test_lora_linear_gpu(lora_triton, dtype, rows, in_f, out_f):
    torch.manual_seed(0)
    inputs = lora_inputs(rows, in_f, out_f, 16, dtype)
    check("lora_linear", ops.lora_linear, inputs, torch.randn(rows, out_f, device=DEVICE).to(dtype))


@pytest.mark.gpu
@pytest.mark.parametrize("n", [1, 4, 16])
def test_lora_linear_mixed_gpu(lora_triton, n):
    inputs = mixed_inputs(2048, 4096, 4096, 16, n, torch.bfloat16, seed=n)
    check("lora_linear_mixed", lora_triton.lora_linear_mixed, inputs,
          torch.randn(2048, 4096, device=DEVICE).to(torch.bfloat16))


@pytest.mark.gpu
def test_auto_backend_picks_triton_on_cuda(lora_triton):
    from fastlm.ops.backend import select

    assert select("lora_linear", torch.device("cuda")) == "triton"
    assert select("lora_linear_mixed", torch.device("cuda")) == "triton"
