"""Held-out perplexity of a trained model in fp32, bf16, int8 weight-only and W8A8 (issue #7).

    python -m bench.quant_accuracy --model runs/demo/checkpoints/step-00000300 --out bench/results/cpu

``--model`` is a checkpoint folder written by ``fastlm pretrain`` / ``fastlm demo`` (config.json,
safetensors, tokenizer). The held-out text is the validation split of that run: the same documents
``pretrain`` set aside (:func:`fastlm.train.pretrain_texts` with ``--data`` / ``--max-bytes`` /
``--val-fraction`` and the run's seed, read from trainer_state.pt), so the model never trained on
them. SmoothQuant calibrates on windows of the *training* split. Every row comes from
:func:`fastlm.quant.accuracy_report` (baseline: the model cast to bf16; quantized variants are made
from that bf16 model); the goals are int8 weight-only within 1% of bf16 and W8A8 within 3%.

Writes ``<out>/quant_accuracy.json`` (env, meta: model, data, settings; records) and ``.md``. Not
part of ``python -m bench.run`` (it needs a trained checkpoint, and evaluates a dozen models).
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
import sys
import time
from pathlib import Path

import torch

from bench.common import environment, write_results

logger = logging.getLogger("bench.quant_accuracy")

NAME = "quant_accuracy"


def default_group_size(model: torch.nn.Module, cap: int = 128) -> int:
    """The largest power of two <= ``cap`` dividing the in_features of every linear layer but the
    head (the layers int8 weight-only quantizes): group-wise scales need it to divide each one."""
    g = 0
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and "lm_head" not in name.split("."):
            g = math.gcd(g, m.in_features)
    size = 1
    while size * 2 <= cap and g % (size * 2) == 0:
        size *= 2
    return size


def calibration_windows(tokens: torch.Tensor, num: int, seq_len: int) -> torch.Tensor:
    """``num`` windows of ``seq_len`` tokens spread evenly over the stream: (num, seq_len)."""
    if tokens.numel() < seq_len:
        raise ValueError(f"calibration needs at least seq_len={seq_len} tokens, got {tokens.numel()}")
    starts = torch.linspace(0, tokens.numel() - seq_len, num).long()
    return torch.stack([tokens[s: s + seq_len] for s in starts.tolist()])


def run_checks(model, heldout: torch.Tensor, calibration: torch.Tensor, *, seq_len: int, batch_size: int,
               max_batches: int | None, group_sizes: list[int], smooth_alphas: list[float],
               include_head: bool) -> list[dict]:
    """All report rows: fp32 / bf16 / per-channel weight-only / W8A8 with and without SmoothQuant,
    then group-wise weight-only, other SmoothQuant α, and (``include_head``) the head quantized."""
    from fastlm.quant import accuracy_report

    common = dict(seq_len=seq_len, batch_size=batch_size, max_batches=max_batches, calibration=calibration)
    alpha, *more_alphas = smooth_alphas
    rows = accuracy_report(model, heldout, smooth_alpha=alpha, **common,
                           variants=("fp32", "bf16", "int8_weight_only", "w8a8", "w8a8_smoothquant"))
    for g in group_sizes:
        rows += accuracy_report(model, heldout, group_size=g, variants=("int8_weight_only",), **common)
    for a in more_alphas:
        rows += accuracy_report(model, heldout, smooth_alpha=a, variants=("w8a8_smoothquant",), **common)
    if include_head:
        rows += accuracy_report(model, heldout, include_head=True, smooth_alpha=alpha, **common,
                                variants=("int8_weight_only", "w8a8", "w8a8_smoothquant"))
        for g in group_sizes:
            rows += accuracy_report(model, heldout, group_size=g, include_head=True,
                                    variants=("int8_weight_only",), **common)
    return rows


def summary(rows: list[dict]) -> str:
    """Markdown lines: per goal, the worst row and whether every row meets it."""
    lines = ["Goals (issue #7): |delta_pct| vs the bf16 perplexity, int8 weight-only <= 1%, W8A8 <= 3%.", ""]
    for label, names in (("int8 weight-only", ("int8_weight_only",)), ("W8A8", ("w8a8", "w8a8_smoothquant"))):
        sel = [r for r in rows if r["variant"] in names]
        if not sel:
            continue
        met = [r for r in sel if r["within_goal"]]
        worst = max(sel, key=lambda r: abs(r["delta_pct"]))
        best = min(sel, key=lambda r: abs(r["delta_pct"]))
        lines.append(f"- {label}: {len(met)}/{len(sel)} configurations within {sel[0]['goal_pct']:g}%; "
                     f"best {best['delta_pct']:+.3f}% ({_describe(best)}), worst {worst['delta_pct']:+.3f}% "
                     f"({_describe(worst)})")
    return "\n".join(lines) + "\n"


def _describe(row: dict) -> str:
    parts = [row["variant"]]
    if row.get("group_size"):
        parts.append(f"group {row['group_size']}")
    if row.get("smooth_alpha") is not None:
        parts.append(f"alpha {row['smooth_alpha']:g}")
    if row.get("include_head"):
        parts.append("head quantized")
    return ", ".join(parts)


def activation_outliers(model: torch.nn.Module, calibration: torch.Tensor) -> dict:
    """How far the largest input channel of each linear layer stands out: max_j a_j / median_j a_j
    with a_j = max |x[:, j]| over the calibration tokens (the statistic SmoothQuant acts on; large
    LLMs reach ratios of 100 and more). The largest ratio, its layer, and the median over layers."""
    from fastlm.quant import activation_maxima

    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    maxima = activation_maxima(model, calibration, names)
    ratios = {n: float(a.max() / a.median().clamp_min(1e-12)) for n, a in maxima.items()}
    worst = max(ratios, key=ratios.get)
    return {"max": round(ratios[worst], 2), "layer": worst,
            "median_over_layers": round(statistics.median(ratios.values()), 2)}


def _training_run(model_dir: Path) -> tuple[int | None, str | None]:
    """The seed and a one-line summary of the run that wrote the checkpoint (trainer_state.pt)."""
    from fastlm.train.checkpoint import STATE_FILE, load_trainer_state

    if not (model_dir / STATE_FILE).is_file():
        return None, None
    state = load_trainer_state(model_dir)
    cfg = state.get("config", {})
    keys = ("max_steps", "batch_size", "grad_accum", "lr", "schedule", "warmup_steps", "precision", "seed")
    return cfg.get("seed"), f"step {state.get('step')}; " + ", ".join(f"{k}={cfg[k]}" for k in keys if k in cfg)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.quant_accuracy", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, type=Path, help="checkpoint folder (with its tokenizer)")
    parser.add_argument("--data", nargs="+", metavar="PATH",
                        help="the training run's --data (default: the built-in stdlib corpus)")
    parser.add_argument("--max-bytes", type=int, default=3_000_000, help="size of the default corpus (demo: 3e6)")
    parser.add_argument("--val-fraction", type=float, default=0.05, help="the run's --val-fraction")
    parser.add_argument("--seed", type=int, default=None, help="the run's seed (default: from trainer_state.pt)")
    parser.add_argument("--seq-len", type=int, default=128, help="evaluation window (demo trains at 128)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-batches", type=int, default=None, help="bound the held-out work (default: all)")
    parser.add_argument("--group-sizes", type=int, nargs="*", default=None,
                        help="group-wise weight-only rows (default: largest power of two <= 128 dividing all layers)")
    parser.add_argument("--smooth-alphas", type=float, nargs="+", default=[0.5],
                        help="SmoothQuant α values (the first is used for the main rows)")
    parser.add_argument("--calibration-windows", type=int, default=16, help="SmoothQuant windows of --seq-len tokens")
    parser.add_argument("--no-head", dest="include_head", action="store_false",
                        help="skip the rows with the output head quantized")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=Path("bench/results/cpu"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)

    from fastlm import from_pretrained, load_tokenizer
    from fastlm.data.dataset import tokenize_stream
    from fastlm.train import pretrain_texts

    start = time.perf_counter()
    run_seed, run_summary = _training_run(args.model)
    seed = args.seed if args.seed is not None else run_seed
    if seed is None:
        parser.error(f"{args.model} has no trainer_state.pt to read the run's seed from: pass --seed")
    model = from_pretrained(args.model, dtype=torch.float32).eval()
    tokenizer = load_tokenizer(args.model)
    train_texts, val_texts = pretrain_texts(args.data, max_corpus_bytes=args.max_bytes,
                                            val_fraction=args.val_fraction, seed=seed)
    heldout = tokenize_stream(val_texts, tokenizer)
    calibration = calibration_windows(tokenize_stream(train_texts, tokenizer), args.calibration_windows, args.seq_len)
    group_sizes = args.group_sizes if args.group_sizes is not None else [default_group_size(model)]
    windows = (heldout.numel() - 1) // args.seq_len
    if args.max_batches is not None:
        windows = min(windows, args.max_batches * args.batch_size)
    logger.info("held-out: %d documents, %d tokens, %d windows of %d", len(val_texts), heldout.numel(), windows,
                args.seq_len)

    rows = run_checks(model, heldout, calibration, seq_len=args.seq_len, batch_size=args.batch_size,
                      max_batches=args.max_batches, group_sizes=group_sizes, smooth_alphas=args.smooth_alphas,
                      include_head=args.include_head)
    cfg = model.config
    meta = {
        "model": str(args.model),
        "model_config": (f"{cfg.arch}, hidden {cfg.hidden_size}, {cfg.num_layers} layers, {cfg.num_heads} heads "
                         f"({cfg.num_kv_heads} kv), intermediate {cfg.intermediate_size}, vocab {cfg.vocab_size}, "
                         f"tied embeddings {cfg.tie_word_embeddings}"),
        "parameters": model.num_parameters(),
        "training": run_summary,
        "data": ", ".join(args.data) if args.data else f"Python {sys.version.split()[0]} stdlib sources "
                                                         f"(max_bytes={args.max_bytes})",
        "split": f"pretrain_texts(val_fraction={args.val_fraction}, seed={seed}): "
                 f"{len(train_texts)} train / {len(val_texts)} held-out documents",
        "heldout_tokens": heldout.numel(),
        "evaluated_tokens": windows * args.seq_len,
        "seq_len": args.seq_len,
        "calibration": f"{calibration.shape[0]} windows x {calibration.shape[1]} tokens of the training split",
        "activation_outliers": activation_outliers(model, calibration),
        "baseline": "the model cast to bfloat16; quantized variants are made from it",
        "seconds": round(time.perf_counter() - start, 1),
    }
    paths = write_results(NAME, rows, args.out, device="cpu", env=environment("cpu"), meta=meta,
                          notes=summary(rows))
    print(summary(rows))
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
