"""Decoding throughput: fastlm.generate vs transformers' generate on the same weights, same run.

Rows: tokens/s (batch · new tokens / wall time of a greedy generate call, prefill included) for
fastlm eager, fastlm with the compiled decode step (``compile=True``; its one-time compilation
is reported as ``compile_s``, not timed), transformers' default generate and, on CUDA,
transformers with its static cache (which it compiles). The implementations are timed in turns
(each repetition runs every one once): tokens/s from the median time, and the speed-up as the
median of the per-repetition ratios, so that a machine whose speed drifts slows them alike. For fastlm, the achieved memory bandwidth — (weight bytes + KV-cache bytes read per
step) / step time — as a share of the device's measured copy bandwidth (a large
device-to-device copy in the same run).
"""

from __future__ import annotations

import statistics
import tempfile
import time

import torch

from bench.common import peak_memory_mb, timed_call


def _cases(device: str, quick: bool):
    """(preset, batch, prompt_len, new_tokens)."""
    if device == "cuda":
        cases = [("llama-1b", 1, 128, 256), ("llama-1b", 8, 128, 256), ("llama-1b", 64, 128, 128),
                 ("llama-7b", 1, 128, 256), ("llama-7b", 8, 128, 256)]
    else:
        cases = [("tiny", 1, 32, 64), ("tiny", 8, 32, 64)]
    return cases[:1] if quick else cases


def _copy_bandwidth(device: str) -> float | None:
    """Measured device copy bandwidth in bytes/s (read + write), CUDA only."""
    if device != "cuda":
        return None
    from triton.testing import do_bench

    x = torch.empty(1 << 28, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    ms = do_bench(lambda: y.copy_(x))
    return 2 * x.numel() / (ms / 1e3)


def _interleaved_seconds(impls: dict, device: str, reps: int) -> dict[str, list[float]]:
    """Wall seconds of each callable per repetition, timed in turns after one warm-up call each."""
    for fn in impls.values():
        fn()
    times = {name: [] for name in impls}
    for _ in range(reps):
        for name, fn in impls.items():
            times[name].append(timed_call(fn, device))
    return times


def _transformers_impls(model, prompt, new: int, device: str, dtype) -> dict:
    try:
        import transformers
    except ImportError:
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype).to(device).eval()
    mask = torch.ones_like(prompt)
    common = dict(attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)

    @torch.no_grad()
    def default():
        return hf.generate(prompt, **common)

    impls = {"transformers": default}
    if device == "cuda":  # its static cache, which transformers compiles on its own
        @torch.no_grad()
        def static():
            return hf.generate(prompt, cache_implementation="static", **common)

        impls["transformers-static"] = static
    return impls


def _run_case(preset_name: str, batch: int, prompt_len: int, new: int, device: str, dtype, reps: int,
              bandwidth: float | None) -> list[dict]:
    import fastlm

    torch.manual_seed(0)
    config = fastlm.preset(preset_name)
    model = fastlm.Model(config).to(device=device, dtype=dtype).eval()
    prompt = torch.randint(0, config.vocab_size, (batch, prompt_len), device=device)
    shape = {"model": preset_name, "batch": batch, "prompt": prompt_len, "new_tokens": new}
    start = time.perf_counter()
    fastlm.generate(model, prompt, max_new_tokens=new, compile=True)  # compiles the decode step
    compile_s = time.perf_counter() - start
    impls = {
        "fastlm": lambda: fastlm.generate(model, prompt, max_new_tokens=new),
        "fastlm-compiled": lambda: fastlm.generate(model, prompt, max_new_tokens=new, compile=True),
        **_transformers_impls(model, prompt, new, device, dtype),
    }
    times = _interleaved_seconds(impls, device, reps)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    kv_bytes = 2 * config.num_layers * batch * config.num_kv_heads * config.head_dim * (prompt_len + new / 2) * \
        torch.finfo(dtype).bits // 8
    base = times.get("transformers")
    records = []
    for name, runs in times.items():
        seconds = statistics.median(runs)
        row = {"impl": name, **shape, "status": "ok", "tokens_per_s": batch * new / seconds}
        if base is not None:  # the median of the per-repetition ratios: robust to drifting machine speed
            row["speedup_vs_transformers"] = statistics.median(b / t for b, t in zip(base, runs))
        if name.startswith("fastlm"):
            row["peak_mem_mb"] = peak_memory_mb(lambda: fastlm.generate(model, prompt, max_new_tokens=8), device)
            if bandwidth is not None:
                row["bandwidth_share"] = (weight_bytes + kv_bytes) / (seconds / new) / bandwidth
        if name == "fastlm-compiled":
            row["compile_s"] = compile_s
        records.append(row)
    return records


def run(device: str, quick: bool) -> list[dict]:
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    bandwidth = _copy_bandwidth(device)
    reps = 3 if quick else 9
    records = []
    for case in _cases(device, quick):  # one model in memory at a time
        records += _run_case(*case, device, dtype, reps, bandwidth)
    return records
