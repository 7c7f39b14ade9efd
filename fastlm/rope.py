"""Rotary position embeddings with transformers' scaling types (``modeling_rope_utils``).

angle[p, i] = p · inv_freq[i] for i < R/2 (R = rotary dim); q and k are rotated in the
rotate-half convention on their first R dims, cos and sin being multiplied by an attention
scaling (yarn, longrope). inv_freq per rope_type, with f_i = theta^(-2i/R):
  default   f_i
  linear    f_i / factor
  dynamic   (NTK) theta' = theta·(factor·L/M - (factor - 1))^(R/(R-2)) once the sequence
            length L = max(position) + 1 of the call exceeds M = max_position_embeddings
  llama3    f_i / factor for long wavelengths (2π/f_i > O/low_freq_factor), f_i for short ones
            (< O/high_freq_factor), a smooth mix in between (O = original_max_position_embeddings)
  yarn      f_i/factor and f_i blended by a linear ramp over the dims between the correction
            range of beta_fast/beta_slow rotations; scaling 0.1·ln(factor) + 1 (or from mscale)
  longrope  f_i / long_factor[i] when L > O, else f_i / short_factor[i];
            scaling sqrt(1 + ln(M/O)/ln(O)) unless attention_factor is given
A plain RoPE (type default, or a factor of 1) goes through the fused ops (``fastlm.ops.rope``,
``rope_append_kv``); the others are computed here in float32, as transformers does.
"""

from __future__ import annotations

import math
from typing import Any

import torch


def _plain_inv_freq(theta: float, dim: int, device=None) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))


def _llama3(inv_freq: torch.Tensor, spec: dict[str, Any]) -> torch.Tensor:
    factor, low, high = spec["factor"], spec["low_freq_factor"], spec["high_freq_factor"]
    old_context = spec["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_context / low, old_context / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _yarn(theta: float, dim: int, spec: dict[str, Any]) -> tuple[torch.Tensor, float]:
    factor, original = spec["factor"], spec["original_max_position_embeddings"]
    attention_factor, mscale, mscale_all_dim = spec.get("attention_factor"), spec.get("mscale"), spec.get("mscale_all_dim")

    def get_mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = float(get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim))
        else:
            attention_factor = get_mscale(factor)
    beta_fast, beta_slow = spec.get("beta_fast") or 32, spec.get("beta_slow") or 1

    def correction_dim(rotations):  # the dim whose wavelength makes `rotations` turns over `original`
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if spec.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = theta ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    keep = 1 - ramp  # 1: the original frequency (extrapolate), 0: the interpolated one
    return interpolation * (1 - keep) + extrapolation * keep, float(attention_factor)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Rotary:
    """The RoPE of one layer: base ``theta``, ``rotary_dim`` of ``head_dim`` rotated, and the
    ``scaling`` dict (transformers' rope_parameters; None = plain)."""

    def __init__(self, theta: float, head_dim: int, rotary_dim: int, scaling: dict[str, Any] | None,
                 max_position_embeddings: int) -> None:
        self.theta, self.head_dim, self.dim = float(theta), head_dim, rotary_dim
        self.spec = dict(scaling or {"rope_type": "default"})
        self.kind = self.spec["rope_type"]
        self.max_positions = max_position_embeddings
        unit = self.spec.get("factor") == 1.0 and self.spec.get("attention_factor") in (None, 1.0)
        plain_kind = self.kind == "default" or (self.kind in ("linear", "dynamic", "llama3", "yarn") and unit)
        # theta for the fused ops (plain RoPE over the whole head), else None: rotate with apply()
        self.fused_theta = self.theta if plain_kind and rotary_dim == head_dim else None
        if plain_kind:
            self.kind = "default"
        with torch.device("cpu"):  # tables on the CPU even when the model is built on "meta"
            self._build(max_position_embeddings)
        self._on: dict[torch.device, tuple[torch.Tensor, ...]] = {}

    def _build(self, max_position_embeddings: int) -> None:
        self.scaling = 1.0
        inv = _plain_inv_freq(self.theta, self.dim)
        if self.kind == "linear":
            inv = inv / self.spec["factor"]
        elif self.kind == "llama3":
            inv = _llama3(inv, self.spec)
        elif self.kind == "yarn":
            inv, self.scaling = _yarn(self.theta, self.dim, self.spec)
        elif self.kind == "longrope":
            original = self.spec["original_max_position_embeddings"]
            factor = self.spec.get("factor") or max_position_embeddings / original
            attention_factor = self.spec.get("attention_factor")
            if attention_factor is None:
                attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
            self.scaling = float(attention_factor)
            shape = torch.arange(0, self.dim, 2, dtype=torch.int64).float() / self.dim
            self.long_inv = 1.0 / (torch.tensor(self.spec["long_factor"], dtype=torch.float32) * self.theta ** shape)
            inv = 1.0 / (torch.tensor(self.spec["short_factor"], dtype=torch.float32) * self.theta ** shape)
        self.inv_freq = inv  # float32 (R/2,), on the CPU; moved to the positions' device when used

    def _tables(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        if device not in self._on:
            long = getattr(self, "long_inv", self.inv_freq)
            self._on[device] = (self.inv_freq.to(device), long.to(device))
        return self._on[device]

    def inv_freq_for(self, positions: torch.Tensor) -> torch.Tensor:
        """inv_freq (R/2,) float32 for a call at ``positions``: dynamic and longrope depend on
        the call's length L = max(positions) + 1 (a device scalar: no host sync)."""
        inv, long = self._tables(positions.device)
        if self.kind not in ("dynamic", "longrope"):
            return inv
        seq_len = positions.max() + 1
        if self.kind == "longrope":
            return torch.where(seq_len > self.spec["original_max_position_embeddings"], long, inv)
        factor, m, dim = self.spec["factor"], self.max_positions, self.dim
        base = self.theta * ((factor * seq_len / m) - (factor - 1)) ** (dim / (dim - 2))
        grown = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64, device=positions.device).float() / dim))
        return torch.where(seq_len > m, grown, inv)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (*positions.shape, R) in ``dtype``, times the attention scaling."""
        freqs = positions[..., None].float() * self.inv_freq_for(positions)
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.scaling).to(dtype), (emb.sin() * self.scaling).to(dtype)

    def apply(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate q (B, H, T, D) and k (B, Hkv, T, D) at positions (T,) or (B, T)."""
        cos, sin = self.cos_sin(positions, q.dtype)
        cos, sin = (cos[:, None] if cos.dim() == 3 else cos), (sin[:, None] if sin.dim() == 3 else sin)

        def rotate(x):
            if self.dim == x.shape[-1]:
                return x * cos + _rotate_half(x) * sin
            x_rot, x_pass = x[..., : self.dim], x[..., self.dim :]
            return torch.cat((x_rot * cos + _rotate_half(x_rot) * sin, x_pass), dim=-1)

        return rotate(q), rotate(k)
