"""The kernels' GPU bf16/fp16 ``tl.dot`` path, run under the Triton interpreter.

The other interpreter tests run bf16 with ``UPCAST`` (operands widened to fp32, because the
triton 3.9 interpreter multiplies bf16 as raw bits), so the code a GPU runs — ``tl.dot`` on
bf16 tiles, int8 → bf16 operand casts, the bf16 store — was never executed. Here the launchers
pass ``UPCAST=False`` and the interpreter's bf16 arithmetic is made the hardware's
(tests/ops/interp_bf16.py: exact widening, fp32 accumulation, round-to-nearest-even casts);
fp16 needs no help (numpy has float16). Tolerances: the 2× rule against PyTorch's own error in
the same dtype, truth in float64 (helpers of test_int8_triton / test_lora_triton).

Kernels: int8 (w8 decode, prefill, dx; w8a8 fused and unfused) and LoRA (shrink, matmul,
outer; dense and mixed). RMSNorm, RoPE, SwiGLU and the KV append have no dot and no UPCAST
switch: they run the same code under the interpreter as on the GPU (their bf16 stores round on
the bits in both), and their tests already cover bf16 and fp16.
"""

import numpy as np
import pytest
import torch

import fastlm
from fastlm import ops
from fastlm.ops.backend import kernel_module
from tests.ops.interp_bf16 import hardware_bf16, interpreter_bf16_is_broken
from fastlm.ops import int8 as int8_ops
from fastlm.ops.int8_triton import dequantize_int8
from tests.ops.test_int8_triton import _check as check_int8, _w8a8_formula, _weights
from tests.ops.test_lora_triton import check as check_lora, lora_inputs, mixed_inputs

triton = pytest.importorskip("triton")
if torch.cuda.is_available():
    pytest.skip("interpreter tests (the GPU runs these paths natively in the gpu tests)", allow_module_level=True)

HALF = [torch.bfloat16, torch.float16]


@pytest.fixture
def bf16_hw(monkeypatch):
    with hardware_bf16(monkeypatch):
        yield


def test_interpreter_premise():
    """Why the shim exists: the interpreter's own bf16 dot is not a value product (if a triton
    fixes it, interpreter_bf16_is_broken() turns False and the shim steps aside)."""
    from triton.runtime import interpreter as interp

    broken = interpreter_bf16_is_broken()
    assert broken == (triton.__version__.startswith("3.9") or broken)  # 3.9: broken, as documented
    builder = interp.InterpreterBuilder()
    a = interp.TensorHandle(np.full((16, 16), 0x4000, dtype=np.uint16), triton.language.bfloat16)  # 2.0
    acc = interp.TensorHandle(np.ones((16, 16), dtype=np.float32), triton.language.float32)
    with pytest.MonkeyPatch.context() as mp, hardware_bf16(mp):
        out = interp.InterpreterBuilder.create_dot(builder, a, a, acc, None, None).data
    np.testing.assert_array_equal(out, np.full((16, 16), 65.0, dtype=np.float32))  # 16·2·2 + 1


def test_launchers_pass_upcast_false(bf16_hw):
    assert kernel_module("int8").upcast(torch.bfloat16) is False
    assert kernel_module("lora")._upcast(torch.bfloat16) is False


# ---- int8 ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("rows,group_size,bias", [(1, None, True), (5, 16, False), (17, None, True), (40, 32, False)])
def test_int8_linear_real_dot(bf16_hw, dtype, rows, group_size, bias):
    q, s = _weights(group_size, k=96)
    torch.manual_seed(rows)
    x = torch.randn(rows, 96).to(dtype)
    b = torch.randn(q.shape[0]).to(dtype) if bias else None
    with fastlm.use_backend("triton"):
        out = ops.int8_linear(x, q, s, b)
    check_int8(out, x, q, s, b, atol=0.0)


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_int8_linear_dx_real_dot(bf16_hw, dtype):
    q, s = _weights(32, k=96)
    torch.manual_seed(1)
    grad = torch.randn(17, q.shape[0]).to(dtype)
    dx = kernel_module("int8").int8_linear_dx(grad, q, s)
    w = dequantize_int8(q, s)
    truth = grad.double() @ w.double()
    torch_err = ((grad @ w.to(dtype)).double() - truth).abs().max().item()
    assert dx.dtype == dtype
    assert (dx.double() - truth).abs().max().item() <= 2 * torch_err


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("rows,fused", [(5, True), (17, False), (40, True)])
def test_w8a8_real_path(bf16_hw, dtype, rows, fused):
    """W8A8 with bf16/fp16 activations: x loaded in its dtype, quantized (in the GEMM or by the
    per-token kernel), the int8 GEMM, the epilogue stored in x's dtype without UPCAST's rounding."""
    c = torch.rand(96) + 0.5
    q, ws = ops.quantize_int8(torch.randn(48, 96) * c[None, :])
    torch.manual_seed(rows)
    x = torch.randn(rows, 96).to(dtype)
    b = torch.randn(48).to(dtype)
    out = kernel_module("int8").w8a8_linear_forward(x, q, ws, b, c, fused=fused)
    ref = int8_ops.w8a8_linear_reference(x, q, ws, b, c)
    truth = _w8a8_formula(x, q, ws, b, c)
    torch_err = (ref.double() - truth).abs().max().item()
    atol = 1e-6 * truth.abs().max().item()  # fp32 epilogue (scales, bias) before the final rounding
    assert out.dtype == dtype
    assert (out.double() - truth).abs().max().item() <= 2 * torch_err + atol


# ---- LoRA ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("rows,r", [(17, 8), (1, 16), (33, 20)])
def test_lora_linear_real_dot(bf16_hw, dtype, rows, r):
    torch.manual_seed(rows + r)
    inputs = lora_inputs(rows, 40, 24, r, dtype, bias=r == 8)
    check_lora("lora_linear", ops.lora_linear, inputs, torch.randn(rows, 24).to(dtype))


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_lora_linear_mixed_real_dot(bf16_hw, dtype):
    from fastlm.ops import lora as lora_ops

    inputs = mixed_inputs(17, 40, 24, 8, 3, dtype, bias=True, seed=5)
    check_lora("lora_linear_mixed", lora_ops.lora_linear_mixed, inputs, torch.randn(17, 24).to(dtype))
