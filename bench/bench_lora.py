"""LoRA linear layers: fastlm's fused kernels vs PEFT's LoRA layer, and mixed-adapter batches.

1. ``lora_linear`` fwd+bwd — the seven LoRA linears of a Llama-7B block (q, k, v, o: 4096→4096;
   gate, up: 4096→11008; down: 11008→4096), r = 16, bf16, 4096 tokens, W frozen, gradients
   for x, A and B. Rows per projection and a ``block`` total: fastlm ``triton`` (fused
   kernels), fastlm ``reference`` (plain PyTorch) and ``peft`` (peft.tuners.lora.Linear around
   an nn.Linear, the same weights) in the same run; ``speedup_vs_peft``, ``peak_mem_mb``
   (torch.cuda.max_memory_allocated over one fwd+bwd, inputs and weights included) and
   ``mem_vs_peft``; ``tflops`` counts the useful FLOPs 4·M·K·N + 6·M·r·(K + N).
2. ``lora_linear_mixed`` forward — a 4096→4096 projection serving a batch whose rows use
   1, 4, 8 or 16 different adapters (r = 16, bf16): 4096 tokens (32 × 128, prefill) and 64
   tokens (64 × 1, decode). ``tokens_per_s``, ``vs_single_adapter`` (time / the 1-adapter
   batch: the issue's target is ≤ 1.25 at 8 adapters) and ``vs_base_linear`` (time / the frozen
   linear alone), plus PEFT's mixed batch (``adapter_names=``) in the same run.

On CPU: tiny float32 shapes, the reference backend and PEFT only (the Triton interpreter is not
a performance measurement); GPU rows are only ever measured, never estimated.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from bench.common import peak_memory_mb, time_fn

logger = logging.getLogger(__name__)

LLAMA_7B_BLOCK = (("q_proj", 4096, 4096), ("k_proj", 4096, 4096), ("v_proj", 4096, 4096), ("o_proj", 4096, 4096),
                  ("gate_proj", 4096, 11008), ("up_proj", 4096, 11008), ("down_proj", 11008, 4096))
CPU_BLOCK = (("q_proj", 128, 128), ("up_proj", 128, 344), ("down_proj", 344, 128))


def _measure(fn: Callable[[], object], device: str) -> dict:
    fn()
    timing = time_fn(fn, device)
    timing["peak_mem_mb"] = peak_memory_mb(fn, device)
    return timing


def _row(op: str, shape: str, dtype: torch.dtype, backend: str, **fields) -> dict:
    return {"op": op, "shape": shape, "dtype": str(dtype).removeprefix("torch."), "backend": backend, **fields}


class _Holder(torch.nn.Module):
    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.proj = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def _peft_linear(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, r: int, alpha: float,
                 names: list[str] | None = None) -> torch.nn.Module:
    """PEFT's LoRA layer around a frozen nn.Linear holding ``weight``, built through PEFT's public
    API (get_peft_model / add_adapter); adapter i of ``names`` gets lora_a[i], lora_b[i]."""
    import peft

    base = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype)
    base.weight.data = weight
    names = names or ["default"]
    config = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=["proj"])
    model = peft.get_peft_model(_Holder(base), config, adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, config)
    layer = model.base_model.model.proj
    for i, name in enumerate(names):
        layer.lora_A[name].weight.data = lora_a[i].clone()
        layer.lora_B[name].weight.data = lora_b[i].clone()
        layer.lora_A[name].weight.requires_grad_(True)
        layer.lora_B[name].weight.requires_grad_(True)
    return layer


def _fwd_bwd(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, params: list[torch.Tensor],
             grad: torch.Tensor) -> Callable[[], object]:
    return lambda: torch.autograd.grad(forward(x), [x, *params], grad)


def _linear_rows(name: str, m: int, k: int, n: int, r: int, dtype: torch.dtype, device: str,
                 backends: list[str], peft_ok: bool) -> list[dict]:
    from fastlm import ops, use_backend

    shape = f"{name} M{m} K{k} N{n} r{r}"
    torch.manual_seed(0)
    x = torch.randn(m, k, device=device, dtype=dtype, requires_grad=True)
    weight = torch.randn(n, k, device=device, dtype=dtype) * k**-0.5
    lora_a = (torch.randn(1, r, k, device=device) * k**-0.5).to(dtype)
    lora_b = (torch.randn(1, n, r, device=device) * 0.01).to(dtype)
    grad = torch.randn(m, n, device=device, dtype=dtype)
    scale = 2.0
    a, b = lora_a[0].clone().requires_grad_(), lora_b[0].clone().requires_grad_()
    candidates = []
    for backend in backends:
        def forward(x, backend=backend):
            with use_backend(backend):
                return ops.lora_linear(x, weight, a, b, scale)
        candidates.append((backend, _fwd_bwd(forward, x, [a, b], grad)))
    if peft_ok:
        layer = _peft_linear(weight, lora_a, lora_b, r, scale * r)
        params = [layer.lora_A["default"].weight, layer.lora_B["default"].weight]
        candidates.append(("peft", _fwd_bwd(layer, x, params, grad)))
    flops = 4 * m * k * n + 6 * m * r * (k + n)
    rows = []
    for backend, fn in candidates:
        try:
            timing = _measure(fn, device)
        except Exception as err:  # noqa: BLE001  recorded as an error; the run exits non-zero
            logger.exception("lora_linear %s on %s failed", shape, backend)
            rows.append(_row("lora_linear", shape, dtype, backend, status="error", note=f"{type(err).__name__}: {err}"))
            continue
        rows.append(_row("lora_linear", shape, dtype, backend, **{"pass": "fwd+bwd"}, status="ok", **timing,
                         tflops=flops / (timing["median_ms"] * 1e-3) / 1e12))
    _relative_to(rows, "peft")
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return rows


def _relative_to(rows: list[dict], baseline: str) -> None:
    base = next((r for r in rows if r["backend"] == baseline and r["status"] == "ok"), None)
    if base is None:
        return
    for r in rows:
        if r["status"] == "ok" and r is not base:
            r[f"speedup_vs_{baseline}"] = base["median_ms"] / r["median_ms"]
            if r.get("peak_mem_mb") and base.get("peak_mem_mb"):
                r[f"mem_vs_{baseline}"] = r["peak_mem_mb"] / base["peak_mem_mb"]


def _block_totals(rows: list[dict], dtype: torch.dtype, shape: str) -> list[dict]:
    """One row per backend summing the projections' median times (max of their peaks)."""
    totals = []
    for backend in dict.fromkeys(r["backend"] for r in rows):
        mine = [r for r in rows if r["backend"] == backend]
        if any(r["status"] != "ok" for r in mine):
            continue
        peaks = [r["peak_mem_mb"] for r in mine if r.get("peak_mem_mb") is not None]
        totals.append(_row("lora_linear", shape, dtype, backend, **{"pass": "fwd+bwd"}, status="ok",
                           median_ms=sum(r["median_ms"] for r in mine), peak_mem_mb=max(peaks) if peaks else None,
                           note="sum of the projections' medians; peak = largest projection's"))
    _relative_to(totals, "peft")
    return totals


