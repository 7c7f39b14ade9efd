"""Post-training quantization of a whole model: ``fastlm.quantize(model, mode=...)``.

The linear layers (attention q/k/v/o and MLP projections; the output head only when asked) are
replaced in place by :class:`~fastlm.quant.layers.Int8WeightOnlyLinear` or
:class:`~fastlm.quant.layers.W8A8Linear`. Embeddings stay in the model dtype: a lookup reads
one row per token (int8 would save memory, not time), and ``Model.dtype`` is the embedding's.

SmoothQuant (W8A8 with ``calibration``): the per-input-channel activation maxima a_j are
recorded on calibration tokens, and each layer's weight maxima w_j = max_o |W[o, j]| give

    c_j = a_j^α / w_j^(1−α)     (1 where a_j or w_j is 0),   x·Wᵀ = (x / c)·(W·diag(c))ᵀ

which moves activation outliers into the weight before both are quantized. Projections that
read the same activation (q/k/v, gate/up) are one fused layer (attn.qkv_proj, mlp.gate_up_proj),
so they share one c, w_j taken over all their rows.

``skip`` names modules as fastlm does (``layers.*.mlp.down_proj``) and may name a projection
packed in a fused layer by its Hugging Face name (``layers.0.attn.k_proj``): a fused layer is one
weight, quantized whole or not at all, so skipping any of its projections keeps the whole fused
layer in float (logged as a warning naming the projections kept in float with it).
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from fastlm.quant.layers import Int8WeightOnlyLinear, QuantizationError, QuantizedLinear, W8A8Linear

logger = logging.getLogger(__name__)

MODES = ("int8_weight_only", "w8a8")
HEAD_NAME = "lm_head"


@dataclass(frozen=True)
class QuantConfig:
    """What :func:`quantize` does.

    mode: "int8_weight_only" (int8 weights, float activations) or "w8a8" (int8 both).
    group_size: int8_weight_only only — one scale per group of this many inputs (None: per channel).
    skip: module names (or fnmatch patterns such as "layers.*.mlp.down_proj") left in float; a
      projection packed in a fused layer (q_proj in attn.qkv_proj) may be named too, which keeps
      the whole fused layer in float.
    include_head: also quantize the output head (``lm_head``).
    smooth_alpha: SmoothQuant's migration strength α in [0, 1] (used with calibration data).
    """

    mode: str = "int8_weight_only"
    group_size: int | None = None
    skip: tuple[str, ...] = ()
    include_head: bool = False
    smooth_alpha: float = 0.5

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"QuantConfig.mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.group_size is not None:
            if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 1:
                raise ValueError(f"QuantConfig.group_size must be a positive integer or None, got {self.group_size!r}")
            if self.mode != "int8_weight_only":
                raise ValueError("QuantConfig.group_size applies to mode='int8_weight_only' only "
                                 "(w8a8 uses one scale per output channel)")
        if not isinstance(self.skip, tuple) or not all(isinstance(s, str) for s in self.skip):
            raise ValueError(f"QuantConfig.skip must be a tuple of module names, got {self.skip!r}")
        if not (isinstance(self.smooth_alpha, (int, float)) and 0.0 <= self.smooth_alpha <= 1.0):
            raise ValueError(f"QuantConfig.smooth_alpha must be in [0, 1], got {self.smooth_alpha!r}")


def quantized_layers(model: nn.Module) -> dict[str, QuantizedLinear]:
    """The quantized linear layers of ``model`` by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}


def _is_head(name: str) -> bool:
    """The output head, also inside wrappers ("model.lm_head", "lm_head.base")."""
    return HEAD_NAME in name.split(".")


def packed_names(model: nn.Module) -> dict[str, tuple[str, ...]]:
    """Fused layer name -> the names of the projections packed in it (q_proj, k_proj, v_proj of
    attn.qkv_proj, ...), also inside wrappers (LoRA: ``model.layers.0.attn.qkv_proj.base``)."""
    from fastlm.model import packed_modules  # quant sits above the model

    out = {}
    for fused, parts in packed_modules(model).items():
        names = tuple(name for name, _, _ in parts)
        out[fused] = names
        out[fused + ".base"] = names
    return out


def _skipped(name: str, skip: Sequence[str], packed: dict[str, tuple[str, ...]]) -> list[str]:
    """The names (the module's, or of projections packed in it) that a skip entry matches."""
    names = (name, *packed.get(name, ()))
    return [n for n in names if any(fnmatch.fnmatchcase(n, s) for s in skip)]


def target_layers(model: nn.Module, config: QuantConfig) -> dict[str, nn.Linear]:
    """The nn.Linear layers :func:`quantize` replaces. Raises QuantizationError if one of them is
    already quantized, and ValueError for a skip entry that matches no linear layer (nor a
    projection packed in one)."""
    linears = {name: m for name, m in model.named_modules() if isinstance(m, (nn.Linear, QuantizedLinear))}
    packed = packed_names(model)
    known = [n for name in linears for n in (name, *packed.get(name, ()))]
    unused = [s for s in config.skip if not any(fnmatch.fnmatchcase(name, s) for name in known)]
    if unused:
        raise ValueError(f"quantize: skip entries match no linear layer: {unused}; layers are named like "
                         f"{next(iter(linears), 'layers.0.attn.qkv_proj')!r} (projections packed in a fused "
                         "layer also by their own names, e.g. 'layers.0.attn.q_proj')")
    targets = {}
    for name, module in linears.items():
        skipped = _skipped(name, config.skip, packed)
        if skipped or (_is_head(name) and not config.include_head):
            if skipped and name not in skipped and set(skipped) != set(packed[name]):
                kept = [n for n in packed[name] if n not in skipped]
                logger.warning("quantize: %s is packed with %s in the fused layer %s, which is one weight: "
                               "the whole layer stays in float", ", ".join(skipped), ", ".join(kept), name)
            continue
        if isinstance(module, QuantizedLinear):
            raise QuantizationError(f"quantize: layer {name!r} is already quantized ({module.mode}); "
                                    "quantize the original model, or skip this layer")
        targets[name] = module
    return targets


