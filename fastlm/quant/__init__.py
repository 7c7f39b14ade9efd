"""Post-training quantization and pruning of fastlm models (the model never imports this package).

>>> fastlm.quantize(model, mode="int8_weight_only")            # or "w8a8", group_size=128, ...
>>> fastlm.quant.save_quantized(model, "out/")                 # int8 safetensors + config entry
>>> model = fastlm.quant.load_quantized("out/")
>>> fastlm.quant.prune_2_4(model)                              # -> SparsityReport
"""

from fastlm.quant.checkpoint import load_quantized, quantization_info, save_quantized
from fastlm.quant.layers import Int8WeightOnlyLinear, QuantizationError, QuantizedLinear, W8A8Linear
from fastlm.quant.pruning import SparsityReport, is_2_4, prune_2_4, prune_magnitude, sparsity_report, to_semi_structured
from fastlm.quant.quantize import MODES, QuantConfig, activation_maxima, quantize, quantized_layers, smoothquant_factors
from fastlm.quant.report import accuracy_report, model_bytes

__all__ = [
    "MODES",
    "Int8WeightOnlyLinear",
    "QuantConfig",
    "QuantizationError",
    "QuantizedLinear",
    "SparsityReport",
    "W8A8Linear",
    "accuracy_report",
    "activation_maxima",
    "is_2_4",
    "load_quantized",
    "model_bytes",
    "prune_2_4",
    "prune_magnitude",
    "quantization_info",
    "quantize",
    "quantized_layers",
    "save_quantized",
    "smoothquant_factors",
    "sparsity_report",
    "to_semi_structured",
]