def _mixed_rows(m_rows: int, seq: int, k: int, n: int, r: int, dtype: torch.dtype, device: str,
                backends: list[str], peft_ok: bool, counts: list[int]) -> list[dict]:
    from fastlm import use_backend
    from fastlm.ops.lora_triton import lora_linear_mixed

    tokens = m_rows * seq
    torch.manual_seed(0)
    x = torch.randn(m_rows, seq, k, device=device, dtype=dtype)
    weight = torch.randn(n, k, device=device, dtype=dtype) * k**-0.5
    records = []
    with torch.no_grad():
        base_ms = time_fn(lambda: torch.nn.functional.linear(x, weight), device)["median_ms"]
        for count in counts:
            shape = f"M{tokens} ({m_rows}x{seq}) K{k} N{n} r{r} adapters{count}"
            lora_a = (torch.randn(count, r, k, device=device) * k**-0.5).to(dtype)
            lora_b = (torch.randn(count, n, r, device=device) * 0.01).to(dtype)
            scales = torch.full((count,), 2.0, device=device)
            row_adapter = torch.arange(m_rows, device=device) % count  # every adapter in the batch
            index = row_adapter[:, None].expand(m_rows, seq)
            candidates = []
            for backend in backends:
                def call(backend=backend):
                    with use_backend(backend):
                        return lora_linear_mixed(x, weight, lora_a, lora_b, scales, index)
                candidates.append((backend, call))
            if peft_ok:
                names = [f"a{i}" for i in range(count)]
                layer = _peft_linear(weight, lora_a, lora_b, r, 2.0 * r, names)
                layer.set_adapter(names[0])
                row_names = [names[i] for i in row_adapter.tolist()]
                candidates.append(("peft", lambda layer=layer, row_names=row_names: layer(x, adapter_names=row_names)))
            for backend, fn in candidates:
                try:
                    timing = time_fn(fn, device)
                except Exception as err:  # noqa: BLE001  recorded as an error; the run exits non-zero
                    logger.exception("lora_linear_mixed %s on %s failed", shape, backend)
                    records.append(_row("lora_linear_mixed", shape, dtype, backend, status="error",
                                        note=f"{type(err).__name__}: {err}"))
                    continue
                records.append(_row("lora_linear_mixed", shape, dtype, backend, **{"pass": "fwd"}, status="ok",
                                    adapters=count, **timing, tokens_per_s=tokens / (timing["median_ms"] * 1e-3),
                                    vs_base_linear=timing["median_ms"] / base_ms))
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
    for backend in dict.fromkeys(r["backend"] for r in records):
        single = next((r for r in records if r["backend"] == backend and r.get("adapters") == 1), None)
        for r in records:
            if single is not None and r["backend"] == backend and r["status"] == "ok":
                r["vs_single_adapter"] = r["median_ms"] / single["median_ms"]
    return records


