"""Run directories: never mix two runs in one ``out``, and resume only the run that was started.

- :func:`prepare_out`: a fresh run needs an empty (or new) ``out``; an ``out`` holding anything
  is refused (nothing touched) unless ``resume`` (continue it) or ``overwrite`` (replace it: the
  old run is renamed away in one step, then deleted, so a kill leaves the old run or the new one,
  never a mix).
- :func:`check_resume`: a run records its settings in ``<out>/run.json``; resuming compares the
  current settings with them, per setting (see :data:`REFUSED` and the README's table):

  * refused (:class:`ResumeMismatchError`): settings that change what is trained or the
    learning-rate schedule already followed: the data (content fingerprint), tokenizer,
    model/preset, sequence length, objective, template, adapter settings, batch size, gradient
    accumulation, seed, max_steps (the schedule is defined over it; allowed with the constant
    schedule), warmup, schedule, lr, min_lr_ratio;
  * reported (a warning, then used): settings that change how, not what — precision, weight
    decay, gradient clipping, evaluation and saving cadence, keep_last, compile, activation
    checkpointing, fused loss, NaN policy, device, FSDP.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fastlm._files import atomic_write_text
from fastlm._naming import shown

logger = logging.getLogger(__name__)

RUN_FILE = "run.json"
#: Settings whose change on resume is refused (all others are reported and used).
REFUSED = frozenset({
    "command", "data", "data_fingerprint", "tokenizer", "vocab_size", "preset", "model", "seq_len", "objective",
    "document_masking", "template", "truncation", "val_data", "val_fraction", "max_corpus_bytes", "method",
    "lora_r", "lora_alpha", "lora_dropout", "lora_targets", "num_virtual_tokens", "batch_size", "grad_accum",
    "seed", "max_steps", "warmup_steps", "schedule", "lr", "min_lr_ratio", "betas",
})
_IGNORED = frozenset({"out", "progress"})


class RunDirectoryError(ValueError):
    """``out`` holds another run (or is not a directory) and neither resume nor overwrite was asked."""


class ResumeMismatchError(ValueError):
    """Resuming with settings that differ from the run's in a way that changes what it trains."""


def prepare_out(out: str | Path, *, resume: bool, overwrite: bool, is_main: bool = True) -> Path:
    """Make ``out`` ready for a run (see the module docstring). Returns it as a Path."""
    out = Path(out)
    if resume and overwrite:
        raise RunDirectoryError(f"{shown('resume')} and {shown('overwrite')} exclude each other: continue the run "
                                f"in {out} or replace it")
    if out.exists() and not out.is_dir():
        raise RunDirectoryError(f"{shown('out')} {out} is a file; expected a directory for the run")
    if resume or not out.exists() or not any(out.iterdir()):
        if is_main:
            out.mkdir(parents=True, exist_ok=True)
        return out
    if not overwrite:
        held = sorted(p.name + ("/" if p.is_dir() else "") for p in out.iterdir())
        listed = ", ".join(held[:4]) + (", ..." if len(held) > 4 else "")
        raise RunDirectoryError(
            f"{shown('out')} {out} is not empty (it holds {listed}): continue that run with {shown('resume')}, "
            f"replace it with {shown('overwrite')}, or choose another {shown('out')}")
    if is_main:
        if (out / "checkpoints").is_dir() or (out / RUN_FILE).is_file() or (out / "metrics.jsonl").is_file():
            logger.warning("%s: removing the previous run in %s", shown("overwrite"), out)
        else:
            logger.warning("%s: removing the previous content of %s", shown("overwrite"), out)
        trash = out.with_name(f".{out.name}.removed-{uuid.uuid4().hex[:8]}")
        os.rename(out, trash)  # one step: a kill now leaves the old run (under the hidden name) or the new one
        out.mkdir()
        shutil.rmtree(trash)
    return out


def texts_fingerprint(texts: Iterable[str]) -> str:
    """SHA-256 (first 16 hex digits) of the documents, in order: the identity of a run's data."""
    digest = hashlib.sha256()
    for text in texts:
        data = text.encode("utf-8", "surrogatepass")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()[:16]


def file_fingerprint(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def _normal(value: Any) -> Any:
    """JSON round-trip form (tuples become lists) so saved and current values compare equal."""
    return json.loads(json.dumps(value, default=str))


def compare_settings(saved: dict[str, Any], current: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(refused, reported): one line per setting whose value differs."""
    refused, reported = [], []
    constant = saved.get("schedule") == current.get("schedule") == "constant"
    for name in sorted(set(saved) | set(current)):
        if name in _IGNORED or name not in saved or name not in current:
            continue
        before, now = _normal(saved[name]), _normal(current[name])
        if before == now:
            continue
        if name == "data_fingerprint":
            line = "the content of the data differs from the run's (its fingerprint changed)"
        else:
            line = f"{shown(name)} is {now!r} now, {before!r} in the run"
        if name in REFUSED and not (name == "max_steps" and constant):
            refused.append(line)
        else:
            reported.append(line)
    return refused, reported


def check_resume(out: str | Path, settings: dict[str, Any]) -> None:
    """Compare ``settings`` with ``<out>/run.json`` (see the module docstring); a run without
    run.json (an older version's) is not compared."""
    path = Path(out) / RUN_FILE
    if not path.is_file():
        return
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))["settings"]
    except (ValueError, KeyError, TypeError):
        raise ResumeMismatchError(f"{path} is damaged (not the JSON a run writes); cannot check what the run "
                                  "was started with") from None
    refused, reported = compare_settings(saved, settings)
    for line in reported:
        logger.warning("resuming with a changed setting: %s", line)
    if refused:
        raise ResumeMismatchError(
            f"cannot resume the run in {out}: " + "; ".join(refused) + ". These change what the run trains or its "
            "learning-rate schedule; rerun with the run's values, or start a new run in another "
            f"{shown('out')} (from one of its checkpoints where the command takes a model)")


def record_run(out: str | Path, settings: dict[str, Any]) -> None:
    """Write ``<out>/run.json`` (atomically) for a fresh run."""
    atomic_write_text(Path(out) / RUN_FILE, json.dumps({"settings": _normal(settings)}, indent=1) + "\n")


def begin_run(out: str | Path, settings: dict[str, Any], *, resume: bool, is_main: bool) -> None:
    """On resume: :func:`check_resume` (every process); on a fresh run: :func:`record_run` (main)."""
    if resume:
        check_resume(out, settings)
        if not (Path(out) / RUN_FILE).is_file() and is_main:
            record_run(out, settings)
    elif is_main:
        record_run(out, settings)
