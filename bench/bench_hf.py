"""fastlm inside a Hugging Face transformers model: one training step, three ways, same run.

Rows, on the same Llama-shaped ``transformers.LlamaForCausalLM`` (random weights):

- ``transformers``: the model as transformers builds it (``attn_implementation="sdpa"``);
- ``attn=fastlm``: only ``model.set_attn_implementation("fastlm")``;
- ``apply(model)``: ``fastlm.integrations.transformers.apply(model)`` (RMSNorm, RoPE, SwiGLU,
  attention and the fused linear cross-entropy that never builds the (N, V) logits);
- ``apply(model, attention=False)``: the same with transformers' SDPA attention kept (on CPU
  fastlm's attention is its plain-PyTorch reference, which materialises the scores).

One step = forward with ``labels`` (loss) + backward, gradients freed after each step.
Throughput in tokens/s and as a ratio to the transformers row; peak memory:

- CUDA: ``torch.cuda.max_memory_allocated`` over one step (weights and gradients included);
- CPU: torch's profiler with ``profile_memory=True`` records every allocation and free of the
  CPU allocator during one step (c10's memory reporting, all threads); the peak of their
  running sum is the step's peak above what was live before it, to which the bytes of the
  parameters (live during the whole step) are added. Timing runs without the profiler.

Sizes: ``cpu`` = 2 layers, hidden 256, vocabulary 32k, 2 x 1024 = 2k tokens per batch, float32
(the issue's CPU target: ``apply(model)`` >= 1.0x the speed and <= 0.7x the peak memory of
transformers); ``gpu`` = Llama-3-8B-shaped layers (hidden 4096, 32 heads / 8 KV heads, MLP
14336, vocabulary 128256), 4 of them by default (``--layers``), bf16 weights, 1 x 4096 tokens.

``python -m bench.bench_hf [--size cpu|gpu] [--device cpu|cuda] [--layers N] [--out DIR]``;
``python -m bench.run`` calls :func:`run` (GPU sizes on CUDA).
"""

from __future__ import annotations

import argparse
import gc
import logging

import torch

from bench.common import time_fn, write_results

logger = logging.getLogger(__name__)

SIZES = {
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                 num_attention_heads=2, num_key_value_heads=1, batch=2, seq=32, dtype=torch.float32),
    "cpu": dict(vocab_size=32000, hidden_size=256, intermediate_size=704, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, batch=2, seq=1024, dtype=torch.float32),
    "gpu": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=4,
                num_attention_heads=32, num_key_value_heads=8, batch=1, seq=4096, dtype=torch.bfloat16),
}
VARIANTS = ("transformers", "attn=fastlm", "apply(model)", "apply(model, attention=False)")


