"""Training kernels (pytest-benchmark): RMSNorm, RoPE and SwiGLU forward and forward+backward, and
the fused linear cross-entropy.

``test_elementwise`` — one group per (op, pass, shape): fastlm's op on the ``triton`` backend
(CUDA only), PyTorch eager (``torch.eager``: the plain-PyTorch reference, differentiated by
autograd; the peer) and torch's own op where it exists (``F.rms_norm``). Passes: ``fwd`` (the op,
no grad) and ``fwd+bwd`` (the op, then ``torch.autograd.grad`` of every input for a fixed upstream
gradient). ``bytes`` = the minimal traffic (each input and output read or written once): fwd reads
the inputs and writes y; fwd+bwd adds reading dy and the inputs again and writing each input's
gradient (GB/s). Shapes, bf16 on CUDA: RMSNorm (N, D) = (16384, 4096), (4096, 8192); RoPE
(B, H, T, D) = (4, 32, 4096, 128), (8, 8, 2048, 128), θ = 500000, q viewed from a (B, T, H, D)
projection as the model does; SwiGLU (N, F) = (16384, 14336), (4096, 11008); quick: the first of
each. CPU, fp32: (512, 256), (1, 4, 128, 64), (256, 1024). The eager RoPE computes its cos/sin
tables in every call, as fastlm's reference does (transformers computes them once per forward).

``test_fused_linear_cross_entropy`` — loss = CE(hidden·Wᵀ, targets), then d hidden and d W, for
hidden (N, H) and W (V, H): ``unfused torch`` (the matmul, ``.float()`` logits and
F.cross_entropy, as transformers' Llama does; the peer) against ``fastlm.ops
.fused_linear_cross_entropy`` (chunked, never forming the (N, V) logits) on the ``triton`` (CUDA
only) and ``reference`` backends. ``flops`` = the three matmuls, 6·N·H·V; ``peak_mb`` from the
fixture (memory allocated during one fwd+bwd above the inputs) and ``mem_vs_unfused`` (this peak
/ the unfused peak of the same run). Fused cases record ``max_abs_diff``: the largest difference
of the loss and both gradients from the unfused ones (accuracy is tested in tests/ops, by the 2×
rule). Shapes: CUDA bf16 (N, H, V) = (8192, 4096, 128256), (16384, 4096, 128256),
(8192, 4096, 32000) (quick: the first); CPU fp32 (512, 128, 4096).

On CPU the Triton interpreter is not a performance measurement: ``triton`` cases skip.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

import fastlm
from bench.conftest import DEVICE, QUICK
from fastlm import ops
from fastlm.ops import reference

GPU = DEVICE == "cuda"
DTYPE = torch.bfloat16 if GPU else torch.float32
DTYPE_NAME = str(DTYPE).removeprefix("torch.")


def _first_if_quick(shapes: list) -> list:
    return shapes[:1] if QUICK else shapes


NORM_SHAPES = _first_if_quick([(16384, 4096), (4096, 8192)]) if GPU else [(512, 256)]
ROPE_SHAPES = _first_if_quick([(4, 32, 4096, 128), (8, 8, 2048, 128)]) if GPU else [(1, 4, 128, 64)]
SWIGLU_SHAPES = _first_if_quick([(16384, 14336), (4096, 11008)]) if GPU else [(256, 1024)]
FLCE_SHAPES = _first_if_quick([(8192, 4096, 128256), (16384, 4096, 128256), (8192, 4096, 32000)]) if GPU \
    else [(512, 128, 4096)]


def _skip_unmeasured(backend: str) -> None:
    ok, why = ops.backend_status(backend, DEVICE)
    if not ok:
        pytest.skip(f"{backend} backend unavailable: {why}")
    if backend != "reference" and not GPU:
        pytest.skip("Triton interpreter: not a performance measurement")
    if backend == "triton":
        from fastlm.ops import triton_fused  # noqa: F401  registers the fused-loss kernels


def _on_backend(fn: Callable, backend: str) -> Callable:
    def call(*args):
        with fastlm.use_backend(backend):
            return fn(*args)
    return call


@dataclass
class Case:
    """One memory-bound op at one shape: inputs, upstream gradient, and each impl's function."""

    op: str
    shape: str
    inputs: list[torch.Tensor]
    grad: torch.Tensor  # upstream gradient of the output
    impls: dict[str, Callable[..., torch.Tensor]]  # "triton" (fastlm.ops.<op>), "torch.eager", torch's peer
    bytes_fwd: float
    bytes_fwd_bwd: float


def _randn(*shape, grad=True):
    torch.manual_seed(len(shape) * 1000 + shape[-1])
    return torch.randn(*shape, device=DEVICE, dtype=DTYPE).requires_grad_(grad)


def rms_norm_case(n: int, d: int) -> Case:
    x, w = _randn(n, d), _randn(d)
    io, wb = n * d * DTYPE.itemsize, d * DTYPE.itemsize
    impls = {"triton": lambda x, w: ops.rms_norm(x, w, 1e-6),
             "torch.eager": lambda x, w: reference.rms_norm(x, w, 1e-6)}
    if hasattr(F, "rms_norm"):
        impls["F.rms_norm"] = lambda x, w: F.rms_norm(x, (d,), w, 1e-6)
    return Case("rms_norm", f"N{n} D{d}", [x, w], torch.randn_like(x), impls,
                bytes_fwd=2 * io + wb, bytes_fwd_bwd=(2 * io + wb) + (3 * io + 2 * wb))


