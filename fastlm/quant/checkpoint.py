"""Quantized checkpoints: Hugging Face directories with int8 weights, scales and a quantization entry.

``model.save_pretrained(dir)`` on a quantized model writes one (``save_quantized`` is the same
function under its explicit name) and ``fastlm.from_pretrained(dir)`` reads it back through
``load_quantized``, with bit-identical outputs.

Layout (``save_quantized``):

* ``model.safetensors``: every tensor under its Hugging Face name (fastlm.io's mapping); a
  quantized layer's weight is stored as int8 in the layout of the float weight it replaces
  (split into q/k/v, gate/up where Hugging Face stores them apart; GPT-2: transposed Conv1D,
  q/k/v fused in ``c_attn``), with ``<weight name>_scale`` (float32, (out,) or (out,
  in/group_size): the rows of the scales that go with that weight's rows) and, for SmoothQuant
  layers, ``<module name>.input_smooth`` (float32, (in,); the same vector for each projection of
  a fused layer).
* ``config.json``: the model's config plus ``"quantization"``::

      {"format": "fastlm-int8", "version": 2, "dtype": "bfloat16",
       "modules": {"layers.0.attn.qkv_proj": {"mode": "w8a8", "group_size": null, "smooth": true}, ...}}

  Version 1 (written before q/k/v and gate/up were fused) named the projections apart
  (``layers.0.attn.q_proj``, ...); it is still read: the projections of one fused layer must all
  be listed, quantized the same way.

``load_quantized`` rebuilds the model with the quantized layers in place and loads the tensors
as stored (int8 stays int8; no float weight is materialized), so outputs are bit-identical to
the saved model's on the same device and backend.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from fastlm._files import atomic_write, atomic_write_text
from fastlm.io.checkpoint import INDEX_NAME, WEIGHTS_NAME, read_hf_config, read_safetensors
from fastlm.io.hf_format import (
    CheckpointError,
    config_from_hf,
    config_to_hf,
    hf_parts,
    state_dict_from_hf,
    state_dict_to_hf,
)
from fastlm.model import Model, packed_modules
from fastlm.quant.layers import QUANTIZED_LAYERS, QUANTIZED_SUFFIXES, QuantizedLinear, W8A8Linear
from fastlm.quant.quantize import quantized_layers

logger = logging.getLogger(__name__)

FORMAT = "fastlm-int8"
VERSION = 2
READABLE_VERSIONS = (1, 2)
CONFIG_KEY = "quantization"


def quantization_info(model: Model) -> dict[str, Any]:
    """The config.json "quantization" entry of a quantized model."""
    layers = quantized_layers(model)
    if not layers:
        raise ValueError("save_quantized: the model has no quantized layer; use fastlm.save_pretrained")
    return {
        "format": FORMAT,
        "version": VERSION,
        "dtype": str(model.dtype).removeprefix("torch."),
        "modules": {
            name: {"mode": m.mode, "group_size": m.group_size,
                   "smooth": isinstance(m, W8A8Linear) and m.input_smooth is not None}
            for name, m in layers.items()
        },
    }


def save_quantized(model: Model, directory: str | Path) -> None:
    """Write a quantized model as safetensors + config.json (module docstring). Files are written
    to temporary names and renamed into place; config.json goes last."""
    directory = Path(directory)
    info = quantization_info(model)
    state = {n: t.detach() for n, t in model.state_dict().items()}
    main = {n: t for n, t in state.items() if not n.endswith(QUANTIZED_SUFFIXES)}
    parts = hf_parts(model.config)
    layers = quantized_layers(model)
    tensors: dict[str, torch.Tensor] = {}
    for name in layers:
        scale, smooth = state[f"{name}.weight_scale"], state.get(f"{name}.input_smooth")
        for hf_name, start, stop in parts[f"{name}.weight"]:
            tensors[hf_name + "_scale"] = scale[start:stop]
            if smooth is not None:
                tensors[hf_name.removesuffix(".weight") + ".input_smooth"] = smooth.clone()  # no shared storage
    tensors.update(state_dict_to_hf(model.config, main))
    tensors = {n: t.cpu().contiguous() for n, t in tensors.items()}
    directory.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt", "quantization": FORMAT}
    atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    (directory / INDEX_NAME).unlink(missing_ok=True)  # a stale index would shadow the single file
    hf_config = config_to_hf(model.config, model.dtype)
    hf_config[CONFIG_KEY] = info
    atomic_write_text(directory / "config.json", json.dumps(hf_config, indent=2))
    logger.debug("saved quantized %s checkpoint (%d quantized layers) to %s", model.config.arch, len(layers), directory)


def _check_info(info: Any, directory: Path) -> dict[str, dict]:
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise CheckpointError(f"{directory}/config.json: '{CONFIG_KEY}' is not a {FORMAT} entry: {info!r}")
    if info.get("version") not in READABLE_VERSIONS:
        raise CheckpointError(f"{directory}: {FORMAT} version {info.get('version')!r} is not supported "
                              f"(expected one of {READABLE_VERSIONS})")
    modules = info.get("modules")
    if not isinstance(modules, dict) or not modules:
        raise CheckpointError(f"{directory}/config.json: '{CONFIG_KEY}.modules' must name the quantized layers")
    for name, spec in modules.items():
        if not isinstance(spec, dict) or spec.get("mode") not in QUANTIZED_LAYERS:
            raise CheckpointError(f"{directory}: layer {name!r} has an unknown quantization {spec!r}; "
                                  f"modes are {', '.join(QUANTIZED_LAYERS)}")
    return modules


def _fused_specs(modules: dict[str, dict], packed: dict, directory: Path) -> dict[str, dict]:
    """The "modules" entry with projections named apart (version 1: layers.0.attn.q_proj, ...)
    replaced by their fused layer; CheckpointError if only some of a fused layer's projections are
    listed, or listed quantized differently (one fused weight cannot be)."""
    out = dict(modules)
    for fused, parts in packed.items():
        names = [name for name, _, _ in parts]
        listed = [n for n in names if n in modules]
        if not listed:
            continue
        specs = [modules[n] for n in listed]
        if len(listed) != len(names) or any(spec != specs[0] for spec in specs):
            raise CheckpointError(f"{directory}: {', '.join(names)} are one fused layer in fastlm ({fused}); the "
                                  f"quantization entry must list all of them, quantized the same way, got "
                                  f"{ {n: modules[n] for n in listed} }")
        if fused in modules and modules[fused] != specs[0]:
            raise CheckpointError(f"{directory}: {fused} is listed both fused and as {', '.join(names)}, differently")
        for n in names:
            del out[n]
        out[fused] = specs[0]
    return out


def _placeholder(spec: dict, linear: torch.nn.Linear) -> QuantizedLinear:
    """A quantized layer of the right kind and shapes on the meta device (filled by load_state_dict)."""
    out_f, in_f = linear.weight.shape
    group = spec.get("group_size")
    if group is not None and (not isinstance(group, int) or group < 1 or in_f % group):
        raise CheckpointError(f"group_size {group!r} does not divide in_features={in_f}")
    with torch.device("meta"):
        weight = torch.empty(out_f, in_f, dtype=torch.int8)
        scale = torch.empty(out_f) if group is None else torch.empty(out_f, in_f // group)
        bias = None if linear.bias is None else torch.empty(out_f)
        if spec["mode"] == "w8a8":
            return W8A8Linear(weight, scale, bias, torch.empty(in_f) if spec.get("smooth") else None)
        return QUANTIZED_LAYERS[spec["mode"]](weight, scale, bias)


def load_quantized(
    directory: str | Path, *, dtype: torch.dtype | None = None, device: torch.device | str | None = None
) -> Model:
    """Load a directory written by :func:`save_quantized`. ``dtype`` (default: the saved model's)
    applies to the float tensors; int8 weights, scales and smoothing factors keep theirs.
    Raises CheckpointError naming any missing, unexpected or mis-shaped tensor."""
    directory = Path(directory)
    hf_config = read_hf_config(directory)
    if CONFIG_KEY not in hf_config:
        raise CheckpointError(f"{directory} is not a quantized checkpoint (no '{CONFIG_KEY}' in config.json); "
                              "load it with fastlm.from_pretrained")
    modules = _check_info(hf_config[CONFIG_KEY], directory)
    config = config_from_hf(hf_config)
    if dtype is None:
        dtype = getattr(torch, str(hf_config[CONFIG_KEY].get("dtype", "float32")), None)
        if not isinstance(dtype, torch.dtype):
            raise CheckpointError(f"{directory}: unknown dtype {hf_config[CONFIG_KEY].get('dtype')!r}")
    tensors = read_safetensors(directory)
    extras = {n: t for n, t in tensors.items() if n.endswith(("_scale", ".input_smooth"))}
    state = state_dict_from_hf(config, {n: t for n, t in tensors.items() if n not in extras})

    with torch.device("meta"):
        model = Model(config)
    modules = _fused_specs(modules, packed_modules(model), directory)
    for name, spec in modules.items():
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"{directory}: quantized layer {name!r} does not exist in this model") from None
        if not isinstance(linear, torch.nn.Linear):
            raise CheckpointError(f"{directory}: {name!r} is a {type(linear).__name__}, not a linear layer")
        try:
            placeholder = _placeholder(spec, linear)
        except CheckpointError as err:
            raise CheckpointError(f"{directory}: layer {name!r}: {err}") from None
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, placeholder)

    parts = hf_parts(config)
    used: set[str] = set()
    for name, spec in modules.items():
        scales, smooths = [], []
        for hf_name, start, stop in parts[f"{name}.weight"]:
            key = hf_name + "_scale"
            if key not in extras:
                raise CheckpointError(f"{directory}: checkpoint is missing tensor {key!r}")
            if extras[key].shape[0] != stop - start:
                raise CheckpointError(f"{directory}: tensor {key!r} has shape {tuple(extras[key].shape)}, expected "
                                      f"{stop - start} rows (one per output feature)")
            scales.append(extras[key])
            used.add(key)
            if spec.get("smooth"):
                smooth_key = hf_name.removesuffix(".weight") + ".input_smooth"
                if smooth_key not in extras:
                    raise CheckpointError(f"{directory}: checkpoint is missing tensor {smooth_key!r}")
                smooths.append(extras[smooth_key])
                used.add(smooth_key)
        state[f"{name}.weight_scale"] = scales[0] if len(scales) == 1 else torch.cat(scales, dim=0)
        if smooths:
            if any(t.shape != smooths[0].shape or not torch.equal(t, smooths[0]) for t in smooths[1:]):
                raise CheckpointError(f"{directory}: the projections of {name!r} are one fused layer but their "
                                      "input_smooth tensors differ (one set of smoothing factors is needed)")
            state[f"{name}.input_smooth"] = smooths[0].clone()
    unexpected = sorted(set(extras) - used)
    if unexpected:
        raise CheckpointError(f"{directory}: checkpoint has unexpected tensor(s): {', '.join(unexpected[:5])}")

    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    if missing:
        raise CheckpointError(f"{directory}: checkpoint is missing tensor(s) for: {', '.join(missing[:5])}")
    for name, tensor in state.items():
        want = expected[name]
        if tensor.shape != want.shape:
            raise CheckpointError(f"{directory}: tensor for {name!r} has shape {tuple(tensor.shape)}, "
                                  f"expected {tuple(want.shape)}")
        if (want.dtype == torch.int8) != (tensor.dtype == torch.int8):
            raise CheckpointError(f"{directory}: tensor for {name!r} is {tensor.dtype}, expected "
                                  f"{'int8' if want.dtype == torch.int8 else 'a float tensor'}")
    device = torch.device("cpu") if device is None else torch.device(device)
    converted: dict[int, torch.Tensor] = {}  # tied tensors stay tied: convert each storage once

    def convert(name: str, t: torch.Tensor) -> torch.Tensor:
        keep = t.dtype == torch.int8 or name.endswith(QUANTIZED_SUFFIXES)
        target = t.to(device=device, dtype=None if keep else dtype)
        return converted.setdefault(id(t), target.contiguous())

    model.load_state_dict({n: convert(n, t) for n, t in state.items()}, strict=True, assign=True)
    if config.tie_word_embeddings and isinstance(model.lm_head, torch.nn.Linear):
        model.lm_head.weight = model.embed.weight
    return model.eval()
