"""Quantized replacements of ``nn.Linear``: int8 weight-only and W8A8.

Both hold the weight as an int8 buffer ``weight`` (out, in) with float32 ``weight_scale`` and
compute through fastlm.ops, so every backend (reference, triton, cuda) serves them:

* :class:`Int8WeightOnlyLinear`: y = x·(q·s)ᵀ + b, with s per output channel (out,) or per group
  of ``group_size`` inputs (out, in / group_size); activations stay in the model dtype
  (``fastlm.ops.int8_linear``, dequantized in registers by the Triton kernel).
* :class:`W8A8Linear`: activations quantized per token on the fly, int8 × int8 → int32 matmul,
  y = sx·sw·(xq·qᵀ) + b, optionally with SmoothQuant factors c: the weight is quantized as W·diag(c)
  and the input divided by c (``fastlm.ops.int8_triton.w8a8_linear``).

Scales and smoothing factors stay float32 when the model is cast (``model.to(torch.bfloat16)``):
only the bias follows the model dtype. The int8 weight takes no gradient; LoRA adapters wrap
these layers unchanged (they read ``in_features`` / ``out_features`` and call ``forward``).
"""

from __future__ import annotations

import torch
from torch import nn

from fastlm import ops
from fastlm.ops.int8_triton import dequantize_int8, w8a8_linear

QUANTIZED_SUFFIXES = ("weight_scale", "input_smooth")  # state-dict entries beyond nn.Linear's


class QuantizationError(ValueError):
    """A layer cannot be quantized (already quantized, wrong weight shape) or quantized tensors
    do not fit together (mismatched scale shapes)."""


def _check_linear(linear: nn.Module, name: str) -> torch.Tensor:
    """The 2-D float weight of an nn.Linear, or QuantizationError saying what is wrong."""
    if isinstance(linear, QuantizedLinear):
        raise QuantizationError(f"layer {name!r} is already quantized ({linear.mode}); quantize the original model")
    if not isinstance(linear, nn.Linear):
        raise QuantizationError(f"layer {name!r} is a {type(linear).__name__}, expected nn.Linear")
    weight = linear.weight
    if weight.dim() != 2:
        raise QuantizationError(f"layer {name!r}: expected a 2-D weight (out, in), got shape {tuple(weight.shape)}")
    if not weight.dtype.is_floating_point:
        raise QuantizationError(f"layer {name!r}: expected a floating-point weight, got {weight.dtype}")
    if weight.device.type == "meta":
        raise QuantizationError(f"layer {name!r}: the weight is on the meta device (not loaded)")
    return weight.detach()


def _check_smooth_values(smooth: torch.Tensor | None) -> None:
    """Finite and > 0 (a meta placeholder holds no values: it is checked when loaded)."""
    if smooth is None or smooth.device.type == "meta":
        return
    if not (torch.isfinite(smooth).all() and (smooth > 0).all()):
        raise QuantizationError("W8A8Linear: input_smooth (smoothing factors) must be finite and > 0")


class QuantizedLinear(nn.Module):
    """Base of the quantized linear layers: int8 ``weight`` (out, in), float32 ``weight_scale``,
    optional ``bias`` (out,) in the model dtype. Subclasses define ``mode`` and ``forward``."""

    mode: str = ""
    _FLOAT32_BUFFERS = ("weight_scale",)

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        if weight.dim() != 2 or weight.dtype != torch.int8:
            raise QuantizationError(f"{type(self).__name__}: expected an int8 weight (out, in), got "
                                    f"{weight.dtype} of shape {tuple(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        self._check_scale(weight_scale)
        if bias is not None and bias.shape != (self.out_features,):
            raise QuantizationError(f"{type(self).__name__}: expected bias of shape ({self.out_features},), "
                                    f"got {tuple(bias.shape)}")
        self.register_buffer("weight", weight)
        self.register_buffer("weight_scale", weight_scale.float())
        self.register_buffer("bias", None if bias is None else bias.detach())

    def _check_scale(self, scale: torch.Tensor) -> None:
        if scale.shape != (self.out_features,):
            raise QuantizationError(f"{type(self).__name__}: expected weight_scale of shape ({self.out_features},), "
                                    f"got {tuple(scale.shape)}")

    def _apply(self, fn, recurse=True):
        """Module.to/cuda/half/...: scales and smoothing factors move but stay float32."""
        kept = {name: self._buffers[name] for name in self._FLOAT32_BUFFERS if self._buffers.get(name) is not None}
        super()._apply(fn, recurse)
        for name, original in kept.items():
            moved = self._buffers[name]
            if moved.dtype != torch.float32:
                self._buffers[name] = original.to(device=moved.device)
        return self

    def dequantize(self) -> torch.Tensor:
        """The float32 weight (out, in) this layer computes with (smoothing factors removed)."""
        return dequantize_int8(self.weight, self.weight_scale)

    @property
    def group_size(self) -> int | None:
        scale = self.weight_scale
        return None if scale.dim() == 1 else self.in_features // scale.shape[1]

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.group_size else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}{group}"