def rope_case(b: int, h: int, t: int, d: int) -> Case:
    x = _randn(b, t, h, d, grad=False).transpose(1, 2).requires_grad_()  # (B, H, T, D) view of (B, T, H, D)
    pos = torch.arange(t, device=DEVICE)
    io = b * h * t * d * DTYPE.itemsize
    impls = {"triton": lambda x: ops.rope(x, pos, theta=500000.0),
             "torch.eager": lambda x: reference.rope(x, pos, 500000.0)}
    return Case("rope", f"B{b} H{h} T{t} D{d}", [x], torch.randn_like(x), impls, bytes_fwd=2 * io, bytes_fwd_bwd=4 * io)


def swiglu_case(n: int, f: int) -> Case:
    gate, up = _randn(n, f), _randn(n, f)
    io = n * f * DTYPE.itemsize
    return Case("swiglu", f"N{n} F{f}", [gate, up], torch.randn_like(gate),
                {"triton": ops.swiglu, "torch.eager": reference.swiglu}, bytes_fwd=3 * io, bytes_fwd_bwd=8 * io)


BUILD = {"rms_norm": rms_norm_case, "rope": rope_case, "swiglu": swiglu_case}
PEERS = {"rms_norm": ("F.rms_norm",) if hasattr(F, "rms_norm") else ()}  # torch's own op, where it has one
ELEMENTWISE = [(op, shape, impl) for op, shapes in (("rms_norm", NORM_SHAPES), ("rope", ROPE_SHAPES),
                                                    ("swiglu", SWIGLU_SHAPES))
               for shape in shapes for impl in ("triton", "torch.eager", *PEERS.get(op, ()))]


@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("op,shape,impl", ELEMENTWISE,
                         ids=[f"{op}-{'x'.join(map(str, s))}-{impl}" for op, s, impl in ELEMENTWISE])
def test_elementwise(measure, op, shape, impl, pass_):
    if impl == "triton":
        _skip_unmeasured("triton")
    case = BUILD[op](*shape)
    fn = case.impls[impl]
    if impl == "triton":
        fn = _on_backend(fn, "triton")
    if pass_ == "fwd":
        call = torch.no_grad()(lambda: fn(*case.inputs))
    else:
        wanted = [t for t in case.inputs if t.requires_grad]
        call = lambda: torch.autograd.grad(fn(*case.inputs), wanted, case.grad)  # noqa: E731
    measure(call, group=f"{op} {pass_} {case.shape} {DTYPE_NAME}", impl=impl, peer="torch.eager",
            bytes=float(case.bytes_fwd if pass_ == "fwd" else case.bytes_fwd_bwd), op=op, shape=case.shape,
            dtype=DTYPE_NAME, **{"pass": pass_})
    if GPU:
        torch.cuda.empty_cache()


# ---- fused linear cross-entropy -----------------------------------------------------------------

_UNFUSED_PEAK: dict[tuple[int, int, int], float] = {}  # (N, H, V) -> unfused peak MiB, for mem_vs_unfused


def flce_inputs(n: int, h: int, v: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden (N, H) and weight (V, H) requiring grad, targets (N,) in [0, V)."""
    torch.manual_seed(0)
    hidden = torch.randn(n, h, device=DEVICE, dtype=DTYPE, requires_grad=True)
    weight = (torch.randn(v, h, device=DEVICE, dtype=DTYPE) * h**-0.5).requires_grad_()
    targets = torch.randint(0, v, (n,), device=DEVICE)
    return hidden, weight, targets


def flce_step(impl: str, hidden, weight, targets) -> Callable[[], tuple[torch.Tensor, ...]]:
    """One fwd+bwd of ``impl`` ("unfused torch" or "fused <backend>") -> (loss, d hidden, d weight)."""
    from fastlm.ops.fused_loss import fused_linear_cross_entropy

    if impl == "unfused torch":
        def loss():
            return F.cross_entropy((hidden @ weight.t()).float(), targets)
    else:
        def loss():
            return _on_backend(fused_linear_cross_entropy, impl.removeprefix("fused "))(hidden, weight, targets)

    def step():
        value = loss()
        return (value.detach(), *torch.autograd.grad(value, [hidden, weight]))

    return step


@pytest.mark.parametrize("impl", ["unfused torch", "fused triton", "fused reference"])
@pytest.mark.parametrize("n,h,v", FLCE_SHAPES, ids=[f"N{n}-H{h}-V{v}" for n, h, v in FLCE_SHAPES])
def test_fused_linear_cross_entropy(measure, n, h, v, impl):
    from fastlm.ops.fused_loss import default_chunk_size

    if impl != "unfused torch":
        _skip_unmeasured(impl.removeprefix("fused "))
    inputs = flce_inputs(n, h, v)
    step = flce_step(impl, *inputs)
    info = {}
    if impl != "unfused torch":
        got, want = step(), flce_step("unfused torch", *inputs)()
        info["max_abs_diff"] = max(float((a.float() - b.float()).abs().max()) for a, b in zip(got, want))
        assert torch.isfinite(got[0]), f"{impl}: loss {got[0]}"
        del got, want
    measure(step, group=f"fused_linear_cross_entropy fwd+bwd N{n} H{h} V{v} C{default_chunk_size(n, v)} {DTYPE_NAME}",
            impl=impl, peer="unfused torch", flops=6.0 * n * h * v, dtype=DTYPE_NAME, **info)
    peak = measure.benchmark.extra_info.get("peak_mb")
    if impl == "unfused torch":
        _UNFUSED_PEAK[(n, h, v)] = peak
    elif peak is not None and _UNFUSED_PEAK.get((n, h, v)):
        measure.benchmark.extra_info["mem_vs_unfused"] = peak / _UNFUSED_PEAK[(n, h, v)]
    del inputs, step
    if GPU:
        torch.cuda.empty_cache()
