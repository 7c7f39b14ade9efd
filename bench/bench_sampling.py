"""Sampling latency: fastlm.ops.sample on every backend vs PyTorch's sort-based top-k/top-p and vs
plain torch.multinomial, all in the same run.

Per (batch, vocabulary) and setting, one row per fastlm backend (``reference``, ``triton``,
``cuda``) and per PyTorch baseline:

- ``torch.sort``: the usual sort-based filter (vLLM / transformers style): logits / T, sort the
  row, mask below the k-th value, softmax + cumsum on the sorted row to mask the top-p tail,
  scatter back, softmax, ``torch.multinomial``;
- ``torch.multinomial``: softmax(logits / T) and ``torch.multinomial`` with no filter, the floor
  a filtered sampler is compared with.

Settings: ``T0.8 k50 p0.9`` (the filters) and ``T1`` (no filter). Each row carries median /
p20 / p80 ms, GB/s (the logits read once), ``speedup_vs_sort`` and ``speedup_vs_multinomial``
(baseline median / this median). On CUDA one more record times a decode step of the llama-1b
preset (bfloat16, batch 64, 128 cached tokens) and each 64 x 128256 sampling row gets
``share_of_decode_step`` = its median / (decode step median + its median).

CPU shapes are tiny (a smoke run of the harness, not a performance claim); the Triton
interpreter is never timed.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable

import torch

from bench.common import peak_memory_mb, time_fn

logger = logging.getLogger(__name__)

BACKENDS = ("reference", "triton", "cuda")
SETTINGS = (("T0.8 k50 p0.9", dict(temperature=0.8, top_k=50, top_p=0.9)), ("T1", dict(temperature=1.0)))
DECODE_SHAPE = (64, 128256)


def _shapes(device: str, quick: bool) -> list[tuple[int, int]]:
    if device == "cuda":
        if quick:
            return [DECODE_SHAPE]
        return [(b, v) for v in (32000, 128256, 256000) for b in (1, 16, 64, 256)]
    return [(4, 32000)] if quick else [(1, 32000), (16, 32000)]


def torch_sort_sample(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
                      generator: torch.Generator | None) -> torch.Tensor:
    """The sort-based PyTorch sampler: temperature, top-k, top-p, multinomial. logits (B, V) -> (B,)."""
    logits = logits / temperature
    sorted_logits, order = logits.sort(dim=-1, descending=False)
    if top_k is not None:
        kth = sorted_logits[:, -top_k].unsqueeze(-1)
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
    if top_p is not None:
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        tail = cumulative <= 1 - top_p
        tail[:, -1] = False  # the most likely token stays
        sorted_logits = sorted_logits.masked_fill(tail, float("-inf"))
    logits = sorted_logits.scatter(-1, order, sorted_logits)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


def torch_multinomial(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    """Plain softmax + multinomial (no filter). logits (B, V) -> (B,)."""
    return torch.multinomial((logits / temperature).softmax(dim=-1), 1, generator=generator).squeeze(-1)


def _usable_backends(device: str, records: list[dict]) -> list[str]:
    from fastlm import ops

    usable = []
    for name in BACKENDS:
        ok, why = ops.backend_status(name, device)
        if not ok:
            records.append({"op": "sample", "backend": name, "status": "unavailable", "note": why})
        elif name == "triton" and device == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
            records.append({"op": "sample", "backend": name, "status": "skipped",
                            "note": "Triton interpreter: not a performance measurement"})
        else:
            usable.append(name)
    return usable


def _measure(row: dict, fn: Callable[[], torch.Tensor], device: str, backend: str | None = None) -> dict:
    import fastlm

    try:
        with fastlm.use_backend(backend) if backend else contextlib.nullcontext():
            fn()  # warm-up: kernel compilation / extension build
            timing = time_fn(fn, device)
            timing["peak_mem_mb"] = peak_memory_mb(fn, device)
    except NotImplementedError:
        return {**row, "status": "not implemented"}
    except Exception as err:  # noqa: BLE001  recorded as an error; the run exits non-zero
        logger.exception("sample %s on %s failed", row["shape"], row["backend"])
        return {**row, "status": "error", "note": f"{type(err).__name__}: {err}"}
    return {**row, "status": "ok", **timing}


def _decode_step_ms(device: str) -> float | None:
    """Median ms of one decode step of llama-1b (bfloat16, batch 64, 128 cached tokens), CUDA only."""
    if device != "cuda":
        return None
    import fastlm

    torch.manual_seed(0)
    config = fastlm.preset("llama-1b")
    model = fastlm.Model(config).to(device=device, dtype=torch.bfloat16).eval()
    batch, prompt_len = DECODE_SHAPE[0], 128
    cache = model.new_cache(batch, prompt_len + 8)
    with torch.no_grad():
        model(torch.randint(0, config.vocab_size, (batch, prompt_len), device=device), cache=cache)
    lens = cache.lens.clone()
    ids = torch.randint(0, config.vocab_size, (batch, 1), device=device)

    def step():
        with torch.no_grad():
            model(ids, cache=cache)
        cache.truncate(lens, prompt_len)

    return time_fn(step, device)["median_ms"]  # the model is freed on return


def run(device: str, quick: bool) -> list[dict]:
    """Benchmark sampling on ``device`` ("cpu" or "cuda"); ``quick`` keeps one shape."""
    from fastlm import ops

    records: list[dict] = []
    backends = _usable_backends(device, records)
    decode_ms = _decode_step_ms(device)
    if device == "cuda":
        torch.cuda.empty_cache()
    if decode_ms is not None:
        records.append({"op": "decode_step", "shape": f"llama-1b B{DECODE_SHAPE[0]} ctx128", "dtype": "bfloat16",
                        "backend": "fastlm", "status": "ok", "median_ms": decode_ms})
    for batch, vocab in _shapes(device, quick):
        torch.manual_seed(0)
        logits = torch.randn(batch, vocab, device=device) * 3
        generator = torch.Generator(device).manual_seed(0)
        for label, kwargs in SETTINGS[:1] if quick else SETTINGS:
            base = {"op": "sample", "shape": f"B{batch} V{vocab}", "dtype": "float32", "setting": label}
            rows = [_measure({**base, "backend": b}, lambda kw=kwargs: ops.sample(logits, generator=generator, **kw),
                             device, b) for b in backends]
            t, k, p = kwargs["temperature"], kwargs.get("top_k"), kwargs.get("top_p")
            rows.append(_measure({**base, "backend": "torch.sort"},
                                 lambda: torch_sort_sample(logits, t, k, p, generator), device))
            rows.append(_measure({**base, "backend": "torch.multinomial"},
                                 lambda: torch_multinomial(logits, t, generator), device))
            ms = {r["backend"]: r["median_ms"] for r in rows if r["status"] == "ok"}
            for r in rows:
                if r["status"] != "ok":
                    continue
                r["gbps"] = logits.numel() * logits.element_size() / (r["median_ms"] * 1e-3) / 1e9
                if "torch.sort" in ms:
                    r["speedup_vs_sort"] = ms["torch.sort"] / r["median_ms"]
                if "torch.multinomial" in ms:
                    r["speedup_vs_multinomial"] = ms["torch.multinomial"] / r["median_ms"]
                if decode_ms is not None and (batch, vocab) == DECODE_SHAPE:
                    r["share_of_decode_step"] = r["median_ms"] / (decode_ms + r["median_ms"])
            records.extend(rows)
        if device == "cuda":
            torch.cuda.empty_cache()
    return records
