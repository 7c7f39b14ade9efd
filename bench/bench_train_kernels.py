"""Training kernels: RMSNorm, RoPE and SwiGLU forward+backward, and the fused linear cross-entropy.

RMSNorm / RoPE / SwiGLU: for each shape, the ``triton`` backend against PyTorch eager (autograd
through the plain-PyTorch reference, fastlm's ``reference`` backend, and torch's own peer
``F.rms_norm`` where it exists), in the same run. Rows per ``pass``: ``fwd`` (the op) and
``fwd+bwd`` (op, then ``torch.autograd.grad`` of all inputs for a fixed upstream gradient).
``gbps`` counts the minimal bytes (each input and output read or written once): fwd reads the
inputs and writes y; fwd+bwd adds reading dy and the inputs again and writing each input's
gradient. The eager RoPE computes its cos/sin tables in every call, as fastlm's reference does
(transformers computes them once per model forward and shares them across layers).

Fused linear cross-entropy: loss + d hidden + d weight for hidden (N, H), weight (V, H) in
bfloat16 on GPU at V = 32000 and 128256, fused (``triton`` and ``reference`` backends) vs
unfused (torch matmul, ``.float()`` logits and F.cross_entropy, as transformers' Llama does),
with ``peak_mem_mb`` (torch.cuda.max_memory_allocated over one fwd+bwd, inputs included) and
``mem_vs_unfused`` / ``speedup_vs_unfused``. On CPU: tiny float32 shapes, the reference
backend only (the Triton interpreter is not a performance measurement).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bench.common import peak_memory_mb, time_fn

logger = logging.getLogger(__name__)


def _row(op: str, shape: str, dtype: torch.dtype, backend: str, **fields) -> dict:
    return {"op": op, "shape": shape, "dtype": str(dtype).removeprefix("torch."), "backend": backend, **fields}


def _fwd_bwd(fn: Callable[..., torch.Tensor], inputs: list[torch.Tensor], grad: torch.Tensor) -> Callable[[], object]:
    wanted = [t for t in inputs if t.requires_grad]
    return lambda: torch.autograd.grad(fn(*inputs), wanted, grad)


def _fwd(fn: Callable[..., torch.Tensor], inputs: list[torch.Tensor]) -> Callable[[], object]:
    def call():
        with torch.no_grad():
            return fn(*inputs)

    return call


def _backend_fn(fn: Callable, backend: str) -> Callable:
    import fastlm

    def call(*args):
        with fastlm.use_backend(backend):
            return fn(*args)

    return call


@dataclass
class Case:
    """One memory-bound op at one shape: fastlm's op, PyTorch eager, and torch's peer if any."""

    op: str
    shape: str
    dtype: torch.dtype
    inputs: list[torch.Tensor]
    grad: torch.Tensor  # upstream gradient of the output
    fn: Callable[..., torch.Tensor]  # fastlm.ops.<op>, run on a forced backend
    eager: Callable[..., torch.Tensor]  # the plain-PyTorch reference, differentiated by autograd
    bytes_fwd: float
    bytes_fwd_bwd: float
    peer: tuple[str, Callable[..., torch.Tensor]] | None = None


def _elementwise_cases(device: str, quick: bool):
    from fastlm import ops
    from fastlm.ops import reference

    gpu = device.startswith("cuda")
    dtype = torch.bfloat16 if gpu else torch.float32
    size = dtype.itemsize

    def randn(*shape, grad=True):
        return torch.randn(*shape, device=device, dtype=dtype).requires_grad_(grad)

    norm_shapes = [(16384, 4096), (4096, 8192)] if gpu else [(512, 256)]
    for n, d in norm_shapes[:1] if quick else norm_shapes:
        x, w = randn(n, d), randn(d)
        io, wb = n * d * size, d * size
        peer = ("F.rms_norm", lambda x, w, d=d: F.rms_norm(x, (d,), w, 1e-6)) if hasattr(F, "rms_norm") else None
        yield Case("rms_norm", f"N{n} D{d}", dtype, [x, w], torch.randn_like(x),
                   lambda x, w: ops.rms_norm(x, w, 1e-6), lambda x, w: reference.rms_norm(x, w, 1e-6),
                   bytes_fwd=2 * io + wb, bytes_fwd_bwd=(2 * io + wb) + (3 * io + 2 * wb), peer=peer)

    rope_shapes = [(4, 32, 4096, 128), (8, 8, 2048, 128)] if gpu else [(1, 4, 128, 64)]
    for b, h, t, d in rope_shapes[:1] if quick else rope_shapes:
        # q from a (B, T, H, D) projection viewed as (B, H, T, D), as the model does
        x = randn(b, t, h, d, grad=False).transpose(1, 2).requires_grad_()
        pos = torch.arange(t, device=device)
        io = b * h * t * d * size
        yield Case("rope", f"B{b} H{h} T{t} D{d}", dtype, [x], torch.randn_like(x),
                   lambda x, pos=pos: ops.rope(x, pos, theta=500000.0),
                   lambda x, pos=pos: reference.rope(x, pos, 500000.0),
                   bytes_fwd=2 * io, bytes_fwd_bwd=4 * io)

    swiglu_shapes = [(16384, 14336), (4096, 11008)] if gpu else [(256, 1024)]
    for n, f in swiglu_shapes[:1] if quick else swiglu_shapes:
        gate, up = randn(n, f), randn(n, f)
        io = n * f * size
        yield Case("swiglu", f"N{n} F{f}", dtype, [gate, up], torch.randn_like(gate), ops.swiglu, reference.swiglu,
                   bytes_fwd=3 * io, bytes_fwd_bwd=3 * io + 5 * io)


def _time(fn: Callable[[], object], device: str) -> dict:
    fn()
    timing = time_fn(fn, device)
    timing["peak_mem_mb"] = peak_memory_mb(fn, device)
    return timing


def _case_rows(case: Case, device: str, backends: list[str]) -> list[dict]:
    candidates = [(b, _backend_fn(case.fn, b)) for b in backends] + [("torch.eager", case.eager)]
    if case.peer is not None:
        candidates.append(case.peer)
    records = []
    for pass_name, moved in (("fwd", case.bytes_fwd), ("fwd+bwd", case.bytes_fwd_bwd)):
        rows = []
        for name, call in candidates:
            fields = {"pass": pass_name}
            bench = _fwd(call, case.inputs) if pass_name == "fwd" else _fwd_bwd(call, case.inputs, case.grad)
            try:
                timing = _time(bench, device)
            except NotImplementedError as err:
                rows.append(_row(case.op, case.shape, case.dtype, name, **fields, status="not implemented",
                                 note=str(err)))
                continue
            except Exception as err:  # noqa: BLE001  recorded as an error; the run exits non-zero
                logger.exception("%s %s %s on %s failed", case.op, case.shape, pass_name, name)
                rows.append(_row(case.op, case.shape, case.dtype, name, **fields, status="error",
                                 note=f"{type(err).__name__}: {err}"))
                continue
            gbps = moved / (timing["median_ms"] * 1e-3) / 1e9
            rows.append(_row(case.op, case.shape, case.dtype, name, **fields, status="ok", **timing, gbps=gbps))
        eager = next((r["median_ms"] for r in rows if r["backend"] == "torch.eager" and r["status"] == "ok"), None)
        for r in rows:
            if eager is not None and r["status"] == "ok":
                r["speedup_vs_torch"] = eager / r["median_ms"]
        records.extend(rows)
    return records


def _bench_elementwise(device: str, quick: bool, backends: list[str]) -> list[dict]:
    records = []
    for case in _elementwise_cases(device, quick):
        logger.info("%s %s %s", case.op, case.shape, case.dtype)
        records += _case_rows(case, device, backends)
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return records


def _flce_cases(device: str, quick: bool):
    if device.startswith("cuda"):
        # the fused peak is ~independent of N (W, float32 dW, one chunk), the unfused one grows with N
        shapes = [(8192, 4096, 128256), (16384, 4096, 128256), (8192, 4096, 32000)]
        return torch.bfloat16, shapes[:1] if quick else shapes
    return torch.float32, [(512, 128, 4096)]


def _fused_loss_rows(device: str, n: int, h: int, v: int, dtype: torch.dtype, backends: list[str]) -> list[dict]:
    """Unfused vs fused rows for one shape; the inputs are freed on return."""
    from fastlm.ops.fused_loss import default_chunk_size, fused_linear_cross_entropy

    shape = f"N{n} H{h} V{v} C{default_chunk_size(n, v)}"
    torch.manual_seed(0)
    hidden = torch.randn(n, h, device=device, dtype=dtype, requires_grad=True)
    weight = (torch.randn(v, h, device=device, dtype=dtype) * h**-0.5).requires_grad_()
    targets = torch.randint(0, v, (n,), device=device)

    def unfused():
        loss = F.cross_entropy((hidden @ weight.t()).float(), targets)
        return torch.autograd.grad(loss, [hidden, weight])

    def fused(backend):
        loss = _backend_fn(fused_linear_cross_entropy, backend)(hidden, weight, targets)
        return torch.autograd.grad(loss, [hidden, weight])

    candidates = [("unfused torch", unfused)]
    candidates += [(f"fused {b}", lambda b=b: fused(b)) for b in backends]
    rows = []
    for name, fn in candidates:
        try:
            timing = _time(fn, device)
        except Exception as err:  # noqa: BLE001  recorded as an error; the run exits non-zero
            logger.exception("fused_linear_cross_entropy %s on %s failed", shape, name)
            rows.append(_row("fused_linear_cross_entropy", shape, dtype, name, status="error",
                             note=f"{type(err).__name__}: {err}"))
            continue
        tflops = 3 * 2 * n * h * v / (timing["median_ms"] * 1e-3) / 1e12  # the three matmuls
        rows.append(_row("fused_linear_cross_entropy", shape, dtype, name, **{"pass": "fwd+bwd"},
                         status="ok", **timing, tflops=tflops))
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    base = next((r for r in rows if r["backend"] == "unfused torch" and r["status"] == "ok"), None)
    for r in rows:
        if base is not None and r["status"] == "ok":
            r["speedup_vs_unfused"] = base["median_ms"] / r["median_ms"]
            if r.get("peak_mem_mb") is not None and base.get("peak_mem_mb"):
                r["mem_vs_unfused"] = r["peak_mem_mb"] / base["peak_mem_mb"]
    return rows


def _bench_fused_loss(device: str, quick: bool, backends: list[str]) -> list[dict]:
    dtype, shapes = _flce_cases(device, quick)
    records = []
    for n, h, v in shapes:
        logger.info("fused_linear_cross_entropy N%d H%d V%d", n, h, v)
        records += _fused_loss_rows(device, n, h, v, dtype, backends)
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return records


def run(device: str, quick: bool) -> list[dict]:
    """Benchmark the training kernels on ``device`` ("cpu" or "cuda"); ``quick``: one shape each."""
    from fastlm import ops

    records: list[dict] = []
    backends = ["reference"]
    ok, why = ops.backend_status("triton", device)
    if not ok:
        records.append({"op": "*", "backend": "triton", "status": "unavailable", "note": why})
    elif not device.startswith("cuda"):
        records.append({"op": "*", "backend": "triton", "status": "skipped",
                        "note": "Triton interpreter: not a performance measurement"})
    else:
        from fastlm.ops import triton_fused  # noqa: F401  registers the kernels

        backends.insert(0, "triton")
    records += _bench_elementwise(device, quick, [b for b in backends if b != "reference"])
    records += _bench_fused_loss(device, quick, backends)
    return records
