"""Int8 inference: decode throughput of bf16 vs int8 weight-only vs W8A8 models, and int8 GEMMs.

Part 1 (``section="decode"``): greedy ``fastlm.generate`` tokens/s of Llama-shaped models (~1B
and ~7B on CUDA; the tiny preset on CPU) at batch 1 and 16, in the model dtype, int8 weight-only
and W8A8 (dynamic per-token activations). Every variant is built from the same seed on the same
device, so the weights are the same; rows carry the weight memory, the peak memory and the
speedup vs the unquantized model at the same batch.

Part 2 (``section="matmul"``): at prefill shapes (M ≥ 2048 on CUDA), TOPS of the W8A8 linear
(fused per-token quantization + int8 GEMM + dequantizing epilogue) on each backend, of the bare
int8 GEMM (Triton, and ``torch._int_mm`` = cuBLASLt), and of the bf16 matmul; at decode shapes
(M = 1, 16), GB/s of the weight-only int8 linear vs the bf16 matmul (weight bytes / time).
Issue targets on an H100: int8 weight-only batch-1 decode ≥ 1.8× bf16; W8A8 ≥ 1.5× bf16 TFLOP/s
at M ≥ 2048. Numbers are whatever this run measures, on the device named in the results.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from bench.common import peak_memory_mb, time_fn, wall_seconds

logger = logging.getLogger(__name__)

VARIANTS = ("dense", "int8_weight_only", "w8a8")


def _decode_cases(device: str, quick: bool) -> list[tuple[str, int, int, int]]:
    """(preset, batch, prompt_len, new_tokens)."""
    if device == "cuda":
        cases = [("llama-1b", 1, 128, 128), ("llama-1b", 16, 128, 128), ("llama-7b", 1, 128, 128),
                 ("llama-7b", 16, 128, 128)]
        return cases[:2] if quick else cases
    cases = [("tiny", 1, 16, 16), ("tiny", 16, 16, 16)]
    return cases[:1] if quick else cases


def _build(preset: str, variant: str, device: str, dtype: torch.dtype):
    import fastlm
    from fastlm.quant import quantize

    torch.manual_seed(0)  # same weights for every variant
    with torch.device(device):
        model = fastlm.Model(fastlm.preset(preset))
    model = model.to(dtype).eval()
    if variant != "dense":
        quantize(model, variant)
    return model


def _decode_rows(device: str, quick: bool) -> list[dict]:
    import fastlm
    from fastlm.quant import model_bytes

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    rows: list[dict] = []
    cases = _decode_cases(device, quick)
    for preset in dict.fromkeys(p for p, *_ in cases):
        for variant in VARIANTS:
            model = None
            try:
                model = _build(preset, variant, device, dtype)
                for _, batch, prompt_len, new in [c for c in cases if c[0] == preset]:
                    prompt = torch.randint(0, model.config.vocab_size, (batch, prompt_len), device=device)
                    seconds = wall_seconds(lambda: fastlm.generate(model, prompt, max_new_tokens=new), device)
                    rows.append({
                        "section": "decode", "model": preset, "variant": variant, "batch": batch,
                        "prompt": prompt_len, "new_tokens": new, "dtype": str(dtype).removeprefix("torch."),
                        "status": "ok", "tokens_per_s": batch * new / seconds,
                        "weight_mb": model_bytes(model) / 2**20,
                        "peak_mem_mb": peak_memory_mb(lambda: fastlm.generate(model, prompt, max_new_tokens=4), device),
                    })
            except torch.OutOfMemoryError as err:
                rows.append({"section": "decode", "model": preset, "variant": variant, "status": "out of memory",
                             "note": str(err).splitlines()[0]})
            finally:
                model = None  # free the variant before building the next one
                if device == "cuda":
                    torch.cuda.empty_cache()
    dense = {(r["model"], r["batch"]): r["tokens_per_s"] for r in rows
             if r.get("variant") == "dense" and r["status"] == "ok"}
    for r in rows:
        if r["status"] == "ok" and (r["model"], r["batch"]) in dense:
            r["speedup_vs_dense"] = r["tokens_per_s"] / dense[(r["model"], r["batch"])]
    return rows


def _matmul_shapes(device: str, quick: bool) -> list[tuple[int, int, int]]:
    """(M, K, N): prefill shapes of Llama-7B's projections, and decode rows M = 1, 16."""
    if device == "cuda":
        shapes = [(4096, 4096, 4096), (2048, 4096, 11008), (2048, 11008, 4096), (1, 4096, 4096),
                  (16, 4096, 4096), (1, 4096, 11008), (1, 11008, 4096)]
        return shapes[:1] + shapes[3:4] if quick else shapes
    shapes = [(256, 512, 512), (1, 512, 512)]
    return shapes


