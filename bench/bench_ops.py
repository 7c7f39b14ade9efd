"""fastlm ops on every available backend vs the reference backend and torch's own peer (pytest-benchmark).

    python -m pytest bench/bench_ops.py --benchmark-only --benchmark-json=/tmp/bench_ops.json
    python -m bench.run --device cuda --quick --only bench_ops     # the same, plus the markdown table

One benchmark group per (op, shape, dtype); one case per fastlm backend (``reference``,
``triton``, ``cuda``: each forced with ``fastlm.use_backend``) and one for torch's peer where it
exists, all in the same run:

=================  =====================================================  ===================
op                 shapes (CUDA bfloat16 / CPU float32; quick: the first)  torch's peer
=================  =====================================================  ===================
attention          q (B, H, T, D), k/v (B, Hkv, T, D), causal or not        ``torch.sdpa``
                   CUDA B4 H16 T1024 D128 (causal, full), B1 H32 Hkv8
                   T4096; CPU B1 H4 T128 D64 causal, B1 H8 Hkv2 T256
decode_attention   q (B, H, 1, D) over full caches (B, Hkv, L, D):          ``torch.sdpa``
                   CUDA B32 L4096, B1 L32768 (H32 Hkv8 D128); CPU B4 L512
rms_norm           x (N, D), weight (D,): CUDA 16384×4096, 4096×8192;       ``F.rms_norm``
                   CPU 2048×1024
swiglu             silu(gate)·up, (N, F): CUDA 16384×14336, 4096×11008;     ``torch.eager``
                   CPU 1024×2048
cross_entropy      logits (N, V): CUDA 8192×128256, 16384×32000;            ``F.cross_entropy``
                   CPU 256×8192
sample             logits (B, V) float32, T1 and T0.8 k50 p0.9 (quick: T1): none (peer: the
                   CUDA 64×128256, CPU 8×32000                              reference backend)
=================  =====================================================  ===================

Work per call (``extra_info``): ``flops`` for attention (4·B·H·Tq·Tk·D, halved when causal: the
report's TFLOP/s) and ``bytes`` for the memory-bound ops (the minimal bytes read + written: GB/s).
``peer``: torch's peer where the op has one, else the reference backend. ``max_abs_diff_vs_ref``:
max |out − out_reference| (the reference backend on the same inputs, computed untimed before the
case; asserted finite), on every case but the reference and ``sample`` (random draws).
``op``, ``impl`` (the backend or the peer), ``shape``, ``dtype`` are what bench/gpu_report.py's
``backend_speed.json`` is built from.

Skips, with the reason: a backend unavailable on this device (``fastlm.ops.backend_status``),
an op without a kernel on a backend (or raising NotImplementedError), the Triton interpreter
(CPU with ``TRITON_INTERPRET=1``: not a performance measurement). Any other error fails the case.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

import fastlm
from bench.conftest import DEVICE, QUICK
from fastlm import ops
from fastlm.ops import backend

BACKENDS = ("reference", "triton", "cuda")

Build = Callable[[], tuple[Callable[[], torch.Tensor], Callable[[], torch.Tensor] | None]]


@dataclass(frozen=True)
class Case:
    """One op at one shape. ``build()`` allocates the inputs and returns (fastlm call, peer call)."""

    op: str
    shape: str
    dtype: torch.dtype
    build: Build
    peer: str | None = None  # name of torch's implementation, if any
    flops: float | None = None
    bytes: float | None = None
    compare: bool = True  # compare the output with the reference backend's

    @property
    def id(self) -> str:
        return f"{self.op}-{self.shape.replace(' ', '-')}"

    @property
    def group(self) -> str:
        return f"{self.op} {self.shape} {dtype_name(self.dtype)}"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _randn(*shape: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    return torch.randn(*shape, dtype=dtype, device=device)


def _attention_cases(device: str, quick: bool) -> Iterator[Case]:
    if device == "cuda":
        dtype = torch.bfloat16
        shapes = [(4, 16, 16, 1024, 128, True), (4, 16, 16, 1024, 128, False), (1, 32, 8, 4096, 128, True)]
    else:
        dtype = torch.float32
        shapes = [(1, 4, 4, 128, 64, True), (1, 8, 2, 256, 64, False)]
    for b, h, hkv, t, d, causal in shapes[:1] if quick else shapes:
        def build(b=b, h=h, hkv=hkv, t=t, d=d, causal=causal):
            q = _randn(b, h, t, d, dtype=dtype, device=device)  # (B, H, T, D)
            k = _randn(b, hkv, t, d, dtype=dtype, device=device)  # (B, Hkv, T, D)
            v = _randn(b, hkv, t, d, dtype=dtype, device=device)
            # Tq == Tk, so SDPA's top-left causal mask equals fastlm's bottom-right one.
            return (lambda: ops.attention(q, k, v, causal=causal),
                    lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=h != hkv))

        flops = 4 * b * h * t * t * d * (0.5 if causal else 1.0)
        shape = f"B{b} H{h} Hkv{hkv} T{t} D{d}{' causal' if causal else ''}"
        yield Case("attention", shape, dtype, build, peer="torch.sdpa", flops=flops)


def _decode_attention_cases(device: str, quick: bool) -> Iterator[Case]:
    if device == "cuda":
        dtype, shapes = torch.bfloat16, [(32, 32, 8, 4096, 128), (1, 32, 8, 32768, 128)]
    else:
        dtype, shapes = torch.float32, [(4, 8, 2, 512, 64)]
    for b, h, hkv, length, d in shapes[:1] if quick else shapes:
        def build(b=b, h=h, hkv=hkv, length=length, d=d):
            q = _randn(b, h, 1, d, dtype=dtype, device=device)  # (B, H, 1, D)
            k = _randn(b, hkv, length, d, dtype=dtype, device=device)  # (B, Hkv, L, D)
            v = _randn(b, hkv, length, d, dtype=dtype, device=device)
            lens = torch.full((b,), length, dtype=torch.int32, device=device)  # full caches
            return (lambda: ops.decode_attention(q, k, v, lens),
                    lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=h != hkv))

        moved = (2 * b * hkv * length * d + 2 * b * h * d) * dtype.itemsize
        yield Case("decode_attention", f"B{b} H{h} Hkv{hkv} L{length} D{d}", dtype, build, peer="torch.sdpa",
                   bytes=moved)


def _rms_norm_cases(device: str, quick: bool) -> Iterator[Case]:
    if device == "cuda":
        dtype, shapes = torch.bfloat16, [(16384, 4096), (4096, 8192)]
    else:
        dtype, shapes = torch.float32, [(2048, 1024)]
    for n, d in shapes[:1] if quick else shapes:
        def build(n=n, d=d):
            x = _randn(n, d, dtype=dtype, device=device)  # (N, D)
            w = _randn(d, dtype=dtype, device=device)
            peer = (lambda: F.rms_norm(x, (d,), w, 1e-6)) if hasattr(F, "rms_norm") else None
            return lambda: ops.rms_norm(x, w, 1e-6), peer

        moved = (2 * n * d + d) * dtype.itemsize
        yield Case("rms_norm", f"N{n} D{d}", dtype, build, peer="F.rms_norm", bytes=moved)


def _swiglu_cases(device: str, quick: bool) -> Iterator[Case]:
    if device == "cuda":
        dtype, shapes = torch.bfloat16, [(16384, 14336), (4096, 11008)]
    else:
        dtype, shapes = torch.float32, [(1024, 2048)]
    for n, f in shapes[:1] if quick else shapes:
        def build(n=n, f=f):
            gate = _randn(n, f, dtype=dtype, device=device)  # (N, F)
            up = _randn(n, f, dtype=dtype, device=device)
            return lambda: ops.swiglu(gate, up), lambda: F.silu(gate) * up

        yield Case("swiglu", f"N{n} F{f}", dtype, build, peer="torch.eager", bytes=3 * n * f * dtype.itemsize)


def _cross_entropy_cases(device: str, quick: bool) -> Iterator[Case]:
    if device == "cuda":
        dtype, shapes = torch.bfloat16, [(8192, 128256), (16384, 32000)]
    else:
        dtype, shapes = torch.float32, [(256, 8192)]
    for n, v in shapes[:1] if quick else shapes:
        def build(n=n, v=v):
            logits = _randn(n, v, dtype=dtype, device=device)  # (N, V)
            targets = torch.randint(0, v, (n,), device=device)
            return lambda: ops.cross_entropy(logits, targets), lambda: F.cross_entropy(logits, targets)

        yield Case("cross_entropy", f"N{n} V{v}", dtype, build, peer="F.cross_entropy",
                   bytes=n * v * dtype.itemsize + n * 8)


def _sample_cases(device: str, quick: bool) -> Iterator[Case]:
    dtype, shapes = torch.float32, [(64, 128256)] if device == "cuda" else [(8, 32000)]
    settings = [("T1", {}), ("T0.8 k50 p0.9", {"temperature": 0.8, "top_k": 50, "top_p": 0.9})]
    for b, v in shapes:
        for label, kwargs in settings[:1] if quick else settings:
            def build(b=b, v=v, kwargs=kwargs):
                logits = _randn(b, v, dtype=dtype, device=device)  # (B, V)
                return lambda: ops.sample(logits, **kwargs), None

            yield Case("sample", f"B{b} V{v} {label}", dtype, build, bytes=b * v * dtype.itemsize, compare=False)


CASE_MAKERS = (_attention_cases, _decode_attention_cases, _rms_norm_cases, _swiglu_cases, _cross_entropy_cases,
               _sample_cases)


def cases(device: str, quick: bool) -> list[Case]:
    """Every case for ``device`` ("cpu" or "cuda"); ``quick`` keeps one shape per op."""
    return [case for make in CASE_MAKERS for case in make(device, quick)]


def backend_skip_reason(name: str, device: str) -> str | None:
    """Why backend ``name`` is not timed on ``device`` (None: it is)."""
    ok, why = ops.backend_status(name, device)
    if not ok:
        return f"{name} unavailable: {why}"
    if name == "triton" and device == "cpu":
        return "Triton interpreter (TRITON_INTERPRET=1): not a performance measurement"
    return None


def max_abs_diff(out: torch.Tensor, ref: torch.Tensor) -> float:
    return (out.float() - ref.float()).abs().max().item()


def _forced(fn: Callable[[], torch.Tensor], name: str) -> Callable[[], torch.Tensor]:
    def call():
        with fastlm.use_backend(name):
            return fn()
    return call


CASES = cases(DEVICE, QUICK)
PARAMS = [pytest.param(case, impl, id=f"{case.id}-{impl}")
          for case in CASES for impl in (*BACKENDS, *([case.peer] if case.peer else []))]


@pytest.mark.parametrize(("case", "impl"), PARAMS)
def test_op(measure, case: Case, impl: str):
    if impl in BACKENDS:
        reason = backend_skip_reason(impl, DEVICE)
        if reason is None and not backend.has_kernel(case.op, impl):
            reason = f"not implemented: fastlm has no {impl} kernel for {case.op}"
        if reason:
            pytest.skip(reason)
    torch.manual_seed(0)
    fn, peer_fn = case.build()
    if impl in BACKENDS:
        call = _forced(fn, impl)
    elif peer_fn is None:
        pytest.skip(f"{impl} is not in torch {torch.__version__}")
    else:
        call = peer_fn
    try:
        out = call()
    except NotImplementedError as err:
        pytest.skip(f"not implemented: {err}")
    info = {}
    if case.compare and impl != "reference":
        diff = max_abs_diff(out, _forced(fn, "reference")())
        assert math.isfinite(diff), f"{case.op} {case.shape} on {impl}: non-finite output"
        info["max_abs_diff_vs_ref"] = diff
    del out
    work = {k: v for k, v in (("flops", case.flops), ("bytes", case.bytes)) if v is not None}
    measure(call, group=case.group, impl=impl, peer=case.peer or "reference", op=case.op, shape=case.shape,
            dtype=dtype_name(case.dtype), **work, **info)
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
