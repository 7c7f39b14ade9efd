"""Training checkpoints that survive a kill at any moment.

A checkpoint is a directory ``<out>/checkpoints/step-00000120/`` holding the model as a Hugging
Face checkpoint (config.json + safetensors, usable on its own) and ``trainer_state.pt``
(optimizer, scheduler, grad scaler, RNG states, step and data position; loaded with
``weights_only=True``). It is written under a temporary name, completed with a ``COMPLETE``
marker, and renamed into place, so a kill leaves either the whole new checkpoint or none of it;
the previous ones are untouched. Only the last ``keep_last`` complete checkpoints are kept.
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

MARKER = "COMPLETE"
STATE_FILE = "trainer_state.pt"
_NAME = re.compile(r"^step-(\d{8})$")


def checkpoint_dir(out: str | Path) -> Path:
    return Path(out) / "checkpoints"


def complete_checkpoints(out: str | Path) -> list[Path]:
    """Complete checkpoints under ``out``, oldest first (temporary and partial ones are ignored)."""
    root = checkpoint_dir(out)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _NAME.match(p.name) and (p / MARKER).is_file()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def latest_checkpoint(out: str | Path) -> Path | None:
    found = complete_checkpoints(out)
    return found[-1] if found else None


def _fsync_tree(directory: Path) -> None:
    for path in directory.iterdir():
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_checkpoint(out: str | Path, step: int, write_files: Callable[[Path], None], keep_last: int) -> Path:
    """Create ``step-<step>`` atomically: ``write_files(tmp_dir)`` fills a temporary directory,
    which is fsynced, marked complete and renamed into place; then old checkpoints are pruned."""
    root = checkpoint_dir(out)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        write_files(tmp)
        (tmp / MARKER).write_text(f"{step}\n")
        _fsync_tree(tmp)
        if final.exists():  # a checkpoint of this step from an earlier, interrupted run
            _remove(final)
        os.rename(tmp, final)
        _fsync_tree(root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    for old in complete_checkpoints(out)[:-keep_last]:
        _remove(old)
    return final


def _remove(path: Path) -> None:
    """Rename away first, so a kill during deletion never leaves a partial checkpoint under its name."""
    trash = path.with_name(f".trash-{path.name}-{uuid.uuid4().hex[:8]}")
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def clean_temporaries(out: str | Path) -> None:
    """Remove what interrupted saves left behind (temporary and half-deleted directories)."""
    root = checkpoint_dir(out)
    if root.is_dir():
        for path in root.iterdir():
            if path.name.startswith((".tmp-", ".trash-")):
                shutil.rmtree(path, ignore_errors=True)


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(value):
    """random.setstate wants nested tuples; a round trip may give lists."""
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def save_trainer_state(directory: Path, state: dict[str, Any]) -> None:
    torch.save(state, directory / STATE_FILE)


def load_trainer_state(directory: Path) -> dict[str, Any]:
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: {directory} is not a fastlm training checkpoint")
    return torch.load(path, map_location="cpu", weights_only=True)
