"""Triton RMSNorm, RoPE and SwiGLU (forward and backward) against the float64 reference.

On CPU they run under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1), with
small shapes; the ``gpu`` tests repeat the checks at training sizes on CUDA. Low precision
follows flash-attention's rule: max|kernel − truth| ≤ 2·max|PyTorch same dtype − truth| + atol,
where truth is the float64 reference on the same inputs and "PyTorch same dtype" is autograd
through the plain-PyTorch reference in the tested dtype. Outputs and every gradient are checked.
"""

import pytest
import torch

import fastlm
from fastlm import ops
from fastlm.ops import reference

pytest.importorskip("triton")
from fastlm.ops.triton import rotary as triton_rotary  # noqa: E402  the triton adapters

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float64: 1e-12}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def assert_within_rule(name, out, truth, torch_out):
    """flash-attention's rule, with atol scaled by the truth's magnitude."""
    assert out.shape == truth.shape and out.dtype == torch_out.dtype, name
    err = (out.double() - truth).abs().max().item()
    torch_err = (torch_out.double() - truth).abs().max().item()
    atol = ATOL[out.dtype] * max(1.0, truth.abs().max().item())
    assert err <= 2 * torch_err + atol, (
        f"{name}: kernel error {err:.3g} > 2 × torch error {torch_err:.3g} + {atol:.3g}"
    )


def run_op(fn, inputs, grad_out, backend):
    """(out, grads of the inputs that require grad) of fn(*inputs) on a forced backend."""
    inputs = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
    with fastlm.use_backend(backend):
        out = fn(*inputs)
    wanted = [t for t in inputs if t.requires_grad]
    return out, list(torch.autograd.grad(out, wanted, grad_out))


def check_against_reference(name, op, ref, inputs, grad_out):
    """Kernel (triton backend of ``op``) vs float64 truth vs PyTorch in the same dtype."""
    out, grads = run_op(op, inputs, grad_out, "triton")
    torch_out, torch_grads = run_op(ref, inputs, grad_out, "reference")
    as64 = [t.detach().double().requires_grad_(t.requires_grad) if t.dtype.is_floating_point else t for t in inputs]
    truth, truth_grads = run_op(ref, as64, grad_out.double(), "reference")
    assert_within_rule(f"{name} out", out, truth, torch_out)
    for i, (g, t, tg) in enumerate(zip(grads, truth_grads, torch_grads)):
        assert g.dtype == tg.dtype, f"{name} grad {i} dtype"
        assert_within_rule(f"{name} grad {i}", g, t, tg)


def randn(*shape, dtype=torch.float32, grad=True):
    return torch.randn(*shape, device=DEVICE).to(dtype).requires_grad_(grad)


# ---- RMSNorm ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows", [1, 17, 129])
@pytest.mark.parametrize("hidden", [40, 96])
def test_rms_norm(rows, hidden, dtype):
    torch.manual_seed(rows * hidden)
    x, w = randn(rows, hidden, dtype=dtype), (1 + 0.1 * randn(hidden, grad=False)).to(dtype).requires_grad_()
    check_against_reference("rms_norm", lambda x, w: ops.rms_norm(x, w, 1e-6),
                            lambda x, w: reference.rms_norm(x, w, 1e-6), [x, w], torch.randn_like(x))


def test_rms_norm_mixed_dtypes_3d_and_strided():
    """bfloat16 activations with a float32 weight (autocast's master weight) give float32 out;
    a 3-D input that is a strided slice is read in place."""
    torch.manual_seed(0)
    base = randn(2, 7, 80, dtype=torch.bfloat16, grad=False)
    x = base[:, :, :40].requires_grad_()  # row stride 80
    w = randn(40)
    grad = torch.randn(2, 7, 40, device=DEVICE)
    check_against_reference("rms_norm mixed", lambda x, w: ops.rms_norm(x, w, 1e-5),
                            lambda x, w: reference.rms_norm(x, w, 1e-5), [x, w], grad)


@pytest.mark.parametrize("need", ["x", "weight"])
def test_rms_norm_only_needed_gradient(need):
    x, w = randn(9, 40, grad=need == "x"), randn(40, grad=need == "weight")
    with fastlm.use_backend("triton"):
        ops.rms_norm(x, w).square().sum().backward()
    assert (x.grad is not None) == (need == "x") and (w.grad is not None) == (need == "weight")
    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    reference.rms_norm(x2, w2).square().sum().backward()
    got, ref = (x.grad, x2.grad) if need == "x" else (w.grad, w2.grad)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_rms_norm_weight_gradient_is_deterministic():
    x, w = randn(129, 96), randn(96)
    dy = torch.randn(129, 96, device=DEVICE)
    grads = [run_op(lambda x, w: ops.rms_norm(x, w), [x, w], dy, "triton")[1][1] for _ in range(2)]
    assert torch.equal(grads[0], grads[1])


# ---- RoPE -------------------------------------------------------------------------------------


def _positions(kind, b, t):
    if kind == "T":
        return torch.arange(t, device=DEVICE) + 3
    return torch.randint(0, 2048, (b, t), device=DEVICE)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1, 1, 8), (2, 3, 17, 40), (1, 2, 129, 96)], ids=str)