class Int8WeightOnlyLinear(QuantizedLinear):
    """y = x·(weight·weight_scale)ᵀ + bias; x (..., in) in any float dtype -> (..., out) same dtype."""

    mode = "int8_weight_only"

    def _check_scale(self, scale: torch.Tensor) -> None:
        out_f, in_f = self.out_features, self.in_features
        grouped = scale.dim() == 2 and scale.shape[0] == out_f and scale.shape[1] >= 1 and in_f % scale.shape[1] == 0
        if scale.shape != (out_f,) and not grouped:
            raise QuantizationError(
                f"Int8WeightOnlyLinear: expected weight_scale of shape ({out_f},) (per channel) or ({out_f}, G) "
                f"with G dividing {in_f} (group-wise), got {tuple(scale.shape)}"
            )

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, group_size: int | None = None, *, name: str = "linear"
    ) -> Int8WeightOnlyLinear:
        """Quantize ``linear``'s weight symmetrically: per output channel, or per group of
        ``group_size`` consecutive inputs (in_features must be a multiple of it)."""
        weight = _check_linear(linear, name)
        valid = isinstance(group_size, int) and not isinstance(group_size, bool) and group_size > 0
        if group_size is not None and not (valid and weight.shape[1] % group_size == 0):
            raise QuantizationError(
                f"layer {name!r}: group_size={group_size!r} does not divide in_features={weight.shape[1]}")
        qweight, scales = ops.quantize_int8(weight, group_size=group_size)
        return cls(qweight, scales, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.int8_linear(x, self.weight, self.weight_scale, self.bias)


class W8A8Linear(QuantizedLinear):
    """y = sx·sw·(xq·weightᵀ) + bias with xq, sx the per-token int8 quantization of x / input_smooth.
    x (..., in) float16/bfloat16/float32 -> (..., out) same dtype."""

    mode = "w8a8"
    _FLOAT32_BUFFERS = ("weight_scale", "input_smooth")

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
                 input_smooth: torch.Tensor | None = None) -> None:
        super().__init__(weight, weight_scale, bias)
        if input_smooth is not None and input_smooth.shape != (self.in_features,):
            raise QuantizationError(f"W8A8Linear: expected input_smooth of shape ({self.in_features},), "
                                    f"got {tuple(input_smooth.shape)}")
        _check_smooth_values(input_smooth)
        # a copy: layers sharing an input get equal factors, each stored on its own
        self.register_buffer("input_smooth", None if input_smooth is None else input_smooth.float().clone())
        # The factors are checked here and after each load_state_dict, not on every forward
        # (two device→host reads per layer per token).
        self.register_load_state_dict_post_hook(lambda module, keys: _check_smooth_values(module.input_smooth))

    @classmethod
    def from_linear(cls, linear: nn.Linear, smooth: torch.Tensor | None = None, *, name: str = "linear") -> W8A8Linear:
        """Quantize W·diag(smooth) per output channel (smooth (in,) > 0, or None for plain W8A8)."""
        weight = _check_linear(linear, name)
        if smooth is not None:
            smooth = smooth.to(device=weight.device, dtype=torch.float32)
            if smooth.shape != (weight.shape[1],) or not (torch.isfinite(smooth).all() and (smooth > 0).all()):
                raise QuantizationError(f"layer {name!r}: smoothing factors must be finite, > 0 and of shape "
                                        f"({weight.shape[1]},), got shape {tuple(smooth.shape)}")
            weight = weight.float() * smooth[None, :]
        qweight, scales = ops.quantize_int8(weight)
        return cls(qweight, scales, linear.bias, smooth)

    def dequantize(self) -> torch.Tensor:
        weight = dequantize_int8(self.weight, self.weight_scale)
        return weight if self.input_smooth is None else weight / self.input_smooth[None, :]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return w8a8_linear(x, self.weight, self.weight_scale, self.bias, self.input_smooth, check_values=False)

    def extra_repr(self) -> str:
        return super().extra_repr() + (", smooth=True" if self.input_smooth is not None else "")


QUANTIZED_LAYERS: dict[str, type[QuantizedLinear]] = {
    Int8WeightOnlyLinear.mode: Int8WeightOnlyLinear,
    W8A8Linear.mode: W8A8Linear,
}
