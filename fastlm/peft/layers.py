"""LoraLinear: a linear layer plus named low-rank adapters, computed through fastlm.ops.

For the active adapter a with A (r, in), B (out, r) and scaling s:

    y = base(x) + s·(dropout(x)·Aᵀ)·Bᵀ

With a plain ``nn.Linear`` base and no dropout in play this is one fused op,
``fastlm.ops.lora_linear`` (W + s·B·A is never formed). In a mixed batch each row i uses its
own adapter a(i) (or none): ``fastlm.ops.lora_linear_mixed`` with the adapters stacked (ranks
zero-padded to the largest, which adds exact zeros). Dropout during training, or a base that
is not an ``nn.Linear`` (e.g. a quantized layer), takes the unfused path base(x) + LoRA term.

Merging folds s·B·A into the base weight; unmerging restores the original weight bit for bit:
W' = round(W + ΔW) with ΔW = s·B·A in float64, and on unmerge round(W' − ΔW) is W except
where the rounding of W' lost information (mostly where W + ΔW crossed a power of two); those
few elements' original values are kept at merge time and written back.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from fastlm import ops


def mixed_op():
    """fastlm.ops.lora_linear_mixed, imported on first use (importing fastlm.ops.lora_triton also
    registers the triton LoRA kernels)."""
    from fastlm.ops.lora_triton import lora_linear_mixed

    return lora_linear_mixed


_MERGE_ROWS = 1024  # ΔW is formed in float64 this many rows at a time (bounded temporary memory)
_BITS = {2: torch.int16, 4: torch.int32, 8: torch.int64}


@dataclass
class LoraState:
    """What every LoraLinear of one LoraModel reads at forward time (set by the LoraModel)."""

    active: str | None = None
    disabled: bool = False
    merged: str | None = None
    # Mixed batch: the adapter names in the batch and each row's index into them (-1: none).
    row_names: list[str] | None = None
    row_index: torch.Tensor | None = None
    # Device tensors built from host lists, kept so that a forward does no host-to-device copy
    # (each one would synchronize with the GPU): row-name position -> stacked position, by
    # (which row names a module has, device).
    remap: dict[tuple, torch.Tensor] = field(default_factory=dict)


@dataclass
class _MergeRecord:
    name: str
    lora_a: torch.Tensor  # copies: ΔW is recomputed exactly as at merge time
    lora_b: torch.Tensor
    scaling: float
    fix_index: torch.Tensor  # flat indices whose original value round(W' − ΔW) does not give back
    fix_value: torch.Tensor


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


def _pad_rank(t: torch.Tensor, rank: int, dim: int) -> torch.Tensor:
    missing = rank - t.shape[dim]
    if missing == 0:
        return t
    pad = [0, 0] * (t.dim() - 1 - dim) + [0, missing]
    return F.pad(t, pad)


class LoraLinear(nn.Module):
    """``base`` (frozen) plus the adapters in ``lora_A`` / ``lora_B`` (ParameterDicts by name)."""

    def __init__(self, base: nn.Module, name: str, state: LoraState) -> None:
        super().__init__()
        self.base = base
        self.module_name = name  # fastlm name, for messages
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.state = state
        self._merge: _MergeRecord | None = None
        self._scales: dict[tuple, torch.Tensor] = {}  # (scalings, device) -> them as a device tensor
        self.in_features, self.out_features = self._features(base, name)

    @staticmethod
    def _features(base: nn.Module, name: str) -> tuple[int, int]:
        if hasattr(base, "in_features") and hasattr(base, "out_features"):
            return int(base.in_features), int(base.out_features)
        weight = getattr(base, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dim() == 2:
            return int(weight.shape[1]), int(weight.shape[0])
        raise TypeError(f"LoRA: module {name} ({type(base).__name__}) has no in_features/out_features or 2-D weight")

    # ---- adapters -----------------------------------------------------------------------------

    def add(self, adapter: str, lora_a: nn.Parameter, lora_b: nn.Parameter, scaling: float, dropout: float) -> None:
        """Attach adapter ``adapter``: lora_a (r, in), lora_b (out, r); raises naming this module
        for a rank <= 0 or a shape made for another base."""
        r = lora_a.shape[0] if lora_a.dim() == 2 else 0
        if r <= 0:
            raise ValueError(f"LoRA adapter {adapter!r}: rank must be >= 1 for module {self.module_name}, "
                             f"got lora_A of shape {tuple(lora_a.shape)}")
        if lora_a.shape != (r, self.in_features) or lora_b.shape != (self.out_features, r):
            raise ValueError(
                f"LoRA adapter {adapter!r} does not fit module {self.module_name} (in={self.in_features}, "
                f"out={self.out_features}): lora_A {tuple(lora_a.shape)}, lora_B {tuple(lora_b.shape)}, expected "
                f"({r}, {self.in_features}) and ({self.out_features}, {r}); was it made for a different base model?")
        self.lora_A[adapter] = lora_a
        self.lora_B[adapter] = lora_b
        self.scaling[adapter] = float(scaling)
        self._scales.clear()
        if dropout > 0:
            self.lora_dropout[adapter] = nn.Dropout(dropout).train(self.training)

    def remove(self, adapter: str) -> None:
        for store in (self.lora_A, self.lora_B, self.lora_dropout):
            if adapter in store:
                del store[adapter]
        self.scaling.pop(adapter, None)
        self._scales.clear()

    def rank(self, adapter: str) -> int:
        return self.lora_A[adapter].shape[0]

    def delta_weight(self, adapter: str, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """ΔW = s·B·A (out, in) in ``dtype``."""
        a, b = self.lora_A[adapter].detach(), self.lora_B[adapter].detach()
        return self.scaling[adapter] * (b.to(dtype) @ a.to(dtype))

    # ---- forward ------------------------------------------------------------------------------

    def _fusable(self) -> bool:
        return type(self.base) is nn.Linear and self.base.weight.dtype.is_floating_point

    # What forward reads; PackedLoraLinear answers these for the adapters of its row blocks.

    def _has(self, adapter: str) -> bool:
        return adapter in self.lora_A

    def _has_any(self) -> bool:
        return bool(self.lora_A)

    def _dropout_active(self, adapter: str) -> bool:
        return self.training and adapter in self.lora_dropout

    def _weights(self, adapter: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(A (r, in), B (out, r), scaling) of ``adapter`` in ``dtype``: the term is s·(x·Aᵀ)·Bᵀ."""
        return self.lora_A[adapter].to(dtype), self.lora_B[adapter].to(dtype), self.scaling[adapter]

    def _delta(self, x: torch.Tensor, adapter: str, dtype: torch.dtype) -> torch.Tensor:
        """s·(dropout(x)·Aᵀ)·Bᵀ (..., out) in ``dtype``, computed unfused."""
        x_lora = self.lora_dropout[adapter](x) if self._dropout_active(adapter) else x
        lora_a, lora_b = self.lora_A[adapter].to(dtype), self.lora_B[adapter].to(dtype)
        return self.scaling[adapter] * F.linear(F.linear(x_lora.to(dtype), lora_a), lora_b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = self.state
        if state.disabled or not self._has_any():
            return self.base(x)
        if state.row_names is not None:
            return self._forward_mixed(x, state)
        adapter = state.active
        if adapter is None or not self._has(adapter) or state.merged == adapter:
            return self.base(x)
        dtype = _compute_dtype(x)
        if self._fusable() and not self._dropout_active(adapter):
            lora_a, lora_b, scaling = self._weights(adapter, dtype)
            weight, bias = self.base.weight, self.base.bias
            return ops.lora_linear(x.to(dtype), weight.to(dtype), lora_a, lora_b, scaling,
                                   None if bias is None else bias.to(dtype))
        return self.base(x) + self._delta(x, adapter, dtype)

    def _forward_mixed(self, x: torch.Tensor, state: LoraState) -> torch.Tensor:
        """Row b of x (B, ..., in) uses adapter state.row_names[state.row_index[b]] (or none)."""
        if state.merged is not None:
            raise RuntimeError(f"LoRA module {self.module_name}: adapter {state.merged!r} is merged into the base "
                               "weights; call unmerge_adapter() before a mixed-adapter batch")
        known = tuple(self._has(n) for n in state.row_names)
        present = tuple(n for n, k in zip(state.row_names, known) if k)
        if not present:
            return self.base(x)
        rows = state.row_index
        if x.dim() < 2 or x.shape[0] != rows.shape[0]:
            raise ValueError(f"LoRA module {self.module_name}: {rows.shape[0]} adapter names for an input of "
                             f"shape {tuple(x.shape)}")
        key = (known, rows.device)
        if key not in state.remap:  # position in state.row_names -> position in `present`; last entry: none
            positions, k = [], 0
            for has in known:
                positions.append(k if has else -1)
                k += has
            state.remap[key] = torch.tensor(positions + [-1], dtype=torch.int64, device=rows.device)
        index = state.remap[key][rows]  # (B,); rows of -1 read the trailing -1
        index = index.view(-1, *([1] * (x.dim() - 2))).expand(x.shape[:-1])
        dtype = _compute_dtype(x)
        if self._fusable() and not any(self._dropout_active(n) for n in present):
            weights = [self._weights(n, dtype) for n in present]
            rank = max(a.shape[0] for a, _, _ in weights)
            lora_a = torch.stack([_pad_rank(a, rank, 0) for a, _, _ in weights])  # (n, r, in)
            lora_b = torch.stack([_pad_rank(b, rank, 1) for _, b, _ in weights])  # (n, out, r)
            scalings = tuple(s for _, _, s in weights)
            if (scalings, x.device) not in self._scales:
                self._scales[scalings, x.device] = torch.tensor(scalings, dtype=torch.float32, device=x.device)
            weight, bias = self.base.weight, self.base.bias
            return mixed_op()(x.to(dtype), weight.to(dtype), lora_a, lora_b, self._scales[scalings, x.device], index,
                              None if bias is None else bias.to(dtype), validate=False)
        out = self.base(x)
        delta = torch.zeros_like(out, dtype=dtype)
        for i, adapter in enumerate(present):
            delta = torch.where((index == i)[..., None], self._delta(x, adapter, dtype), delta)
        return out + delta

    # ---- merge / unmerge ----------------------------------------------------------------------

    def _merge_target(self) -> torch.Tensor:
        """The weight rows (out, in) that merging writes into (a view for a packed projection)."""
        return self.base.weight

    def check_mergeable(self) -> None:
        weight = getattr(self.base, "weight", None)
        if not isinstance(weight, torch.Tensor) or not weight.dtype.is_floating_point:
            kind = "no float weight" if not isinstance(weight, torch.Tensor) else f"a {weight.dtype} weight"
            raise ValueError(
                f"merge_adapter: cannot merge into module {self.module_name} ({type(self.base).__name__} with "
                f"{kind}): folding the adapter into quantized weights would requantize them and lose the exact "
                "base; run with the adapter unmerged (LoRA works on top of quantized layers) or dequantize first")
        if weight.element_size() not in _BITS:
            raise ValueError(f"merge_adapter: unsupported weight dtype {weight.dtype} in module {self.module_name}")

    @property
    def merged(self) -> str | None:
        return None if self._merge is None else self._merge.name

    @torch.no_grad()
    def merge(self, adapter: str) -> None:
        """W ← round(W + s·B·A) (ΔW in float64); keeps what unmerge() needs to give W back exactly."""
        self.check_mergeable()
        if self._merge is not None:
            raise RuntimeError(f"module {self.module_name} already has adapter {self._merge.name!r} merged")
        weight = self._merge_target()
        record = _MergeRecord(adapter, self.lora_A[adapter].detach().clone(), self.lora_B[adapter].detach().clone(),
                              self.scaling[adapter], torch.empty(0, dtype=torch.int64, device=weight.device),
                              weight.new_empty(0))
        fixes, values = [], []
        for start in range(0, weight.shape[0], _MERGE_ROWS):
            rows = weight[start:start + _MERGE_ROWS]
            delta = self._record_delta(record, start, rows.shape[0])
            merged = (rows.double() + delta).to(weight.dtype)
            restored = (merged.double() - delta).to(weight.dtype)
            bits = _BITS[weight.element_size()]
            lost = (restored.view(bits) != rows.view(bits)).flatten().nonzero().squeeze(1)
            fixes.append(lost + start * weight.shape[1])
            values.append(rows.flatten()[lost])
            rows.copy_(merged)
        record.fix_index, record.fix_value = torch.cat(fixes), torch.cat(values)
        self._merge = record

    @staticmethod
    def _record_delta(record: _MergeRecord, start: int, count: int) -> torch.Tensor:
        b = record.lora_b[start:start + count].double()
        return record.scaling * (b @ record.lora_a.double())

    @torch.no_grad()
    def unmerge(self) -> None:
        """W ← round(W' − ΔW), then the elements recorded at merge time: the original W, bit for bit."""
        record = self._merge
        if record is None:
            return
        weight = self._merge_target()
        for start in range(0, weight.shape[0], _MERGE_ROWS):
            rows = weight[start:start + _MERGE_ROWS]
            rows.copy_((rows.double() - self._record_delta(record, start, rows.shape[0])).to(weight.dtype))
        weight.view(-1)[record.fix_index] = record.fix_value
        self._merge = None

    def extra_repr(self) -> str:
        adapters = ", ".join(f"{n}: r={self.rank(n)}, s={self.scaling[n]:g}" for n in self.lora_A)
        return f"{self.module_name}: {self.in_features} -> {self.out_features}; adapters {{{adapters}}}"