def _batches(calibration) -> Iterable[torch.Tensor]:
    if isinstance(calibration, torch.Tensor):
        calibration = [calibration]
    for batch in calibration:
        if not isinstance(batch, torch.Tensor) or batch.dim() != 2 or batch.dtype.is_floating_point:
            shape = tuple(batch.shape) if isinstance(batch, torch.Tensor) else ""
            raise TypeError("quantize: calibration must be token ids (B, T) or an iterable of such tensors, "
                            f"got {type(batch).__name__}{shape}")
        yield batch


@torch.no_grad()
def activation_maxima(model: nn.Module, calibration, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """max over calibration tokens of |x[:, j]| for the input x of each named linear layer:
    name -> (in_features,) float32 (on the model's device). ``calibration``: token ids (B, T) or an
    iterable of such batches, run through ``model``."""
    maxima: dict[str, torch.Tensor] = {}
    hooks = []

    def hook(name):
        def record(module, args):
            x = args[0].detach()
            amax = x.reshape(-1, x.shape[-1]).abs().amax(dim=0).float()
            maxima[name] = amax if name not in maxima else torch.maximum(maxima[name], amax)

        return record

    for name in names:
        hooks.append(model.get_submodule(name).register_forward_pre_hook(hook(name)))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        seen = 0
        for batch in _batches(calibration):
            model(batch.to(device))
            seen += 1
        if seen == 0:
            raise ValueError("quantize: the calibration data is empty")
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return maxima


def smoothquant_factors(
    model: nn.Module, layers: dict[str, nn.Linear], calibration, alpha: float = 0.5
) -> dict[str, torch.Tensor]:
    """SmoothQuant factors c (in,) per layer (module docstring); a fused layer's w_j is taken over
    all its rows, so q/k/v (gate/up) share one c."""
    maxima = activation_maxima(model, calibration, list(layers))
    factors = {}
    for name, layer in layers.items():
        act, wmax = maxima[name], layer.weight.detach().abs().amax(dim=0).float()
        c = act.pow(alpha) / wmax.pow(1.0 - alpha)
        factors[name] = torch.where((act > 0) & (wmax > 0) & torch.isfinite(c), c, torch.ones_like(c)).clamp(1e-5, 1e5)
    return factors


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


@torch.no_grad()
def quantize(
    model: nn.Module,
    mode: str = "int8_weight_only",
    *,
    skip: Sequence[str] = (),
    group_size: int | None = None,
    calibration=None,
    smooth_alpha: float = 0.5,
    include_head: bool = False,
) -> nn.Module:
    """Replace ``model``'s linear layers by quantized ones, in place; returns ``model``.

    mode "int8_weight_only": int8 weights with per-channel scales, or one scale per
    ``group_size`` inputs; "w8a8": int8 weights (per channel) and int8 activations (per token,
    dynamic). ``calibration`` (w8a8 only): token ids (B, T), or an iterable of them, from which
    SmoothQuant factors are computed (``smooth_alpha`` = α). ``skip``: module names or fnmatch
    patterns to keep in float (a projection packed in a fused layer keeps that layer in float). The output head is kept unless ``include_head``; quantizing the
    head of a model with tied embeddings unties them (the embedding stays float).

    Raises ValueError for an unknown mode or bad option, QuantizationError for a layer that is
    already quantized or has a non-2-D weight.
    """
    if isinstance(skip, str):
        skip = (skip,)
    config = QuantConfig(mode, group_size, tuple(skip), bool(include_head), smooth_alpha)
    if calibration is not None and config.mode != "w8a8":
        raise ValueError("quantize: calibration data is used by mode='w8a8' (SmoothQuant) only")
    targets = target_layers(model, config)
    if not targets:
        raise ValueError("quantize: no linear layer to quantize (all skipped?)")
    factors = smoothquant_factors(model, targets, calibration, config.smooth_alpha) if calibration is not None else {}
    for name, linear in targets.items():
        if config.mode == "int8_weight_only":
            new = Int8WeightOnlyLinear.from_linear(linear, config.group_size, name=name)
        else:
            new = W8A8Linear.from_linear(linear, factors.get(name), name=name)
        _set_module(model, name, new)
    if any(_is_head(n) for n in targets):  # the head is its own int8 tensor now: untie
        for module in model.modules():
            model_config = module.__dict__.get("config")
            if getattr(model_config, "tie_word_embeddings", False):
                module.config = model_config.replace(tie_word_embeddings=False)
    logger.info("quantized %d linear layers to %s%s", len(targets), config.mode,
                " with SmoothQuant" if factors else "")
    return model