def _peft_available() -> bool:
    try:
        import peft  # noqa: F401
    except ImportError:
        return False
    return True


def run(device: str, quick: bool) -> list[dict]:
    """LoRA benchmarks on ``device`` ("cpu" or "cuda"); ``quick``: fewer shapes."""
    from fastlm import ops

    records: list[dict] = []
    backends = ["reference"]
    ok, why = ops.backend_status("triton", device)
    gpu = device.startswith("cuda")
    if not ok:
        records.append({"op": "lora_*", "backend": "triton", "status": "unavailable", "note": why})
    elif not gpu:
        records.append({"op": "lora_*", "backend": "triton", "status": "skipped",
                        "note": "Triton interpreter: not a performance measurement"})
    else:
        backends.insert(0, "triton")
    peft_ok = _peft_available()
    if not peft_ok:
        records.append({"op": "lora_*", "backend": "peft", "status": "unavailable", "note": "pip install peft"})
    dtype = torch.bfloat16 if gpu else torch.float32
    m, r = (4096, 16) if gpu else (256, 8)
    block = LLAMA_7B_BLOCK if gpu else CPU_BLOCK
    per_proj: list[dict] = []
    for name, k, n in block[:1] if quick and not gpu else block:
        logger.info("lora_linear %s M%d K%d N%d", name, m, k, n)
        per_proj += _linear_rows(name, m, k, n, r, dtype, device, backends, peft_ok)
    records += per_proj
    if len(block) > 1 and not (quick and not gpu):
        records += _block_totals(per_proj, dtype, f"block ({'Llama-7B' if gpu else 'tiny'}) M{m} r{r}")
    counts = [1, 4, 8, 16] if gpu else [1, 4]
    shapes = [(32, 128), (64, 1)] if gpu else [(8, 16)]
    k = n = 4096 if gpu else 128
    for rows, seq in shapes[:1] if quick else shapes:
        logger.info("lora_linear_mixed %dx%d", rows, seq)
        records += _mixed_rows(rows, seq, k, n, r, dtype, device, backends, peft_ok, counts)
    return records
