"""Checks that turn a wrong or damaged checkpoint path into one clear error naming the file.

Every function raises :class:`~fastlm.io.hf_format.CheckpointError` (a ValueError) or
FileNotFoundError with a message that says what was found and what was expected:
a zero-byte, truncated or garbage safetensors file; a config.json that is not JSON; a training
run directory given where a checkpoint is expected (the checkpoints it holds are listed); a PEFT
adapter directory given as a model. ``what`` names the path for the reader (``"--model"`` from
the command line, ``"directory"`` from the Python API).

The safetensors layout checked: 8 bytes little-endian header length N, N bytes of JSON header
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``, then the
data buffer, which the offsets must cover exactly (``max end == file size - 8 - N``).
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import Any

from fastlm.io.hf_format import CheckpointError

_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the header size
_STEP = re.compile(r"^step-\d{8}$")


def verify_safetensors(path: str | Path) -> None:
    """Raise CheckpointError naming ``path`` if it is not a complete safetensors file."""
    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): the checkpoint is damaged or was not fully written")
    if size < 8:
        raise CheckpointError(f"{path} is truncated ({size} bytes): not a safetensors file")
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        if length > min(_MAX_HEADER, size - 8):
            raise CheckpointError(f"{path} is not a valid safetensors file (header of {length} bytes in a file of "
                                  f"{size}): damaged, truncated or another format")
        raw = f.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{path} is not a valid safetensors file (its header is not JSON): damaged or "
                              "another format") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is not a valid safetensors file (its header is not a JSON object)")
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise CheckpointError(f"{path} is not a valid safetensors file (tensor {name!r} has no data offsets)")
        end = max(end, offsets[1])
    available = size - 8 - length
    if end > available:
        raise CheckpointError(f"{path} is truncated: its tensors need {end} bytes of data, the file holds "
                              f"{available}; the checkpoint is damaged or was not fully written")
    if end < available:
        raise CheckpointError(f"{path} is not a valid safetensors file ({available - end} bytes of trailing data)")


def read_json_file(path: str | Path) -> Any:
    """The JSON content of ``path``; a file that is not UTF-8 JSON raises CheckpointError naming it."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})") from None
    except UnicodeDecodeError:
        raise CheckpointError(f"{path} is not valid JSON (not UTF-8 text)") from None


def run_checkpoints(directory: str | Path) -> list[Path]:
    """Step checkpoints of a training run directory (``<dir>/checkpoints/step-*``), oldest first."""
    root = Path(directory) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if _STEP.match(p.name) and p.is_dir())


def not_a_model_reason(directory: str | Path, what: str = "directory") -> str | None:
    """Why ``directory`` is not a model checkpoint directory (None when it has a config.json)."""
    directory = Path(directory)
    if not directory.exists():
        return f"{what} {directory}: no such directory"
    if not directory.is_dir():
        return f"{what} {directory} is a file; expected a checkpoint directory (config.json + model.safetensors)"
    if (directory / "config.json").is_file():
        return None
    if (directory / "adapter_config.json").is_file():
        base = None
        try:
            base = read_json_file(directory / "adapter_config.json").get("base_model_name_or_path")
        except (CheckpointError, AttributeError):
            pass
        hint = f" (its base model: {base})" if base else ""
        return (f"{what} {directory} is a PEFT adapter, not a model: give its base model as the model and "
                f"this folder as the adapter (fastlm generate --model BASE --adapter {directory}){hint}")
    steps = run_checkpoints(directory)
    if steps:
        shown = ", ".join(p.name for p in steps[-3:])
        return (f"{what} {directory} is a training run directory, not a checkpoint; it holds "
                f"{len(steps)} checkpoint(s) ({shown}): give one, e.g. {steps[-1]}")
    if (directory / "checkpoints").is_dir() or (directory / "metrics.jsonl").is_file():
        return f"{what} {directory} is a training run directory that holds no checkpoint yet"
    return f"{what} {directory} has no config.json: expected a Hugging Face checkpoint directory"


def check_model_dir(directory: str | Path, what: str = "directory") -> Path:
    """Raise a clear error unless ``directory`` is a readable model checkpoint: config.json is
    JSON and every safetensors file is complete (cheap: headers and sizes only)."""
    reason = not_a_model_reason(directory, what)
    directory = Path(directory)
    if reason is not None:
        error = FileNotFoundError if not directory.exists() else CheckpointError
        raise error(reason)
    config = read_json_file(directory / "config.json")
    if not isinstance(config, dict):
        raise CheckpointError(f"{directory / 'config.json'} must hold a JSON object")
    for path in sorted(directory.glob("*.safetensors")):
        verify_safetensors(path)
    return directory


def check_adapter_dir(directory: str | Path, what: str = "adapter") -> Path:
    """Raise a clear error unless ``directory`` holds a PEFT adapter (adapter_config.json + weights)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{what} {directory}: no such directory")
    if not (directory / "adapter_config.json").is_file():
        steps = run_checkpoints(directory)
        if steps:
            raise CheckpointError(f"{what} {directory} is a training run directory; it holds {len(steps)} "
                                  f"checkpoint(s): give one, e.g. {steps[-1]}")
        raise CheckpointError(f"{what} {directory} has no adapter_config.json: expected a PEFT adapter directory")
    read_json_file(directory / "adapter_config.json")
    for path in sorted(directory.glob("*.safetensors")):
        verify_safetensors(path)
    return directory