def _matmul_rows(device: str, quick: bool) -> list[dict]:
    from fastlm import ops
    from fastlm.ops import int8_triton
    from fastlm.ops.backend import kernel_module

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    backends = [b for b in ("reference", "triton", "cuda") if ops.backend_status(b, device)[0]]
    if device != "cuda":
        backends = ["reference"]  # the Triton interpreter is not a performance measurement
    rows: list[dict] = []
    for m, k, n in _matmul_shapes(device, quick):
        torch.manual_seed(0)
        x = torch.randn(m, k, device=device, dtype=dtype)
        w = torch.randn(n, k, device=device, dtype=dtype) / k**0.5
        q, ws = ops.quantize_int8(w)
        xq, sx = int8_triton.quantize_per_token_reference(x, None)
        flops, weight_bytes = 2.0 * m * n * k, n * k
        shape = f"{m}x{k}x{n}"
        cases: list[tuple[str, str, object]] = [("bf16 F.linear" if device == "cuda" else "fp32 F.linear", "torch",
                                                 lambda: F.linear(x, w))]
        if hasattr(torch, "_int_mm") and (device == "cpu" or (m > 16 and k % 8 == 0 and n % 8 == 0)):
            cases.append(("int8 GEMM torch._int_mm", "torch", lambda: torch._int_mm(xq, q.t())))
        for backend in backends:
            cases.append(("w8a8_linear", backend,
                          lambda b=backend: _forced(b, lambda: int8_triton.w8a8_linear(x, q, ws))))
            cases.append(("int8_linear (weight-only)", backend,
                          lambda b=backend: _forced(b, lambda: ops.int8_linear(x, q, ws))))
        if "triton" in backends:
            cases.append(("int8 GEMM + epilogue (triton)", "triton",
                          lambda: kernel_module("int8").w8a8_matmul(xq, sx, q, ws, None, None, dtype)))
        for op, impl, fn in cases:
            row = {"section": "matmul", "op": op, "shape": shape, "dtype": str(dtype).removeprefix("torch."),
                   "backend": impl}
            try:
                timing = time_fn(fn, device)
            except NotImplementedError as err:
                rows.append({**row, "status": "not implemented", "note": str(err)})
                continue
            except Exception as err:  # noqa: BLE001  recorded as an error; the run exits non-zero
                logger.exception("%s %s on %s failed", op, shape, impl)
                rows.append({**row, "status": "error", "note": f"{type(err).__name__}: {err}"})
                continue
            seconds = timing["median_ms"] * 1e-3
            row.update(status="ok", **timing, tflops=flops / seconds / 1e12)
            if m <= 16:  # memory-bound: the weight read dominates
                row["gbps"] = weight_bytes * (1 if "int8" in op or "w8a8" in op else x.element_size()) / seconds / 1e9
            rows.append(row)
        base = next((r["median_ms"] for r in rows if r.get("shape") == shape and r["op"].endswith("F.linear")
                     and r["status"] == "ok"), None)
        for r in rows:
            if r.get("shape") == shape and r["status"] == "ok" and base is not None:
                r["speedup_vs_torch"] = base / r["median_ms"]
    return rows


def _forced(backend: str, fn):
    import fastlm

    with fastlm.use_backend(backend):
        return fn()


def run(device: str, quick: bool) -> list[dict]:
    """Decode throughput rows, then matmul rows, on ``device`` ("cpu" or "cuda")."""
    records = _matmul_rows(device, quick)
    records.extend(_decode_rows(device, quick))
    return records

