"""LoRA on a fused projection (q/k/v in ``attn.qkv_proj``, gate/up in ``mlp.gate_up_proj``).

PEFT adapters name the unfused projections (q_proj, k_proj, v_proj, gate_proj, up_proj). Each
targeted projection gets a :class:`LoraSlice` at its own name (``layers.0.attn.q_proj``): it
holds that projection's adapters and merges them into its rows [start, stop) of the fused
weight. The fused layer becomes a :class:`PackedLoraLinear`, which runs one GEMM for the base and
adds each slice's adapter to its slice of the output, as vLLM's packed LoRA layers do:

    y = x·Wᵀ + b,   y[..., start_j:stop_j] += s_j·(x·A_jᵀ)·B_jᵀ    for each slice j with the adapter

computed as one low-rank term x·Aᵀ·Bᵀ with A = [A_j] stacked (r = Σ r_j; an A shared by
several slices, GPT-2's c_attn, counted once) and B (out, r) block-diagonal: B_j in slice j's
rows and its A's columns, exact zeros elsewhere. With one scaling for all slices it is passed
as the op's scaling; otherwise each B_j carries its own s_j and the scaling is 1. Targets may
be a subset (only q and v): the other rows get no term.
"""

from __future__ import annotations

import torch
from torch import nn

from fastlm.peft.layers import LoraLinear, LoraState


class PackedLoraLinear(LoraLinear):
    """A fused projection ``base`` (out = Σ slice rows) whose adapters live in its slices.
    It holds no adapter itself (``lora_A`` stays empty); ``slices`` are the LoraSlices in row
    order (not submodules: each is registered at its projection's name)."""

    def __init__(self, base: nn.Module, name: str, state: LoraState) -> None:
        super().__init__(base, name, state)
        self.slices: list[LoraSlice] = []

    def add_slice(self, piece: LoraSlice) -> None:
        self.slices = sorted([*self.slices, piece], key=lambda p: p.start)

    def add(self, *args, **kwargs) -> None:
        raise TypeError(f"LoRA module {self.module_name} is a fused projection: adapters go on its slices "
                        f"({', '.join(p.module_name for p in self.slices) or 'none yet'})")

    def _has(self, adapter: str) -> bool:
        return any(adapter in p.lora_A for p in self.slices)

    def _has_any(self) -> bool:
        return any(p.lora_A for p in self.slices)

    def _dropout_active(self, adapter: str) -> bool:
        return any(p._dropout_active(adapter) for p in self.slices)

    def rank(self, adapter: str) -> int:
        return self._stacked_a(adapter)[0].shape[0] if self._has(adapter) else 0

    def _stacked_a(self, adapter: str) -> tuple[torch.Tensor, dict[int, tuple[int, int]]]:
        """(A (r, in): the distinct lora_A of the slices carrying ``adapter``, stacked; id(A) -> its rows)."""
        blocks, columns, r = [], {}, 0
        for piece in self.slices:
            a = piece.lora_A[adapter] if adapter in piece.lora_A else None
            if a is not None and id(a) not in columns:
                columns[id(a)] = (r, r + a.shape[0])
                r += a.shape[0]
                blocks.append(a)
        return torch.cat(blocks, dim=0), columns

    def _weights(self, adapter: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(A (r, in), B (out, r) block-diagonal, scaling): see the module docstring."""
        lora_a, columns = self._stacked_a(adapter)
        r = lora_a.shape[0]
        pieces = [p for p in self.slices if adapter in p.lora_A]
        scalings = {p.scaling[adapter] for p in pieces}
        common = scalings.pop() if len(scalings) == 1 else None
        rows, end = [], 0
        for piece in pieces:
            if piece.start > end:  # rows of projections without this adapter
                rows.append(lora_a.new_zeros(piece.start - end, r, dtype=dtype))
            b = piece.lora_B[adapter].to(dtype)
            if common is None:
                b = piece.scaling[adapter] * b
            c0, c1 = columns[id(piece.lora_A[adapter])]
            rows.append(torch.cat([b.new_zeros(b.shape[0], c0), b, b.new_zeros(b.shape[0], r - c1)], dim=1))
            end = piece.stop
        if end < self.out_features:
            rows.append(lora_a.new_zeros(self.out_features - end, r, dtype=dtype))
        return lora_a.to(dtype), torch.cat(rows, dim=0), 1.0 if common is None else common

    def _delta(self, x: torch.Tensor, adapter: str, dtype: torch.dtype) -> torch.Tensor:
        """Each slice's own term (its own dropout) in its rows, zeros elsewhere: (..., out)."""
        parts, end = [], 0
        for piece in self.slices:
            if adapter not in piece.lora_A:
                continue
            term = piece._delta(x, adapter, dtype)
            if piece.start > end:
                parts.append(term.new_zeros(*term.shape[:-1], piece.start - end))
            parts.append(term)
            end = piece.stop
        if end < self.out_features:
            parts.append(parts[-1].new_zeros(*parts[-1].shape[:-1], self.out_features - end))
        return torch.cat(parts, dim=-1)

    def extra_repr(self) -> str:
        names = ", ".join(f"{p.module_name} [{p.start}:{p.stop}]" for p in self.slices)
        return f"{self.module_name}: {self.in_features} -> {self.out_features}; slices {{{names}}}"


class LoraSlice(LoraLinear):
    """The adapters of one projection packed in a fused layer: rows [start, stop) of its output.
    ``base`` is the fused layer's base (not a submodule here); it is computed by the fused layer."""

    def __init__(self, packed: PackedLoraLinear, name: str, start: int, stop: int, state: LoraState) -> None:
        nn.Module.__init__(self)
        self._packed = [packed]  # a plain list: the fused layer is registered at its own name
        self.start, self.stop = start, stop
        self.module_name = name
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.state = state
        self._merge = None
        self._scales: dict[tuple, torch.Tensor] = {}
        self.in_features, self.out_features = packed.in_features, stop - start

    @property
    def fused(self) -> PackedLoraLinear:
        return self._packed[0]

    @property
    def base(self) -> nn.Module:
        return self._packed[0].base

    def _merge_target(self) -> torch.Tensor:
        return self.base.weight[self.start:self.stop]  # a view: merging writes into the fused weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError(f"LoRA module {self.module_name} is rows {self.start}:{self.stop} of the fused "
                           f"{self.fused.module_name}; the model calls that one")

    def extra_repr(self) -> str:
        return f"rows {self.start}:{self.stop} of {self.fused.module_name}; " + super().extra_repr()
