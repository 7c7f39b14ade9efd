"""Load and save Hugging Face checkpoint directories (config.json + safetensors), never pickle.

Files are written to a temporary name in the target directory and renamed into place, so an
interrupted save never leaves a half-written file under the final name.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fastlm._files import atomic_write, atomic_write_text
from fastlm.io.generation_config import read_generation_config, write_generation_config
from fastlm.config import ModelConfig
from fastlm.io import validate
from fastlm.io.hf_format import (
    CheckpointError,
    config_from_hf,
    config_to_hf,
    resolve_tied_head,
    state_dict_from_hf,
    state_dict_to_hf,
)
from fastlm.model import Model

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
_UNSAFE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.bin")


def read_hf_config(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / "config.json"
    if not path.is_file():
        reason = validate.not_a_model_reason(directory)
        raise (FileNotFoundError if not Path(directory).exists() else CheckpointError)(reason)
    config = validate.read_json_file(path)
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return config


def _weight_files(directory: Path) -> list[Path]:
    single, index = directory / WEIGHTS_NAME, directory / INDEX_NAME
    if single.is_file():
        return [single]
    if index.is_file():
        content = validate.read_json_file(index)
        weight_map = content.get("weight_map") if isinstance(content, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index} has no 'weight_map'")
        files = [directory / name for name in sorted(set(weight_map.values()))]
        missing = [str(p) for p in files if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"shard(s) named in {index} are missing: {', '.join(missing)}")
        return files
    unsafe = [name for name in _UNSAFE_WEIGHTS if (directory / name).exists()]
    if unsafe:
        raise CheckpointError(
            f"{directory} holds only pickle weights ({', '.join(unsafe)}); fastlm loads safetensors only. "
            "Convert them with transformers: model.save_pretrained(dir, safe_serialization=True)"
        )
    raise FileNotFoundError(f"no {WEIGHTS_NAME} or {INDEX_NAME} in {directory}")


def read_safetensors(directory: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory (single file or shards), on CPU."""
    tensors: dict[str, torch.Tensor] = {}
    for path in _weight_files(Path(directory)):
        validate.verify_safetensors(path)  # a damaged file: one error naming it, not a SafetensorError
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():
                if name in tensors:
                    raise CheckpointError(f"tensor {name!r} appears in more than one shard ({path.name})")
                tensors[name] = f.get_tensor(name)
    return tensors


def from_pretrained(
    directory: str | Path,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> Model:
    """Load a Hugging Face checkpoint directory of a supported family (see
    :data:`fastlm.io.families.ARCH_BY_HF_NAME`).

    dtype None: the config's ``torch_dtype`` (``dtype`` in transformers 5), else the dtype the
    tensors are stored in (the most common one if they differ); device None means CPU. Raises
    ValueError for an unknown architecture (listing the supported ones) or a GPTQ/AWQ-quantized
    checkpoint, and CheckpointError naming any missing, extra or mis-shaped tensor.
    """
    directory = Path(directory)
    hf_config = read_hf_config(directory)
    if "quantization" in hf_config:  # written by a quantized model's save_pretrained
        from fastlm.quant.checkpoint import load_quantized

        return load_quantized(directory, dtype=dtype, device=device)
    if hf_config.get("quantization_config"):
        method = (hf_config["quantization_config"] or {}).get("quant_method", "unknown")
        raise CheckpointError(f"{directory} is a {method}-quantized checkpoint (quantization_config in config.json, "
                              "e.g. GPTQ/AWQ); fastlm loads only unquantized float checkpoints (and its own int8 "
                              "format): load the original float weights")
    config = config_from_hf(hf_config)
    hf_tensors = read_safetensors(directory)
    config = resolve_tied_head(config, hf_tensors)
    if dtype is None:
        dtype = _checkpoint_dtype(hf_config, hf_tensors)
    state = state_dict_from_hf(config, hf_tensors)
    with torch.device("meta"):
        model = Model(config)
    expected = model.state_dict()
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise CheckpointError(
                f"tensor for {name!r} has shape {tuple(tensor.shape)}, expected {tuple(expected[name].shape)} "
                f"from config.json"
            )
    device = torch.device("cpu") if device is None else torch.device(device)
    converted: dict[int, torch.Tensor] = {}  # keep tied tensors tied: convert each storage once
    state = {n: converted.setdefault(id(t), t.to(device=device, dtype=dtype).contiguous()) for n, t in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed.weight
    model.generation_config = read_generation_config(directory)  # generate()'s defaults; None without the file
    return model.eval()


def _checkpoint_dtype(hf_config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> torch.dtype:
    """The dtype a checkpoint loads in by default: config.json's torch_dtype / dtype, else the
    stored floating dtype (the one holding most elements when they differ)."""
    name = hf_config.get("torch_dtype") or hf_config.get("dtype")
    if isinstance(name, str) and name not in ("auto", "float8_e4m3fn"):
        dtype = getattr(torch, name.removeprefix("torch."), None)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise CheckpointError(f"config.json torch_dtype {name!r} is not a floating-point torch dtype")
        return dtype
    counts: dict[torch.dtype, int] = {}
    for t in tensors.values():
        if t.dtype.is_floating_point:
            counts[t.dtype] = counts.get(t.dtype, 0) + t.numel()
    if len(counts) > 1:
        logger.warning("checkpoint mixes dtypes %s and its config.json names none; loading in %s",
                       sorted(map(str, counts)), max(counts, key=counts.get))
    return max(counts, key=counts.get) if counts else torch.float32


def save_pretrained(
    model: Model,
    directory: str | Path,
    *,
    max_shard_bytes: int = 5 * 1024**3,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write config.json and safetensors weights that transformers loads as the same model.

    Weights above ``max_shard_bytes`` are split into shards with an index, as transformers does.
    ``state_dict`` overrides the model's own (e.g. the full weights gathered from a sharded
    FSDP model, whose own state dict holds only shards).
    """
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be > 0, got {max_shard_bytes}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = model.state_dict() if state_dict is None else state_dict
    if any(name.endswith(".weight_scale") for name in state):
        raise CheckpointError("the model has quantized layers; save it with fastlm.quant.save_quantized")
    tensors = {n: t.cpu() for n, t in state_dict_to_hf(model.config, state).items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    metadata = {"format": "pt"}
    if len(shards) == 1:
        atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(shards[0], tmp, metadata=metadata))
        (directory / INDEX_NAME).unlink(missing_ok=True)  # a stale index from an earlier sharded save
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            atomic_write(directory / name, lambda tmp, shard=shard: save_file(shard, tmp, metadata=metadata))
            weight_map.update(dict.fromkeys(shard, name))
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        atomic_write_text(directory / INDEX_NAME, json.dumps(index, indent=2))
        (directory / WEIGHTS_NAME).unlink(missing_ok=True)  # a stale single file would shadow the shards
    write_generation_config(getattr(model, "generation_config", None), directory)
    # The config goes last: a directory with a config.json always has its weights complete.
    hf_config = config_to_hf(model.config, next(iter(tensors.values())).dtype)
    atomic_write_text(directory / "config.json", json.dumps(hf_config, indent=2))
    logger.debug("saved %s checkpoint to %s", model.config.arch, directory)


def load_config(directory: str | Path) -> ModelConfig:
    """The ModelConfig of a checkpoint directory, without reading its weights."""
    return config_from_hf(read_hf_config(directory))
