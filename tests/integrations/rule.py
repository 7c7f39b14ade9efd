"""The 2x rule of ENGINEERING.md: max|out - ref| <= 2 * max|torch_same_dtype - ref| + atol."""

from __future__ import annotations

import torch


def max_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.double() - ref.double()).abs().max()) if x.numel() else 0.0


def assert_2x(out: torch.Tensor, baseline: torch.Tensor, ref: torch.Tensor, *, atol: float, what: str) -> None:
    assert out.shape == ref.shape == baseline.shape, (what, out.shape, baseline.shape, ref.shape)
    assert torch.isfinite(out).all(), f"{what}: non-finite values"
    err, base = max_err(out, ref), max_err(baseline, ref)
    assert err <= 2 * base + atol, f"{what}: fastlm error {err:.3g} > 2 x transformers' {base:.3g} + {atol:.3g}"
