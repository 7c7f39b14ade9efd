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
from fastlm.config import ModelConfig
from fastlm.io.hf_format import CheckpointError, config_from_hf, config_to_hf, state_dict_from_hf, state_dict_to_hf
from fastlm.model import Model

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
_UNSAFE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.bin")


def read_hf_config(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in {directory}; expected a Hugging Face checkpoint directory")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _weight_files(directory: Path) -> list[Path]:
    single, index = directory / WEIGHTS_NAME, directory / INDEX_NAME
    if single.is_file():
        return [single]
    if index.is_file():
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f).get("weight_map")
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
    """Load a LlamaForCausalLM or GPT2LMHeadModel checkpoint directory.

    dtype None keeps the dtype stored in the checkpoint; device None means CPU. Raises
    ValueError for an unknown architecture and CheckpointError naming any missing, extra or
    mis-shaped tensor.
    """
    directory = Path(directory)
    hf_config = read_hf_config(directory)
    if "quantization" in hf_config:  # written by a quantized model's save_pretrained
        from fastlm.quant.checkpoint import load_quantized

        return load_quantized(directory, dtype=dtype, device=device)
    config = config_from_hf(hf_config)
    hf_tensors = read_safetensors(directory)
    if dtype is None:
        floating = [t.dtype for t in hf_tensors.values() if t.dtype.is_floating_point]
        dtype = floating[0] if floating else torch.float32
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
    return model.eval()


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
    # The config goes last: a directory with a config.json always has its weights complete.
    hf_config = config_to_hf(model.config, next(iter(tensors.values())).dtype)
    atomic_write_text(directory / "config.json", json.dumps(hf_config, indent=2))
    logger.debug("saved %s checkpoint to %s", model.config.arch, directory)


def load_config(directory: str | Path) -> ModelConfig:
    """The ModelConfig of a checkpoint directory, without reading its weights."""
    return config_from_hf(read_hf_config(directory))
