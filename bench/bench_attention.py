"""Attention: fastlm's triton kernels vs torch SDPA (each of its backends) vs the naive reference.

One case per (S, D, causal) with B·S fixed (16k tokens on GPU) and H·D = 2048 (H = 32 at D = 64,
16 at D = 128), q/k/v (B, H, S, D) in bfloat16 on GPU; tiny float32 shapes on CPU. For each
case and pass, in the same run:

- ``fastlm.triton`` (``ops.attention`` with the triton backend forced; skipped on CPU, where only
  the interpreter exists, which is not a performance measurement),
- ``fastlm.reference`` (the naive plain-PyTorch reference, materializing the S×S scores),
- ``sdpa.flash``, ``sdpa.efficient``, ``sdpa.cudnn``, ``sdpa.math``: ``F.scaled_dot_product_attention``
  with one backend forced by ``torch.nn.attention.sdpa_kernel`` (``unsupported`` where torch has
  no kernel for the device/shape).

Rows per ``pass``: ``fwd`` (no autograd) and ``bwd`` (``torch.autograd.grad`` of q, k, v from a
retained graph: the backward alone). ``tflops``: forward 4·B·H·S²·D, halved when causal;
backward 2.5× the forward's count. ``peak_mem_mb``: torch.cuda.max_memory_allocated over one
call, inputs included (fwd: forward only; bwd: forward + backward). ``speedup_vs_torch`` is
relative to ``sdpa.flash`` and ``speedup_vs_ref`` to the reference; ``max_abs_diff_vs_sdpa``
compares fwd outputs with sdpa.flash (sdpa.math on CPU). Naive implementations whose S×S
matrices would not fit are recorded as ``skipped``, out-of-memory as ``oom``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from bench.common import peak_memory_mb, time_fn

logger = logging.getLogger(__name__)

SDPA_BACKENDS = {"sdpa.flash": "FLASH_ATTENTION", "sdpa.efficient": "EFFICIENT_ATTENTION",
                 "sdpa.cudnn": "CUDNN_ATTENTION", "sdpa.math": "MATH"}
NAIVE = ("fastlm.reference", "sdpa.math")  # materialize the S×S scores
BASELINE = "sdpa.flash"


def _cases(device: str, quick: bool) -> Iterator[tuple[int, int, int, int, bool, torch.dtype]]:
    """(B, H, S, D, causal, dtype) with B·S tokens fixed."""
    if device.startswith("cuda"):
        tokens, hidden, dtype = 16384, 2048, torch.bfloat16
        seqs = [1024, 4096] if quick else [512, 1024, 2048, 4096, 8192, 16384]
        dims = [128] if quick else [64, 128]
    else:
        tokens, hidden, dtype = 256, 256, torch.float32
        seqs = [128] if quick else [128, 256]
        dims = [64]
    for d in dims:
        for s in seqs:
            for causal in (False, True):
                yield tokens // s, hidden // d, s, d, causal, dtype


def _impls(device: str, triton_ok: bool) -> dict[str, Callable | None]:
    """name -> fn(q, k, v, causal) (None: not runnable here, recorded with a reason)."""
    import fastlm
    from fastlm import ops

    def fastlm_fn(backend: str) -> Callable:
        def call(q, k, v, causal):
            with fastlm.use_backend(backend):
                return ops.attention(q, k, v, causal=causal)
        return call

    impls: dict[str, Callable | None] = {"fastlm.triton": fastlm_fn("triton") if triton_ok else None,
                                         "fastlm.reference": fastlm_fn("reference")}
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:
        return impls
    for name, attr in SDPA_BACKENDS.items():
        backend = getattr(SDPBackend, attr, None)
        if backend is None:
            impls[name] = None
            continue

        def call(q, k, v, causal, backend=backend):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        impls[name] = call
    return impls


def _too_big(name: str, b: int, h: int, s: int, device: str) -> str | None:
    """Why a naive implementation is skipped: its S×S fp32 scores would not fit in ~half the GPU."""
    if name not in NAIVE or not device.startswith("cuda"):
        return None
    need = 6 * b * h * s * s * 4  # scores, masked copy, probs, their grads (fp32)
    budget = 0.5 * torch.cuda.get_device_properties(torch.device(device)).total_memory
    if need > budget:
        return f"materializes S×S scores: ~{need / 2**30:.0f} GiB > {budget / 2**30:.0f} GiB budget"
    return None


def _row(shape: str, dtype: torch.dtype, backend: str, pass_: str, **fields) -> dict:
    return {"op": "attention", "shape": shape, "dtype": str(dtype).removeprefix("torch."), "backend": backend,
            "pass": pass_, **fields}


def _measure(fn: Callable[[], object], device: str) -> dict:
    timing = time_fn(fn, device, budget_s=0.2) if device == "cpu" else time_fn(fn, device)
    timing["peak_mem_mb"] = peak_memory_mb(fn, device)
    return timing


def _call(fn: Callable, pass_: str, q, k, v, do, causal: bool, outputs: dict, name: str) -> Callable[[], object]:
    """The timed call: the forward without autograd (its output kept in ``outputs``), or the
    backward alone from a retained graph."""
    if pass_ == "fwd":
        def forward():
            with torch.no_grad():
                return fn(q, k, v, causal)

        outputs[name] = forward()
        return forward
    qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
    out = fn(qg, kg, vg, causal)
    return lambda: torch.autograd.grad(out, (qg, kg, vg), do, retain_graph=True)


def _run_case(b, h, s, d, causal, dtype, device, impls, unavailable) -> list[dict]:
    shape = f"B{b} H{h} S{s} D{d}{' causal' if causal else ''}"
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v, do = (torch.randn(b, h, s, d, device=device, dtype=dtype, generator=gen) for _ in range(4))
    flops_fwd = 4 * b * h * s * s * d * (0.5 if causal else 1.0)
    rows, outputs = [], {}
    for name, fn in impls.items():
        if fn is None:
            for pass_ in ("fwd", "bwd"):
                rows.append(_row(shape, dtype, name, pass_, status=unavailable.get(name, "unavailable"),
                                 note=unavailable.get(f"{name}:note")))
            continue
        skip = _too_big(name, b, h, s, device)
        if skip:
            rows += [_row(shape, dtype, name, p, status="skipped", note=skip) for p in ("fwd", "bwd")]
            continue
        passes = ["fwd", "bwd"]
        while passes:
            pass_ = passes.pop(0)
            try:
                timing = _measure(_call(fn, pass_, q, k, v, do, causal, outputs, name), device)
            except torch.cuda.OutOfMemoryError as err:
                status, note = "oom", str(err).splitlines()[0]
            except Exception as err:  # noqa: BLE001  an error row makes bench.run exit non-zero
                unsupported = "No available kernel" in str(err) or "No viable backend" in str(err)
                if not (name.startswith("sdpa.") and unsupported):
                    logger.exception("attention %s %s %s failed", shape, name, pass_)
                    rows.append(_row(shape, dtype, name, pass_, status="error", note=f"{type(err).__name__}: {err}"))
                    continue
                status, note = "unsupported", str(err).splitlines()[0][:200]
            else:
                flops = flops_fwd * (2.5 if pass_ == "bwd" else 1.0)
                rows.append(_row(shape, dtype, name, pass_, status="ok", **timing,
                                 tflops=flops / (timing["median_ms"] * 1e-3) / 1e12))
                continue
            finally:
                if device.startswith("cuda"):
                    torch.cuda.empty_cache()
            rows += [_row(shape, dtype, name, p, status=status, note=note) for p in (pass_, *passes)]
            passes = []
    _add_ratios(rows, outputs, device)
    return rows


def _add_ratios(rows: list[dict], outputs: dict, device: str) -> None:
    baseline_out = outputs.get(BASELINE if device.startswith("cuda") else "sdpa.math")
    for pass_ in ("fwd", "bwd"):
        ms = {r["backend"]: r["median_ms"] for r in rows if r["pass"] == pass_ and r["status"] == "ok"}
        for r in rows:
            if r["pass"] != pass_ or r["status"] != "ok":
                continue
            if "fastlm.reference" in ms:
                r["speedup_vs_ref"] = ms["fastlm.reference"] / r["median_ms"]
            if BASELINE in ms:
                r["speedup_vs_torch"] = ms[BASELINE] / r["median_ms"]
            if pass_ == "fwd" and baseline_out is not None and r["backend"] in outputs:
                diff = (outputs[r["backend"]].float() - baseline_out.float()).abs().max().item()
                r["max_abs_diff_vs_sdpa"] = diff


def run(device: str, quick: bool) -> list[dict]:
    """Benchmark attention on ``device`` ("cpu" or "cuda"); ``quick`` keeps a few shapes."""
    import fastlm.ops.attention_triton  # noqa: F401  registers the triton kernels (imports no triton)
    from fastlm import ops

    ok, why = ops.backend_status("triton", device)
    unavailable = {}
    if not ok:
        unavailable.update({"fastlm.triton": "unavailable", "fastlm.triton:note": why})
    elif device == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        ok = False
        unavailable.update({"fastlm.triton": "skipped",
                            "fastlm.triton:note": "Triton interpreter: not a performance measurement"})
    impls = _impls(device, ok)
    records: list[dict] = []
    for b, h, s, d, causal, dtype in _cases(device, quick):
        logger.info("attention B%d H%d S%d D%d causal=%s", b, h, s, d, causal)
        records.extend(_run_case(b, h, s, d, causal, dtype, device, impls, unavailable))
    return records
