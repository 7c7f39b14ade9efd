"""Atomic file writes: nothing is ever left half-written under its final name."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | os.PathLike[str], write: Callable[[str], object]) -> None:
    """``write(tmp)`` fills a temporary file beside ``path``; it is fsynced, then renamed onto ``path``.

    The temporary name is created with the process umask (unlike tempfile.mkstemp's 0600), and
    removed if writing or renaming fails; the error propagates and ``path`` keeps its old content.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(str(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # only still there if writing or renaming failed


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` as UTF-8, byte for byte (no newline translation), atomically."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8", newline=""))
