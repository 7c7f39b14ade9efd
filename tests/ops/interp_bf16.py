"""Run the kernels' GPU bf16 path under the Triton interpreter.

The interpreter keeps bfloat16 tensors as their raw uint16 bits; in triton 3.9 its ``tl.dot``
multiplies those bits as integers and its int8/int32/fp16 → bf16 casts copy integers into the
bits (``cast_impl`` is ``astype``), and fp32 → bf16 truncates. The kernels therefore take an
``UPCAST`` path under the interpreter (operands widened to fp32), which is not the code a GPU
runs. :func:`hardware_bf16` patches the interpreter so that bf16 behaves as on the GPU:

- ``tl.dot`` with a bf16 operand: the operand widened to fp32 exactly (a bf16 MMA's products
  are exact in fp32), products accumulated in fp32 into the accumulator, as the tensor cores do
  (summation order differs; the 2× tolerance rule covers that);
- casts to bf16: the value converted to fp32 (exact for int8, fp16 and bf16) and rounded to
  nearest even (``cvt.rn.bf16.f32``); casts from bf16 widen exactly first.

and sets ``FASTLM_INTERPRET_UPCAST=0`` so the launchers pass ``UPCAST=False``: the kernels run
``tl.dot(bf16, bf16)`` and ``q.to(x.dtype)`` exactly as compiled for sm_80/sm_90. Only the
interpreter's bf16 arithmetic is replaced, never a kernel's code. A triton whose interpreter
already gets bf16 right (probed by :func:`interpreter_bf16_is_broken`) is left unpatched.
"""

from __future__ import annotations

import contextlib

import numpy as np


def _bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even fp32 → bf16 bits (NaN stays NaN)."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(x), np.uint16(0x7FC0), rounded).astype(np.uint16)


def interpreter_bf16_is_broken() -> bool:
    """Whether the interpreter's bf16 dot is not a value operation (triton 3.9: it is not)."""
    from triton.runtime import interpreter as interp
    import triton.language as tl

    builder = interp.InterpreterBuilder()
    one = interp.TensorHandle(np.full((16, 16), 0x3F80, dtype=np.uint16), tl.bfloat16)  # bf16 1.0
    acc = interp.TensorHandle(np.zeros((16, 16), dtype=np.float32), tl.float32)
    out = builder.create_dot(one, one, acc, None, None).data
    return not np.allclose(out, 16.0)


@contextlib.contextmanager
def hardware_bf16(monkeypatch):
    """Within the block: the interpreter's bf16 dot and casts as on the GPU, and the launchers'
    UPCAST off (``FASTLM_INTERPRET_UPCAST=0``). ``monkeypatch``: pytest's fixture."""
    from triton.runtime import interpreter as interp
    import triton.language as tl

    monkeypatch.setenv("FASTLM_INTERPRET_UPCAST", "0")
    if not interpreter_bf16_is_broken():
        yield
        return
    builder = interp.InterpreterBuilder
    original_dot, original_cast = builder.create_dot, builder.cast_impl

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if tl.bfloat16 not in (a.dtype.scalar, b.dtype.scalar):
            return original_dot(self, a, b, d, input_precision, max_num_imprecise_acc)

        def wide(h):
            return _bf16_to_f32(h.data) if h.dtype.scalar == tl.bfloat16 else h.data.astype(np.float32)

        out = np.matmul(wide(a), wide(b), dtype=np.float32) + d.data.astype(np.float32)
        return interp.TensorHandle(out.astype(d.data.dtype), d.dtype.scalar)

    def cast_impl(self, src, dst_type):
        src_ty, dst_ty = src.dtype.scalar, dst_type.scalar
        if src_ty == tl.bfloat16 and dst_ty != tl.bfloat16:
            wide = interp.TensorHandle(_bf16_to_f32(src.data), tl.float32)
            return original_cast(self, wide, dst_type) if dst_ty != tl.float32 else wide
        if dst_ty == tl.bfloat16 and src_ty != tl.bfloat16:
            return interp.TensorHandle(_f32_to_bf16(src.data.astype(np.float32)), tl.bfloat16)
        return original_cast(self, src, dst_type)

    monkeypatch.setattr(builder, "create_dot", create_dot)
    monkeypatch.setattr(builder, "cast_impl", cast_impl)
    for name in ("create_si_to_fp", "create_ui_to_fp", "create_fp_to_si", "create_fp_to_ui", "create_fp_ext",
                 "create_fp_trunc"):
        monkeypatch.setattr(builder, name, lambda self, src, dst_type: self.cast_impl(src, dst_type))
    monkeypatch.setattr(builder, "create_int_cast", lambda self, src, dst_type, is_signed: self.cast_impl(src, dst_type))
    yield  # pytest's monkeypatch restores everything at the end of the test

