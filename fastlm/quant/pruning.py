"""Magnitude pruning of linear weights: unstructured to a target sparsity, and 2:4 semi-structured.

* Unstructured: in each layer, the k = round(sparsity · numel) weights of smallest |w| are set
  to zero (ties broken by position), so every layer reaches the target up to one weight.
* 2:4: in every group of 4 consecutive weights along the input dimension, the 2 of smallest |w|
  are zeroed — the pattern sparse tensor cores accelerate (50% sparsity).

Both return a :class:`SparsityReport` of the sparsity reached. :func:`to_semi_structured` then
hands 2:4 weights to PyTorch's semi-structured sparse tensors on CUDA
(``torch.sparse.to_sparse_semi_structured``), which ``nn.Linear`` runs through F.linear.
Pruning writes zeros into the float weights in place; it does not change module types.
Projections packed in a fused layer (q/k/v in attn.qkv_proj, gate/up in mlp.gate_up_proj) are
pruned, reported and skipped each on its own rows, under its own name (layers.0.attn.q_proj),
exactly as separate layers would be.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

logger = logging.getLogger(__name__)


@dataclass
class SparsityReport:
    """target: requested sparsity (None for a plain report); sparsity: zeros / weights over the
    layers; layers: per-layer fraction of zeros; pattern_2_4: whether every layer is 2:4 sparse."""

    target: float | None
    sparsity: float
    layers: dict[str, float] = field(default_factory=dict)
    pattern_2_4: bool = False


def _layers(model: nn.Module, skip: Sequence[str], include_head: bool) -> dict[str, tuple[nn.Linear, int, int]]:
    """name -> (linear layer, first row, end row): a projection packed in a fused layer is its rows
    of that layer, under its own name; any other linear layer is all of its rows."""
    from fastlm.model import packed_modules  # quant sits above the model

    if isinstance(skip, str):
        skip = (skip,)
    packed = packed_modules(model)
    packed.update({f"{fused}.base": parts for fused, parts in list(packed.items())})  # inside a LoRA wrapper
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    units: dict[str, tuple[nn.Linear, int, int, tuple[str, ...]]] = {}
    for name, module in linears.items():
        if name in packed:
            for part, start, stop in packed[name]:
                units[part] = (module, start, stop, (name, part))
        else:
            units[name] = (module, 0, module.weight.shape[0], (name,))
    unused = [s for s in skip if not any(fnmatch.fnmatchcase(n, s) for u in units.values() for n in u[3])]
    if unused:
        raise ValueError(f"pruning: skip entries match no linear layer: {unused}")
    out = {}
    for name, (module, start, stop, names) in units.items():
        if any(fnmatch.fnmatchcase(n, s) for n in names for s in skip) or \
                ("lm_head" in name.split(".") and not include_head):
            continue
        if module.weight.dim() != 2:
            raise ValueError(f"pruning: layer {name!r} has a {module.weight.dim()}-D weight, expected (out, in)")
        out[name] = (module, start, stop)
    if not out:
        raise ValueError("pruning: no linear layer to prune")
    return out


def _rows(unit: tuple[nn.Linear, int, int]) -> torch.Tensor:
    """The unit's weight rows (a view: writes land in the layer's weight)."""
    module, start, stop = unit
    weight = module.weight
    return weight if (start, stop) == (0, weight.shape[0]) else weight[start:stop]


def is_2_4(weight: torch.Tensor) -> bool:
    """True when every group of 4 consecutive inputs of each row has at most 2 non-zeros."""
    if weight.dim() != 2 or weight.shape[1] % 4:
        return False
    return bool(((weight.reshape(weight.shape[0], -1, 4) != 0).sum(dim=-1) <= 2).all())


def sparsity_report(model: nn.Module, *, skip: Sequence[str] = (), include_head: bool = False,
                    target: float | None = None) -> SparsityReport:
    """Fraction of zero weights per linear layer and overall, and whether all are 2:4."""
    layers = _layers(model, skip, include_head)
    zeros = total = 0
    per_layer = {}
    for name, unit in layers.items():
        w = _rows(unit).detach()
        z = int((w == 0).sum())
        per_layer[name] = z / w.numel()
        zeros, total = zeros + z, total + w.numel()
    return SparsityReport(target, zeros / total, per_layer, all(is_2_4(_rows(u)) for u in layers.values()))


@torch.no_grad()
def prune_magnitude(model: nn.Module, sparsity: float, *, skip: Sequence[str] = (),
                    include_head: bool = False) -> SparsityReport:
    """Zero the round(sparsity·numel) smallest-magnitude weights of every linear layer (the output
    head only with ``include_head``; ``skip``: names or fnmatch patterns). sparsity in [0, 1)."""
    if not (isinstance(sparsity, (int, float)) and 0.0 <= sparsity < 1.0):
        raise ValueError(f"prune_magnitude: sparsity must be in [0, 1), got {sparsity!r}")
    layers = _layers(model, skip, include_head)
    for unit in layers.values():
        w = _rows(unit)
        k = round(sparsity * w.numel())
        if k:
            order = torch.argsort(w.detach().abs().flatten(), stable=True)  # ties: lower index first
            w.view(-1)[order[:k]] = 0
    report = sparsity_report(model, skip=skip, include_head=include_head, target=sparsity)
    logger.info("magnitude pruning to %.3f: reached %.4f over %d layers", sparsity, report.sparsity, len(layers))
    return report


@torch.no_grad()
def prune_2_4(model: nn.Module, *, skip: Sequence[str] = (), include_head: bool = False) -> SparsityReport:
    """2:4 semi-structured pruning of every linear layer (in_features must be a multiple of 4)."""
    layers = _layers(model, skip, include_head)
    bad = [f"{n} (in={u[0].in_features})" for n, u in layers.items() if u[0].weight.shape[1] % 4]
    if bad:
        raise ValueError(f"prune_2_4: in_features must be a multiple of 4; skip these layers: {', '.join(bad)}")
    for unit in layers.values():
        w = _rows(unit)
        groups = w.view(w.shape[0], -1, 4)  # (out, in/4, 4), a view: zeros land in the weight
        smallest = groups.detach().abs().topk(2, dim=-1, largest=False).indices
        groups.scatter_(-1, smallest, 0.0)
    report = sparsity_report(model, skip=skip, include_head=include_head, target=0.5)
    logger.info("2:4 pruning: reached %.4f over %d layers", report.sparsity, len(layers))
    return report


@torch.no_grad()
def to_semi_structured(model: nn.Module, *, skip: Sequence[str] = (), include_head: bool = False) -> dict[str, str]:
    """Convert the 2:4-sparse linear weights to ``torch.sparse.SparseSemiStructuredTensor`` (CUDA,
    float16/bfloat16/int8; PyTorch's shape limits apply). Returns name -> "converted" or the
    reason a layer was left dense. Inference only: the converted weights take no gradient. A fused
    layer is one weight: it is converted (under its own name) only when none of its projections
    is skipped."""
    if not hasattr(torch.sparse, "to_sparse_semi_structured"):
        raise RuntimeError("to_semi_structured: this PyTorch has no torch.sparse.to_sparse_semi_structured")
    rows: dict[int, int] = {}  # id(layer) -> how many of its rows are not skipped
    for module, start, stop in _layers(model, skip, include_head).values():
        rows[id(module)] = rows.get(id(module), 0) + stop - start
    result = {}
    for name, module in model.named_modules():
        if id(module) not in rows:
            continue
        if rows[id(module)] != module.weight.shape[0]:
            result[name] = "left dense: some of the projections packed in it are skipped"
            continue
        w = module.weight
        if w.device.type != "cuda":
            raise RuntimeError(f"to_semi_structured: layer {name!r} is on {w.device}; "
                               "semi-structured sparsity needs CUDA")
        if not is_2_4(w):
            result[name] = "not 2:4 sparse (run prune_2_4 first)"
            continue
        try:
            sparse = torch.sparse.to_sparse_semi_structured(w.detach())
        except (RuntimeError, ValueError) as err:  # unsupported shape/dtype/GPU: the layer stays dense
            result[name] = f"left dense: {err}"
            continue
        module.weight = nn.Parameter(sparse, requires_grad=False)
        result[name] = "converted"
    return result
