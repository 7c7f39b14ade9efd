"""fastlm ops on every available backend vs the reference backend and torch's own peer.

For each op and shape: one row per backend (``reference``, ``triton``, ``cuda``) and one for
torch's peer where it exists (SDPA, F.rms_norm, eager silu·up, F.cross_entropy), all in the
same run. Rows carry median/p20/p80 ms, TFLOP/s (attention) or GB/s (memory-bound ops: the
minimal bytes read + written), speedup vs the reference backend and vs torch, the max abs
difference from the reference output, and peak CUDA memory. A backend with no kernel for an
op is recorded as ``not implemented``; any other failure as ``error`` (the run then fails).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bench.common import peak_memory_mb, time_fn

logger = logging.getLogger(__name__)

BACKENDS = ("reference", "triton", "cuda")


@dataclass(frozen=True)
class Case:
    """One op at one shape. ``build()`` allocates the inputs and returns (fastlm call, peer call)."""

    op: str
    shape: str
    dtype: torch.dtype
    build: Callable[[], tuple[Callable[[], torch.Tensor], Callable[[], torch.Tensor] | None]]
    peer: str | None = None  # name of torch's implementation, if any
    flops: float | None = None
    bytes: float | None = None
    compare: bool = True  # compare the output with the reference backend's


def _randn(*shape: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    return torch.randn(*shape, dtype=dtype, device=device)


def _attention_cases(device: str, quick: bool) -> Iterator[Case]:
    from fastlm import ops

    if device == "cuda":
        dtype = torch.bfloat16
        shapes = [(4, 16, 16, 1024, 128, True), (4, 16, 16, 1024, 128, False),
                  (1, 32, 8, 4096, 128, True)]
    else:
        dtype = torch.float32
        shapes = [(1, 4, 4, 128, 64, True), (1, 8, 2, 256, 64, False)]
    for b, h, hkv, t, d, causal in shapes[:1] if quick else shapes:
        def build(b=b, h=h, hkv=hkv, t=t, d=d, causal=causal):
            q = _randn(b, h, t, d, dtype=dtype, device=device)
            k = _randn(b, hkv, t, d, dtype=dtype, device=device)
            v = _randn(b, hkv, t, d, dtype=dtype, device=device)
            # Tq == Tk, so SDPA's top-left causal mask equals fastlm's bottom-right one.
            return (
                lambda: ops.attention(q, k, v, causal=causal),
                lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=h != hkv),
            )

        flops = 4 * b * h * t * t * d * (0.5 if causal else 1.0)
        shape = f"B{b} H{h} Hkv{hkv} T{t} D{d}{' causal' if causal else ''}"
        yield Case("attention", shape, dtype, build, peer="torch.sdpa", flops=flops)


def _decode_attention_cases(device: str, quick: bool) -> Iterator[Case]:
    from fastlm import ops

    if device == "cuda":
        dtype, shapes = torch.bfloat16, [(32, 32, 8, 4096, 128), (1, 32, 8, 32768, 128)]
    else:
        dtype, shapes = torch.float32, [(4, 8, 2, 512, 64)]
    for b, h, hkv, length, d in shapes[:1] if quick else shapes:
        def build(b=b, h=h, hkv=hkv, length=length, d=d):
            q = _randn(b, h, 1, d, dtype=dtype, device=device)
            k = _randn(b, hkv, length, d, dtype=dtype, device=device)
            v = _randn(b, hkv, length, d, dtype=dtype, device=device)
            lens = torch.full((b,), length, dtype=torch.int32, device=device)  # full caches
            return (
                lambda: ops.decode_attention(q, k, v, lens),
                lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=h != hkv),
            )

        size = dtype.itemsize
        moved = (2 * b * hkv * length * d + 2 * b * h * d) * size
        shape = f"B{b} H{h} Hkv{hkv} L{length} D{d}"
        yield Case("decode_attention", shape, dtype, build, peer="torch.sdpa", bytes=moved)


def _rms_norm_cases(device: str, quick: bool) -> Iterator[Case]:
    from fastlm import ops

    if device == "cuda":
        dtype, shapes = torch.bfloat16, [(16384, 4096), (4096, 8192)]
    else:
        dtype, shapes = torch.float32, [(2048, 1024)]
    for n, d in shapes[:1] if quick else shapes:
        def build(n=n, d=d):
            x = _randn(n, d, dtype=dtype, device=device)
            w = _randn(d, dtype=dtype, device=device)
            peer = (lambda: F.rms_norm(x, (d,), w, 1e-6)) if hasattr(F, "rms_norm") else None
            return lambda: ops.rms_norm(x, w, 1e-6), peer

        moved = (2 * n * d + d) * dtype.itemsize
        yield Case("rms_norm", f"N{n} D{d}", dtype, build, peer="F.rms_norm", bytes=moved)


def _swiglu_cases(device: str, quick: bool) -> Iterator[Case]:
    from fastlm import ops

    if device == "cuda":
        dtype, shapes = torch.bfloat16, [(16384, 14336), (4096, 11008)]
    else:
        dtype, shapes = torch.float32, [(1024, 2048)]
    for n, f in shapes[:1] if quick else shapes:
        def build(n=n, f=f):
            gate = _randn(n, f, dtype=dtype, device=device)
            up = _randn(n, f, dtype=dtype, device=device)
            return lambda: ops.swiglu(gate, up), lambda: F.silu(gate) * up

        moved = 3 * n * f * dtype.itemsize
        yield Case("swiglu", f"N{n} F{f}", dtype, build, peer="torch.eager", bytes=moved)


def _cross_entropy_cases(device: str, quick: bool) -> Iterator[Case]:
    from fastlm import ops

    if device == "cuda":
        dtype, shapes = torch.bfloat16, [(8192, 128256), (16384, 32000)]
    else:
        dtype, shapes = torch.float32, [(256, 8192)]
    for n, v in shapes[:1] if quick else shapes:
        def build(n=n, v=v):
            logits = _randn(n, v, dtype=dtype, device=device)
            targets = torch.randint(0, v, (n,), device=device)
            return lambda: ops.cross_entropy(logits, targets), lambda: F.cross_entropy(logits, targets)

        moved = n * v * dtype.itemsize + n * 8
        yield Case("cross_entropy", f"N{n} V{v}", dtype, build, peer="F.cross_entropy", bytes=moved)


def _sample_cases(device: str, quick: bool) -> Iterator[Case]:
    from fastlm import ops

    if device == "cuda":
        dtype, shapes = torch.float32, [(64, 128256)]
    else:
        dtype, shapes = torch.float32, [(8, 32000)]
    settings = [("T1", {}), ("T0.8 k50 p0.9", {"temperature": 0.8, "top_k": 50, "top_p": 0.9})]
    for b, v in shapes:
        for label, kwargs in settings[:1] if quick else settings:
            def build(b=b, v=v, kwargs=kwargs):
                logits = _randn(b, v, dtype=dtype, device=device)
                return lambda: ops.sample(logits, **kwargs), None

            moved = b * v * dtype.itemsize
            yield Case("sample", f"B{b} V{v} {label}", dtype, build, bytes=moved, compare=False)


CASES = (
    _attention_cases,
    _decode_attention_cases,
    _rms_norm_cases,
    _swiglu_cases,
    _cross_entropy_cases,
    _sample_cases,
)


def _row(case: Case, backend: str, **fields) -> dict:
    return {"op": case.op, "shape": case.shape, "dtype": str(case.dtype).removeprefix("torch."),
            "backend": backend, **fields}


def _measure(fn: Callable[[], torch.Tensor], device: str) -> tuple[torch.Tensor, dict]:
    out = fn()
    timing = time_fn(fn, device)
    timing["peak_mem_mb"] = peak_memory_mb(fn, device)
    return out, timing


def _max_abs_diff(out: torch.Tensor, ref: torch.Tensor) -> float:
    return (out.float() - ref.float()).abs().max().item()


def _run_case(case: Case, device: str, backends: list[str]) -> list[dict]:
    import fastlm

    torch.manual_seed(0)
    fn, peer_fn = case.build()
    rows: list[dict] = []
    ref_out = None
    for backend in backends:
        try:
            with fastlm.use_backend(backend):
                out, timing = _measure(fn, device)
        except NotImplementedError:
            rows.append(_row(case, backend, status="not implemented"))
            continue
        except Exception as err:  # noqa: BLE001  recorded as an error; the run exits non-zero
            logger.exception("%s %s on %s failed", case.op, case.shape, backend)
            rows.append(_row(case, backend, status="error", note=f"{type(err).__name__}: {err}"))
            continue
        row = _row(case, backend, status="ok", **timing)
        if backend == "reference":
            ref_out = out
        elif case.compare and ref_out is not None:
            row["max_abs_diff_vs_ref"] = _max_abs_diff(out, ref_out)
        rows.append(row)
    if peer_fn is not None:
        try:
            out, timing = _measure(peer_fn, device)
        except Exception as err:  # noqa: BLE001
            logger.exception("%s %s on %s failed", case.op, case.shape, case.peer)
            rows.append(_row(case, case.peer, status="error", note=f"{type(err).__name__}: {err}"))
        else:
            row = _row(case, case.peer, status="ok", **timing)
            if case.compare and ref_out is not None:
                row["max_abs_diff_vs_ref"] = _max_abs_diff(out, ref_out)
            rows.append(row)
    _add_rates(case, rows)
    return rows


def _add_rates(case: Case, rows: list[dict]) -> None:
    """TFLOP/s or GB/s, and speedups vs the reference backend and torch's peer."""
    ms = {r["backend"]: r["median_ms"] for r in rows if r["status"] == "ok"}
    for r in rows:
        if r["status"] != "ok":
            continue
        seconds = r["median_ms"] * 1e-3
        if case.flops is not None:
            r["tflops"] = case.flops / seconds / 1e12
        if case.bytes is not None:
            r["gbps"] = case.bytes / seconds / 1e9
        if "reference" in ms:
            r["speedup_vs_ref"] = ms["reference"] / r["median_ms"]
        if case.peer in ms:
            r["speedup_vs_torch"] = ms[case.peer] / r["median_ms"]


def run(device: str, quick: bool) -> list[dict]:
    """Benchmark every op case on ``device`` ("cpu" or "cuda"); ``quick`` keeps one shape per op."""
    from fastlm import ops

    records: list[dict] = []
    backends: list[str] = []
    for name in BACKENDS:
        ok, why = ops.backend_status(name, device)
        if not ok:
            records.append({"op": "*", "backend": name, "status": "unavailable", "note": why})
        elif name == "triton" and device == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
            records.append({"op": "*", "backend": name, "status": "skipped",
                            "note": "Triton interpreter: not a performance measurement"})
        else:
            backends.append(name)
    for make_cases in CASES:
        for case in make_cases(device, quick):
            logger.info("%s %s %s", case.op, case.shape, case.dtype)
            records.extend(_run_case(case, device, backends))
            if device == "cuda":
                torch.cuda.empty_cache()
    return records