@pytest.mark.parametrize("positions", ["T", "BT"])
def test_rope(shape, positions, dtype):
    torch.manual_seed(sum(shape))
    b, _, t, _ = shape
    x, pos = randn(*shape, dtype=dtype), _positions(positions, b, t)
    check_against_reference("rope", lambda x: ops.rope(x, pos, theta=10000.0),
                            lambda x: reference.rope(x, pos, 10000.0), [x], torch.randn_like(x))


def test_rope_transposed_layout_large_positions_and_theta():
    """(B, T, H, D) projections viewed as (B, H, T, D) without a copy; positions up to 32k with
    Llama-3's theta, where the angle reduction matters."""
    torch.manual_seed(1)
    x = randn(2, 5, 4, 64, grad=False).transpose(1, 2).requires_grad_()  # (B, H, T, D), strided
    pos = torch.tensor([[0, 1, 4095, 8191, 32767], [5, 6, 7, 20000, 30000]], device=DEVICE, dtype=torch.int32)
    grad = torch.randn(2, 4, 5, 64, device=DEVICE)
    check_against_reference("rope strided", lambda x: ops.rope(x, pos, theta=500000.0),
                            lambda x: reference.rope(x, pos, 500000.0), [x], grad)
    with fastlm.use_backend("triton"):
        out = ops.rope(x, pos, theta=500000.0)
    assert out.stride() == x.stride()  # empty_like's layout, as the fake implementation says


def test_rope_backward_is_the_inverse_rotation():
    x, pos = randn(1, 2, 6, 16, grad=False), torch.arange(6, device=DEVICE)
    with fastlm.use_backend("triton"):
        y = ops.rope(x, pos)
    back = triton_rotary.rope_backward(y, x, pos, 10000.0, [True])[0]  # Rᵀ·R = I
    torch.testing.assert_close(back, x, atol=1e-5, rtol=1e-5)


# ---- SwiGLU -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 40), (17, 96), (3, 43, 129)], ids=str)
def test_swiglu(shape, dtype):
    torch.manual_seed(sum(shape))
    gate, up = randn(*shape, dtype=dtype), randn(*shape, dtype=dtype)
    check_against_reference("swiglu", ops.swiglu, reference.swiglu, [gate, up], torch.randn_like(gate))


def test_swiglu_reads_the_halves_of_a_fused_projection():
    torch.manual_seed(2)
    fused = randn(4, 9, 2 * 72, dtype=torch.bfloat16, grad=False)
    gate, up = (t.requires_grad_() for t in fused.detach().split(72, dim=-1))  # row stride 144
    check_against_reference("swiglu strided", ops.swiglu, reference.swiglu, [gate, up],
                            torch.randn(4, 9, 72, device=DEVICE).bfloat16())


@pytest.mark.parametrize("need", ["gate", "up"])
def test_swiglu_only_needed_gradient(need):
    gate, up = randn(5, 33, grad=need == "gate"), randn(5, 33, grad=need == "up")
    with fastlm.use_backend("triton"):
        ops.swiglu(gate, up).sum().backward()  # an expanded (stride 0) incoming gradient
    assert (gate.grad is not None) == (need == "gate") and (up.grad is not None) == (need == "up")
    g2, u2 = gate.detach().clone().requires_grad_(), up.detach().clone().requires_grad_()
    reference.swiglu(g2, u2).sum().backward()
    got, ref = (gate.grad, g2.grad) if need == "gate" else (up.grad, u2.grad)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


# ---- registration -----------------------------------------------------------------------------


@pytest.mark.parametrize("name,args", [
    ("rms_norm", lambda: (randn(3, 5, 12), randn(12), 1e-6)),
    ("rope", lambda: (randn(2, 3, 5, 8), torch.tensor([[0, 1, 2, 3, 4], [7, 8, 9, 10, 11]], device=DEVICE), 500.0)),
    ("swiglu", lambda: (randn(4, 9), randn(4, 9))),
])
def test_opcheck_triton_backend(name, args):
    torch.library.opcheck(getattr(torch.ops.fastlm, name).default, (*args(), "triton"))


def test_importing_fastlm_does_not_import_triton():
    """The kernel modules are imported lazily: a fresh interpreter importing fastlm and
    registering the triton kernels has not imported triton."""
    import subprocess
    import sys
    from pathlib import Path

    code = "import sys, fastlm, fastlm.ops.triton, fastlm.ops.fused_loss; print('triton' in sys.modules)"
    repo = Path(__file__).resolve().parents[2]  # `python -c` imports fastlm from its cwd: this checkout
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=repo)
    assert result.stdout.strip() == "False"


# ---- GPU: training sizes ----------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_training_sizes_on_gpu(dtype):
    torch.manual_seed(0)
    x, w = randn(4096, 4096, dtype=dtype), randn(4096, dtype=dtype)
    check_against_reference("rms_norm gpu", lambda x, w: ops.rms_norm(x, w, 1e-5),
                            lambda x, w: reference.rms_norm(x, w, 1e-5), [x, w], torch.randn_like(x))
    q = randn(2, 2048, 32, 128, dtype=dtype, grad=False).transpose(1, 2).requires_grad_()
    pos = torch.arange(2048, device=DEVICE)
    check_against_reference("rope gpu", lambda x: ops.rope(x, pos, theta=500000.0),
                            lambda x: reference.rope(x, pos, 500000.0), [q], torch.randn_like(q))
    gate, up = randn(4096, 11008, dtype=dtype), randn(4096, 11008, dtype=dtype)
    check_against_reference("swiglu gpu", ops.swiglu, reference.swiglu, [gate, up], torch.randn_like(gate))
