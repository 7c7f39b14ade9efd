"""Accuracy and memory of quantized models: perplexity in bf16 vs int8 weight-only vs W8A8.

``accuracy_report`` copies the model once per variant (the original is left untouched), so
every variant starts from the same weights, and evaluates each on the same held-out tokens with
fastlm.eval.perplexity. The issue's goals: int8 weight-only within 1% of the bf16 perplexity,
W8A8 within 3%. The relative difference of a variant is

    delta_pct = 100 · (ppl_variant − ppl_baseline) / ppl_baseline

with the baseline the model cast to ``dtype`` (bf16 by default); the quantized variants are made
from that cast model, and "fp32" (the model in float32, for reference) is compared with it too.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from fastlm.eval.perplexity import perplexity
from fastlm.quant.quantize import quantize

VARIANTS = ("fp32", "bf16", "int8_weight_only", "w8a8", "w8a8_smoothquant")
#: Largest |delta_pct| the issue accepts per variant (None: no goal, a reference row).
GOALS_PCT = {"fp32": None, "bf16": None, "int8_weight_only": 1.0, "w8a8": 3.0, "w8a8_smoothquant": 3.0}


def model_bytes(model: nn.Module) -> int:
    """Bytes of the parameters and buffers of ``model`` (shared tensors counted once)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()) if t.device.type != "meta" else (id(t), 0)
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


def accuracy_report(
    model: nn.Module,
    tokens: torch.Tensor,
    *,
    seq_len: int,
    batch_size: int = 8,
    max_batches: int | None = None,
    dtype: torch.dtype = torch.bfloat16,
    group_size: int | None = None,
    include_head: bool = False,
    calibration: torch.Tensor | None = None,
    smooth_alpha: float = 0.5,
    variants: Sequence[str] = ("bf16", "int8_weight_only", "w8a8"),
) -> list[dict]:
    """Perplexity on ``tokens`` (1-D held-out stream) of the model in ``dtype`` and quantized.

    variants: any of "bf16" (the model in ``dtype``: the baseline, always evaluated), "fp32"
    (the model in float32: a reference row), "int8_weight_only" (with ``group_size``),
    "w8a8", "w8a8_smoothquant" (needs ``calibration`` token ids (B, T), taken from training
    text rather than ``tokens``; ``smooth_alpha`` = α). ``include_head`` also quantizes the
    output head. Rows, in the order of ``variants``: variant, dtype, group_size (weight-only),
    include_head, smooth_alpha (SmoothQuant), perplexity, delta_pct vs the baseline, weight_mb,
    goal_pct (1 / 3; None for the float rows) and within_goal. Quantized variants are made from
    the model in ``dtype``.
    """
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"accuracy_report: unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    if "w8a8_smoothquant" in variants and calibration is None:
        raise ValueError("accuracy_report: 'w8a8_smoothquant' needs calibration token ids (B, T)")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"accuracy_report: dtype must be a floating-point torch.dtype, got {dtype!r}")
    base = copy.deepcopy(model).to(dtype).eval()

    def build(variant: str) -> nn.Module:
        if variant == "bf16":
            return base
        if variant == "fp32":
            return copy.deepcopy(model).to(torch.float32).eval()
        if variant == "int8_weight_only":
            return quantize(copy.deepcopy(base), "int8_weight_only", group_size=group_size, include_head=include_head)
        smooth = calibration if variant == "w8a8_smoothquant" else None
        return quantize(copy.deepcopy(base), "w8a8", calibration=smooth, smooth_alpha=smooth_alpha,
                        include_head=include_head)

    def evaluate(m: nn.Module) -> float:
        return perplexity(m, tokens, seq_len=seq_len, batch_size=batch_size, max_batches=max_batches)

    baseline = evaluate(base)
    rows = []
    for variant in dict.fromkeys(variants):  # unique, in the given order
        m = build(variant)
        ppl = baseline if variant == "bf16" else evaluate(m)
        delta = 100.0 * (ppl - baseline) / baseline
        goal = GOALS_PCT[variant]
        quantized = variant not in ("bf16", "fp32")
        rows.append({
            "variant": {"bf16": str(dtype).removeprefix("torch."), "fp32": "float32"}.get(variant, variant),
            "dtype": "float32" if variant == "fp32" else str(dtype).removeprefix("torch."),
            "group_size": group_size if variant == "int8_weight_only" else None,
            "include_head": include_head if quantized else None,
            "smooth_alpha": smooth_alpha if variant == "w8a8_smoothquant" else None,
            "perplexity": ppl,
            "delta_pct": delta,
            "weight_mb": model_bytes(m) / 2**20,
            "goal_pct": goal,
            "within_goal": None if goal is None else abs(delta) <= goal,
        })
    return rows
