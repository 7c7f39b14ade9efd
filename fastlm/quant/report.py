"""Accuracy and memory of quantized models: perplexity in bf16 vs int8 weight-only vs W8A8.

``accuracy_report`` copies the model once per variant (the original is left untouched), so
every variant starts from the same weights, and evaluates each on the same held-out tokens with
fastlm.eval.perplexity. The issue's goals: int8 weight-only within 1% of the bf16 perplexity,
W8A8 within 3%.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from fastlm.eval.perplexity import perplexity
from fastlm.quant.quantize import quantize

VARIANTS = ("bf16", "int8_weight_only", "w8a8", "w8a8_smoothquant")


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
    calibration: torch.Tensor | None = None,
    variants: Sequence[str] = ("bf16", "int8_weight_only", "w8a8"),
) -> list[dict]:
    """Perplexity on ``tokens`` (1-D held-out stream) of the model in ``dtype`` and quantized.

    variants: any of "bf16" (the model in ``dtype``: the baseline), "int8_weight_only"
    (with ``group_size``), "w8a8", "w8a8_smoothquant" (needs ``calibration`` token ids (B, T)).
    Rows: variant, perplexity, delta_pct vs the baseline, weight_mb, goal_pct (1 / 3) and
    within_goal. Quantized variants are made from the model in ``dtype``.
    """
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"accuracy_report: unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    if "w8a8_smoothquant" in variants and calibration is None:
        raise ValueError("accuracy_report: 'w8a8_smoothquant' needs calibration token ids (B, T)")
    base = copy.deepcopy(model).to(dtype).eval()
    rows = []
    baseline = None
    for variant in ("bf16", *[v for v in variants if v != "bf16"]):
        if variant == "bf16":
            m = base
        elif variant == "int8_weight_only":
            m = quantize(copy.deepcopy(base), "int8_weight_only", group_size=group_size)
        elif variant == "w8a8":
            m = quantize(copy.deepcopy(base), "w8a8")
        else:
            m = quantize(copy.deepcopy(base), "w8a8", calibration=calibration)
        ppl = perplexity(m, tokens, seq_len=seq_len, batch_size=batch_size, max_batches=max_batches)
        baseline = ppl if baseline is None else baseline
        if variant not in variants:
            continue
        delta = 100.0 * (ppl - baseline) / baseline
        goal = {"bf16": None, "int8_weight_only": 1.0}.get(variant, 3.0)
        rows.append({
            "variant": variant if variant != "bf16" else str(dtype).removeprefix("torch."),
            "perplexity": ppl,
            "delta_pct": delta,
            "weight_mb": model_bytes(m) / 2**20,
            "goal_pct": goal,
            "within_goal": None if goal is None else abs(delta) <= goal,
        })
    return rows
