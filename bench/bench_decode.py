"""Decoding throughput: fastlm.generate vs transformers' generate on the same weights, same run.

Rows: tokens/s (batch · new tokens / wall time of a greedy generate call) and, for fastlm, the
achieved memory bandwidth — (weight bytes + KV-cache bytes read per step) / step time — as a
share of the device's measured copy bandwidth (a large device-to-device copy in the same run).
"""

from __future__ import annotations

import tempfile

import torch

from bench.common import peak_memory_mb, wall_seconds


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


def run(device: str, quick: bool) -> list[dict]:
    import fastlm

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    bandwidth = _copy_bandwidth(device)
    records = []
    for preset_name, batch, prompt_len, new in _cases(device, quick):
        torch.manual_seed(0)
        config = fastlm.preset(preset_name)
        model = fastlm.Model(config).to(device=device, dtype=dtype).eval()
        prompt = torch.randint(0, config.vocab_size, (batch, prompt_len), device=device)
        shape = {"model": preset_name, "batch": batch, "prompt": prompt_len, "new_tokens": new}
        seconds = wall_seconds(lambda: fastlm.generate(model, prompt, max_new_tokens=new), device)
        row = {"impl": "fastlm", **shape, "status": "ok", "tokens_per_s": batch * new / seconds,
               "peak_mem_mb": peak_memory_mb(lambda: fastlm.generate(model, prompt, max_new_tokens=8), device)}
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        kv_bytes = 2 * config.num_layers * batch * config.num_kv_heads * config.head_dim * (prompt_len + new / 2) * \
            torch.finfo(dtype).bits // 8
        if bandwidth is not None:
            row["bandwidth_share"] = (weight_bytes + kv_bytes) / (seconds / new) / bandwidth
        records.append(row)
        try:
            import transformers
        except ImportError:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            hf = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype).to(device).eval()
        mask = torch.ones_like(prompt)

        def hf_generate():
            return hf.generate(prompt, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                               pad_token_id=0)

        with torch.no_grad():
            seconds = wall_seconds(hf_generate, device)
        records.append({"impl": "transformers", **shape, "status": "ok", "tokens_per_s": batch * new / seconds})
        del hf, model
    base = {(r["model"], r["batch"]): r["tokens_per_s"] for r in records if r["impl"] == "transformers"}
    for r in records:
        if (r["model"], r["batch"]) in base:
            r["speedup_vs_transformers"] = r["tokens_per_s"] / base[(r["model"], r["batch"])]
    return records
