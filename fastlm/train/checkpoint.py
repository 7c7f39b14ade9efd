"""Training checkpoints that survive a kill at any moment.

A checkpoint is a directory ``<out>/checkpoints/step-00000120/`` holding the model as a Hugging
Face checkpoint (config.json + safetensors, usable on its own) and ``trainer_state.pt``
(optimizer, scheduler, grad scaler, RNG states, step and data position; loaded with
``weights_only=True``). It is written under a temporary name, completed with a ``COMPLETE``
marker, and renamed into place, so a kill leaves either the whole new checkpoint or none of it;
the previous ones are untouched. The marker holds a manifest (size and SHA-256 of every file):
a new checkpoint is verified against it after the rename, and only then are older ones pruned
(the last ``keep_last`` are kept; never one with a higher step than the new one). Resuming takes
the newest checkpoint that verifies; a damaged one is moved aside to ``damaged-step-*`` with a
warning. Every file of a checkpoint gets the same permissions (0666 less the umask).
"""

from __future__ import annotations

import hashlib
import json
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


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _manifest(directory: Path) -> dict[str, dict[str, Any]]:
    """{file name: {"size", "sha256"}} of the files directly in ``directory`` (the marker excluded)."""
    files = {}
    for path in sorted(directory.iterdir()):
        if path.is_file() and path.name != MARKER:
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    digest.update(block)
            files[path.name] = {"size": path.stat().st_size, "sha256": digest.hexdigest()}
    return files


def verify_checkpoint(path: str | Path) -> str | None:
    """None if the checkpoint at ``path`` is intact, else why not (one line).

    Intact: the COMPLETE marker is there and, when it holds a manifest (checkpoints written by
    this version), every listed file has its recorded size and SHA-256; the safetensors files
    are complete (header and size) and trainer_state.pt is present.
    """
    from fastlm.io.hf_format import CheckpointError
    from fastlm.io.validate import verify_safetensors

    path = Path(path)
    marker = path / MARKER
    if not marker.is_file():
        return f"{path} has no {MARKER} marker (an interrupted save)"
    try:
        manifest = json.loads(marker.read_text()).get("files")
    except (ValueError, AttributeError):  # the plain "<step>" marker of older checkpoints
        manifest = None
    if manifest is not None:
        actual = _manifest(path)
        for name, expected in manifest.items():
            if name not in actual:
                return f"{path / name} is missing"
            if actual[name] != expected:
                return (f"{path / name} is damaged ({actual[name]['size']} bytes, expected {expected['size']}, "
                        "or its checksum differs)")
    if not (path / STATE_FILE).is_file():
        return f"{path / STATE_FILE} is missing"
    for weights in sorted(path.glob("*.safetensors")):
        try:
            verify_safetensors(weights)
        except CheckpointError as err:
            return str(err)
    return None


def write_checkpoint(out: str | Path, step: int, write_files: Callable[[Path], None], keep_last: int) -> Path:
    """Create ``step-<step>`` atomically: ``write_files(tmp_dir)`` fills a temporary directory,
    whose files get the same permissions, which is fsynced, marked complete (with a manifest)
    and renamed into place; once the new checkpoint verifies, older checkpoints beyond
    ``keep_last`` are pruned (never one with a higher step)."""
    root = checkpoint_dir(out)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        write_files(tmp)
        mode = 0o666 & ~_umask()
        for path in tmp.iterdir():
            if path.is_file():
                os.chmod(path, mode)
        (tmp / MARKER).write_text(json.dumps({"step": step, "files": _manifest(tmp)}, indent=1) + "\n")
        os.chmod(tmp / MARKER, mode)
        _fsync_tree(tmp)
        if final.exists():  # a checkpoint of this step from an earlier, interrupted run
            _remove(final)
        os.rename(tmp, final)
        _fsync_tree(root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    problem = verify_checkpoint(final)
    if problem is not None:
        raise OSError(f"the checkpoint just written does not verify: {problem}; older checkpoints are kept")
    older = [p for p in complete_checkpoints(out) if _step_of(p) < step]
    for old in older[: max(0, len(older) - (keep_last - 1))]:
        _remove(old)
    return final


def _step_of(path: Path) -> int:
    return int(_NAME.match(path.name).group(1))


def latest_intact_checkpoint(out: str | Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest checkpoint under ``out`` that verifies, and the newer (damaged) ones skipped
    with the reason for each. Nothing is moved or deleted."""
    skipped: list[tuple[Path, str]] = []
    for path in reversed(complete_checkpoints(out)):
        problem = verify_checkpoint(path)
        if problem is None:
            return path, skipped
        skipped.append((path, problem))
    return None, skipped


def set_aside(path: Path) -> Path:
    """Rename a damaged checkpoint to ``damaged-<name>`` (kept for inspection; no longer counted
    as a checkpoint, so it is neither resumed from nor pruned)."""
    target = path.with_name(f"damaged-{path.name}")
    if target.exists():
        target = path.with_name(f"damaged-{path.name}-{uuid.uuid4().hex[:8]}")
    os.rename(path, target)
    return target


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