def _model(size: dict, variant: str, device: str):
    import transformers as T

    import fastlm.integrations.transformers as fi

    cfg = T.LlamaConfig(
        vocab_size=size["vocab_size"], hidden_size=size["hidden_size"], intermediate_size=size["intermediate_size"],
        num_hidden_layers=size["num_hidden_layers"], num_attention_heads=size["num_attention_heads"],
        num_key_value_heads=size["num_key_value_heads"], max_position_embeddings=max(8192, size["seq"]),
        rope_theta=500000.0, tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = T.LlamaForCausalLM(cfg).to(size["dtype"])
    model.train()
    if variant == "attn=fastlm":
        fi.register()
        model.set_attn_implementation("fastlm")
    elif variant == "apply(model)":
        fi.apply(model)
    elif variant == "apply(model, attention=False)":
        fi.apply(model, attention=False)
    return model


def cpu_step_peak_bytes(fn) -> int:
    """Peak of the running sum of CPU allocations minus frees during ``fn()`` (torch profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        if e.device_type() == torch.device("cpu").type or str(e.device_type()).endswith("CPU"):
            live += e.nbytes()
            peak = max(peak, live)
    return peak


def _peak_mb(step, model, device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return (weights + cpu_step_peak_bytes(step)) / 2**20


def _step_fn(model, ids):
    params = list(model.parameters())

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        for p in params:
            p.grad = None
        return loss

    return step


def _cpu_interleaved_ms(steps: dict, rep: int) -> dict[str, dict]:
    """Wall-clock ms of each step, the variants interleaved round-robin (a loaded, shared CPU
    drifts over minutes: interleaving gives every variant the same conditions)."""
    import statistics
    import time

    from bench.common import _quantile

    times: dict[str, list[float]] = {name: [] for name in steps}
    for name, step in steps.items():  # warm-up
        step()
    for _ in range(rep):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append((time.perf_counter() - start) * 1e3)
    out = {}
    for name, values in times.items():
        values.sort()
        out[name] = {"median_ms": statistics.median(values), "p20_ms": _quantile(values, 0.2),
                     "p80_ms": _quantile(values, 0.8), "reps": len(values)}
    return out


def measure(size_name: str, device: str, layers: int | None = None, rep: int = 5) -> list[dict]:
    size = dict(SIZES[size_name])
    if layers is not None:
        size["num_hidden_layers"] = layers
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, size["vocab_size"], (size["batch"], size["seq"]), generator=g).to(device)
    tokens = ids.numel()
    common = {"device": device, "size": size_name, "layers": size["num_hidden_layers"], "hidden": size["hidden_size"],
              "vocab": size["vocab_size"], "tokens": tokens, "dtype": str(size["dtype"]).removeprefix("torch.")}
    rows: list[dict] = []
    if device.startswith("cuda"):
        for variant in VARIANTS:  # one model on the device at a time
            row = {"variant": variant, **common}
            model = _model(size, variant, device)
            step = _step_fn(model, ids)
            try:
                timing = time_fn(step, device)
                row.update(timing, status="ok", tokens_per_s=tokens / (timing["median_ms"] / 1e3),
                           peak_mem_mb=_peak_mb(step, model, device))
            except torch.OutOfMemoryError as err:
                row.update(status="out of memory", note=str(err).splitlines()[0])
            rows.append(row)
            del model, step
            gc.collect()
            torch.cuda.empty_cache()
    else:
        models = {variant: _model(size, variant, device) for variant in VARIANTS}
        steps = {variant: _step_fn(model, ids) for variant, model in models.items()}
        timings = _cpu_interleaved_ms(steps, rep)
        for variant in VARIANTS:
            timing = timings[variant]
            rows.append({"variant": variant, **common, **timing, "status": "ok",
                         "tokens_per_s": tokens / (timing["median_ms"] / 1e3),
                         "peak_mem_mb": _peak_mb(steps[variant], models[variant], device)})
    base = rows[0]
    for row in rows:
        if row.get("status") == "ok" and base.get("status") == "ok":
            row["speed_vs_transformers"] = row["tokens_per_s"] / base["tokens_per_s"]
            row["peak_mem_vs_transformers"] = row["peak_mem_mb"] / base["peak_mem_mb"]
    return rows


def run(device: str, quick: bool) -> list[dict]:
    """bench.run entry: the GPU size on CUDA, the CPU size otherwise."""
    return measure("gpu" if device.startswith("cuda") else "cpu", device, rep=3 if quick else 5)


NOTES = """Peak memory on CPU: torch profiler (profile_memory=True) allocation/free records of one step,
peak of their running sum, plus the parameters' bytes. On CUDA: torch.cuda.max_memory_allocated.
Speed and memory ratios are against the transformers row of the same run. CPU timing: the variants
interleaved round-robin (wall clock, after one warm-up step each); CUDA: triton.testing.do_bench."""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default=None, help="default: gpu on cuda, cpu otherwise")
    parser.add_argument("--gpu", action="store_true", help="shorthand for --size gpu --device cuda")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda with --gpu, else cpu)")
    parser.add_argument("--layers", type=int, default=None, help="override the number of decoder layers")
    parser.add_argument("--out", default=None, help="results directory (default bench/results/<device>)")
    args = parser.parse_args(argv)
    device = args.device or ("cuda" if args.gpu else "cpu")
    size = "gpu" if args.gpu else (args.size or ("gpu" if device.startswith("cuda") else "cpu"))
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("bench_hf: --device cuda but CUDA is not available")
    if args.layers is not None and args.layers < 1:
        raise SystemExit(f"bench_hf: --layers must be >= 1, got {args.layers}")
    logging.basicConfig(level=logging.INFO)
    rows = measure(size, device, layers=args.layers)
    out = args.out or f"bench/results/{'cuda' if device.startswith('cuda') else 'cpu'}"
    paths = write_results("bench_hf", rows, out, device=device, notes=NOTES)
    for row in rows:
        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()})
    print("wrote", ", ".join(str(p) for p in paths.values()))


if __name__ == "__main__":
    main()
