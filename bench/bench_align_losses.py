"""Alignment and distillation losses, fused (fastlm.ops.linear_preference_loss /
linear_logprobs / linear_distillation_loss) vs the unfused PyTorch path (full (N, V) logits, log_softmax in
float32) and TRL's helpers on those logits (``selective_log_softmax``, ``entropy_from_logits``,
``GKDTrainer.generalized_jsd_loss``) where TRL is installed: peak memory and time of one
forward + backward (d hidden, d weight) in the same run.

Losses (hidden (N, H), head weight (V, H), N = B·T tokens):
  dpo   sequence log-probs (Σ over a completion mask per sequence of T tokens) of policy
        chosen/rejected halves, DPO sigmoid loss against constant reference log-probs, β = 0.1;
        ``fused``: linear_preference_loss (loss and gradients in the forward, chunked by pairs:
        one pair = 2·T rows per chunk on CPU), ``fused-logprobs``: linear_logprobs (token
        log-probs, the backward recomputes the logits) then the loss in PyTorch
  grpo  token log-probs and entropy: −mean(exp(logp − logp.detach())·A) − 0.01·mean(H)
  kd    distillation: forward-KL at T = 2 (α = 0.5 with the hard-label CE); the teacher has
        H_t = 2·H and is constant

pytest-benchmark module (run it explicitly: ``pytest bench/bench_align_losses.py
--benchmark-json=...``); each case records in ``benchmark.extra_info``: ``peak_mb`` — on CPU,
the peak of the running sum of allocations minus frees reported by torch's profiler
(``profile_memory=True``: every allocation and free event of its event tree, with its size,
summed in time order) over one extra call, i.e. the peak of memory allocated *during* the call
above what existed before it (inputs excluded); on CUDA ``torch.cuda.max_memory_allocated``
over one call minus the memory allocated before it. ``python -m bench.bench_align_losses``
runs the same cases without pytest and writes bench/results/<device>/align_losses.{json,md}.

Sizes: CPU float32, N = 1024, H = 256, V = 32000 and 128256 (fused chunk: 128 rows; TRL rows at V = 32000 only: its per-row
log-softmax at V = 128256 takes minutes on this CPU); CUDA
bfloat16, N = 8192, H = 2048 (the triton backend; default chunk). The Triton interpreter is not
a speed measurement, so CPU rows run the reference backend (chunked plain PyTorch).
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import fastlm
from bench.common import peak_mb
from fastlm import ops

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32
QUICK = os.environ.get("BENCH_ALIGN_QUICK") == "1"  # a seconds-long smoke run (tiny shapes)
N, H = (8192, 2048) if CUDA else (256, 64) if QUICK else (1024, 256)
T = 128  # tokens per sequence (dpo: N / T sequences, half chosen, half rejected)
VOCABS = (4096,) if QUICK else (32000, 128256)
CHUNK = None if CUDA else 32 if QUICK else 128
PAIR_CHUNK = None if CUDA else 1  # linear_preference_loss: pairs per chunk (CPU: 2·T = 256 rows)
TRL_MAX_VOCAB = 10**9 if CUDA else 32000  # on CPU TRL's per-row log-softmax at V = 128k takes minutes
BACKEND = "triton" if CUDA else "reference"
LOSSES = ("dpo", "grpo", "kd")


def _trl():
    try:
        from trl.trainer.utils import entropy_from_logits, selective_log_softmax
    except ImportError:
        return None
    try:
        from trl.experimental.gkd import GKDTrainer
        jsd = GKDTrainer.generalized_jsd_loss
    except ImportError:
        jsd = None
    return selective_log_softmax, entropy_from_logits, jsd


def make_inputs(vocab: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g).to(DEVICE, DTYPE).requires_grad_()
    weight = (torch.randn(vocab, H, generator=g) / math.sqrt(H)).to(DEVICE, DTYPE).requires_grad_()
    tokens = torch.randint(0, vocab, (N,), generator=g).to(DEVICE)
    mask = torch.zeros(N // T, T, dtype=torch.bool)
    mask[:, T // 4:] = True  # completion = last three quarters of each sequence
    teacher_h = torch.randn(N, 2 * H, generator=g).to(DEVICE, DTYPE)
    teacher_w = (torch.randn(vocab, 2 * H, generator=g) / math.sqrt(2 * H)).to(DEVICE, DTYPE)
    return dict(hidden=hidden, weight=weight, tokens=tokens, mask=mask.to(DEVICE), ref=torch.zeros(N // T // 2,
                device=DEVICE) - 50.0, adv=torch.randn(N, generator=g).to(DEVICE), teacher_h=teacher_h,
                teacher_w=teacher_w)


def _dpo_from_token_logps(logp: torch.Tensor, x: dict) -> torch.Tensor:
    seq = (logp.view(-1, T) * x["mask"]).sum(-1)  # (B,)
    chosen, rejected = seq.view(2, -1)
    margin = 0.1 * ((chosen - x["ref"]) - (rejected - x["ref"]))
    return -torch.nn.functional.logsigmoid(margin).mean()


def _grpo_from(logp: torch.Tensor, ent: torch.Tensor, x: dict) -> torch.Tensor:
    return -(torch.exp(logp - logp.detach()) * x["adv"]).mean() - 0.01 * ent.mean()


def _logits(x: dict) -> torch.Tensor:
    z = x["hidden"] @ x["weight"].T
    return z.float()  # as transformers' Llama does before its loss


def loss_fn(loss: str, path: str, x: dict) -> Callable[[], torch.Tensor]:
    """A closure computing the loss (scalar) by ``path`` in {fused, unfused, trl}."""
    tokens = x["tokens"]
    if path == "fused" and loss == "dpo":
        pairs = N // T // 2
        ref = torch.stack((x["ref"], x["ref"]), 1)  # (P, 2) [chosen, rejected]

        def fused_pref():
            with fastlm.use_backend(BACKEND):
                return ops.linear_preference_loss(x["hidden"], x["weight"], tokens.view(-1, T), x["mask"], ref,
                                                  beta=0.1, chunk_size=PAIR_CHUNK, validate=False).loss / pairs
        return fused_pref
    if path in ("fused", "fused-logprobs"):
        def fused():
            with fastlm.use_backend(BACKEND):
                if loss == "kd":
                    return ops.linear_distillation_loss(x["hidden"], x["weight"], x["teacher_h"], x["teacher_w"],
                                                        tokens, temperature=2.0, alpha=0.5, chunk_size=CHUNK)
                out = ops.linear_logprobs(x["hidden"], x["weight"], tokens, return_entropy=loss == "grpo",
                                          chunk_size=CHUNK)
            return _dpo_from_token_logps(out, x) if loss == "dpo" else _grpo_from(*out, x)
        return fused
    if path == "unfused":
        def unfused():
            logp = torch.log_softmax(_logits(x), -1)
            if loss == "kd":
                with torch.no_grad():
                    lt = torch.log_softmax((x["teacher_h"] @ x["teacher_w"].T).float() / 2.0, -1)
                ls = torch.log_softmax(_logits(x) / 2.0, -1)
                kl = (lt.exp() * (lt - ls)).sum(-1)
                ce = -logp.gather(-1, tokens[:, None]).squeeze(-1)
                return (0.5 * 4.0 * kl + 0.5 * ce).mean()
            tok = logp.gather(-1, tokens[:, None]).squeeze(-1)
            if loss == "dpo":
                return _dpo_from_token_logps(tok, x)
            return _grpo_from(tok, -(logp.exp() * logp).sum(-1), x)
        return unfused
    trl = _trl()
    selective, entropy, jsd = trl

    def with_trl():
        logits = _logits(x)
        if loss == "kd":
            with torch.no_grad():
                teacher = (x["teacher_h"] @ x["teacher_w"].T).float()
            # TRL's GKD loss: generalized JSD (β = 0.5 here: TRL has no T²·forward-KL + CE mix)
            return jsd(logits[None], teacher[None], beta=0.5, temperature=2.0)
        tok = selective(logits, tokens)
        if loss == "dpo":
            return _dpo_from_token_logps(tok, x)
        return _grpo_from(tok, entropy(logits), x)
    return with_trl


def step(fn: Callable[[], torch.Tensor], x: dict) -> Callable[[], None]:
    def run():
        x["hidden"].grad = x["weight"].grad = None
        fn().backward()
    return run


def paths(loss: str) -> list[str]:
    return ["fused"] + (["fused-logprobs"] if loss == "dpo" else []) + ["unfused"] + (
        ["trl"] if _trl() is not None else [])


CASES = [(loss, vocab, path) for vocab in VOCABS for loss in LOSSES for path in paths(loss)
         if not (path == "trl" and (vocab > TRL_MAX_VOCAB or (loss == "kd" and _trl()[2] is None)))]


@pytest.mark.parametrize("loss,vocab,path", CASES, ids=lambda v: str(v))
def test_align_loss(benchmark, loss, vocab, path):
    benchmark.group = f"{loss} V={vocab}"
    x = make_inputs(vocab)
    run = step(loss_fn(loss, path, x), x)
    run()  # warm-up
    benchmark.extra_info.update(peak_mb=round(peak_mb(run, DEVICE), 1), loss=loss, vocab=vocab, path=path, n=N, h=H,
                                dtype=str(DTYPE).removeprefix("torch."), device=DEVICE, chunk=CHUNK)
    benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=0)


# ---- without pytest: results table ------------------------------------------------------------


def measure(rounds: int = 1) -> list[dict]:
    rows = []
    for loss, vocab, path in CASES:
        x = make_inputs(vocab)
        run = step(loss_fn(loss, path, x), x)
        peak = peak_mb(run, DEVICE)  # the profiled call doubles as the warm-up
        times = []
        for _ in range(rounds):
            if CUDA:
                torch.cuda.synchronize()
            start = time.perf_counter()
            run()
            if CUDA:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        rows.append(dict(loss=loss, vocab=vocab, path=path, peak_mb=peak, median_ms=sorted(times)[len(times) // 2] * 1e3))
        print(rows[-1], file=sys.stderr)
    for row in rows:
        base = next(r for r in rows if r["loss"] == row["loss"] and r["vocab"] == row["vocab"] and r["path"] == "unfused")
        row["mem_vs_unfused"] = row["peak_mb"] / base["peak_mb"]
        row["speedup_vs_unfused"] = base["median_ms"] / row["median_ms"]
    return rows


def write(rows: list[dict], out: Path) -> None:
    meta = dict(device=torch.cuda.get_device_name() if CUDA else platform.processor() or platform.machine(),
                torch=torch.__version__, threads=torch.get_num_threads(), n=N, h=H, t=T,
                dtype=str(DTYPE).removeprefix("torch."), chunk=CHUNK, pair_chunk=PAIR_CHUNK, backend=BACKEND)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "align_losses.json.tmp"
    tmp.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    tmp.replace(out / "align_losses.json")
    lines = [
        "# Alignment / distillation losses: fused vs unfused (forward + backward)",
        "",
        ", ".join(f"{k}={v}" for k, v in meta.items()),
        "",
        "Peak memory: allocated during one forward+backward above what existed before (inputs excluded); "
        + ("torch.cuda.max_memory_allocated." if CUDA else
           "CPU: torch.profiler(profile_memory=True), running sum of allocations and frees."),
        "",
        "| loss | V | path | peak MiB | median ms | mem / unfused | speed-up vs unfused |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(f"| {r['loss']} | {r['vocab']} | {r['path']} | {r['peak_mb']:.1f} | {r['median_ms']:.1f} | "
                     f"{r['mem_vs_unfused']:.2f} | {r['speedup_vs_unfused']:.2f} |")
    tmp = out / "align_losses.md.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(out / "align_losses.md")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Run the cases without pytest; write bench/results/<device>/"
                                                 "align_losses.{json,md}.")
    parser.add_argument("--rounds", type=int, default=1, help="timed calls per row after the profiled one "
                        "(median) (default: %(default)s)")
    write(measure(parser.parse_args().rounds), Path(__file__).resolve().parent / "results" / ("gpu" if CUDA else "cpu"))
