"""Training throughput: fastlm vs the same model in transformers, same weights, same run.

One training step = forward, next-token loss, backward, AdamW update (bf16 autocast on CUDA,
fp32 on CPU). Rows: tokens/s, MFU on known GPUs (6·N + attention FLOPs per token, as
fastlm.train.trainer.flops_per_token), peak memory; for fastlm both the plain loss
(logits + cross-entropy) and the fused linear + cross-entropy (when the op exists), whose
point is the peak memory at large vocabularies (Llama-3's 128k).
"""

from __future__ import annotations

import contextlib
import logging
import tempfile

import torch

from bench.common import peak_memory_mb, time_fn

logger = logging.getLogger(__name__)


def _cases(device: str, quick: bool) -> list[tuple[str, dict, int, int]]:
    """(preset, overrides, batch, seq_len)."""
    if device == "cuda":
        cases = [("gpt2", {}, 8, 1024), ("llama-1b", {}, 2, 2048)]
    else:
        cases = [("tiny", {}, 4, 64), ("tiny-gpt2", {}, 4, 64)]
    return cases[:1] if quick else cases


def _step_fn(forward_loss, params, device: str):
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=device == "cuda" or None)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else contextlib.nullcontext()

    def step():
        with autocast:
            loss = forward_loss()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def _measure(name: str, step, tokens: int, flops: float, device: str, **fields) -> dict:
    from fastlm.train.trainer import peak_flops

    row = {"model": name, **fields}
    try:
        timing = time_fn(step, device, rep=10, budget_s=5.0)
        row.update(timing, status="ok", tokens_per_s=tokens / (timing["median_ms"] / 1e3),
                   peak_mem_mb=peak_memory_mb(step, device))
        peak = peak_flops(torch.device(device))
        if peak is not None:
            row["mfu"] = row["tokens_per_s"] * flops / peak
    except torch.OutOfMemoryError as err:
        row.update(status="out of memory", note=str(err).splitlines()[0])
    return row


def _hf_copy(model, device: str):
    """The same weights as a transformers model (through a saved checkpoint), or None."""
    try:
        import transformers
    except ImportError:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        return transformers.AutoModelForCausalLM.from_pretrained(tmp).to(device).train()


def run(device: str, quick: bool) -> list[dict]:
    import fastlm
    from fastlm import ops
    from fastlm.train.trainer import flops_per_token

    records = []
    for preset_name, overrides, batch, seq_len in _cases(device, quick):
        torch.manual_seed(0)
        model = fastlm.Model(fastlm.preset(preset_name, **overrides)).to(device).train()
        ids = torch.randint(0, model.config.vocab_size, (batch, seq_len + 1), device=device)
        inputs, targets = ids[:, :-1], ids[:, 1:].flatten()
        tokens, flops = batch * seq_len, flops_per_token(model, seq_len)
        shape = {"batch": batch, "seq_len": seq_len, "params_m": round(model.num_parameters() / 1e6, 1)}

        def fastlm_loss():
            return ops.cross_entropy(model(inputs).flatten(0, 1), targets)

        records.append(_measure(preset_name, _step_fn(fastlm_loss, model.parameters(), device), tokens, flops,
                                device, impl="fastlm", loss="logits + cross_entropy", **shape))
        if hasattr(ops, "fused_linear_cross_entropy"):
            def fused_loss():
                hidden = model(inputs, return_hidden=True).flatten(0, 1)
                return ops.fused_linear_cross_entropy(hidden, model.lm_head.weight.to(hidden.dtype), targets)

            records.append(_measure(preset_name, _step_fn(fused_loss, model.parameters(), device), tokens, flops,
                                    device, impl="fastlm", loss="fused linear + cross_entropy", **shape))
        hf = _hf_copy(model, device)
        if hf is not None:
            def hf_loss():
                logits = hf(inputs).logits
                return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets)

            records.append(_measure(preset_name, _step_fn(hf_loss, hf.parameters(), device), tokens, flops,
                                    device, impl="transformers", loss="logits + F.cross_entropy", **shape))
        del model, hf
        if device == "cuda":
            torch.cuda.empty_cache()
    base = {r["model"]: r for r in records if r.get("impl") == "transformers" and r.get("status") == "ok"}
    for r in records:
        if r.get("status") == "ok" and r["model"] in base:
            r["speedup_vs_transformers"] = r["tokens_per_s"] / base[r["model"]]["tokens_per_s"]
    return records
