"""Text corpora: the built-in default corpus (Python's own standard library) and text loading.

The default corpus needs no download: the running interpreter's standard-library ``.py``
sources (~12 MB on CPython 3.11 without tests) are real, varied text to train a small model
or a tokenizer on. Your own data goes through :func:`read_texts`.
"""

from __future__ import annotations

import json
import logging
import os
import random
import sysconfig
from collections.abc import Iterable, Iterator
from pathlib import Path

from fastlm._naming import shown

logger = logging.getLogger(__name__)

__all__ = [
    "BAD_FILE_POLICIES",
    "DataError",
    "TEXT_SUFFIXES",
    "default_corpus_files",
    "default_corpus_texts",
    "read_texts",
    "split_train_val",
]

#: File kinds :func:`read_texts` picks up inside directories (``.jsonl``: one ``{"text": ...}`` per line).
TEXT_SUFFIXES = frozenset({".txt", ".md", ".py", ".rst", ".jsonl"})

# Directories of the standard library left out of the default corpus: installed packages,
# test suites (test/, tests/, idlelib/idle_test, lib2to3/tests, ...), caches and data tables.
# encodings/ (codec tables) and pydoc_data/ (one huge string literal) are poor text to learn from.
_EXCLUDED_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "encodings", "pydoc_data"}
)


# --------------------------------------------------------------------------- default corpus


def _excluded_dir(name: str) -> bool:
    return name in _EXCLUDED_DIRS or name.startswith(("test_", "."))


def _stdlib_sources(max_bytes: int) -> Iterator[tuple[Path, str]]:
    """Yield ``(path, text)`` of stdlib ``.py`` files in sorted order, within ``max_bytes`` in total."""
    if not isinstance(max_bytes, int) or max_bytes <= 0:
        raise ValueError(f"max_bytes must be a positive int, got {max_bytes!r}")
    root = Path(sysconfig.get_paths()["stdlib"])
    candidates: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not _excluded_dir(d)]
        for name in filenames:
            if name.endswith(".py"):
                path = Path(dirpath, name)
                candidates.append((path.relative_to(root).as_posix(), path))
    candidates.sort()

    found = False
    remaining = max_bytes
    for _, path in candidates:
        try:
            size = path.stat().st_size
        except OSError:  # e.g. a dangling symlink
            continue
        if size == 0 or size > remaining:
            continue
        try:
            text = path.read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError) as e:
            logger.debug("skipping %s: %s", path, e)
            continue
        found = True
        remaining -= size
        yield path, text
        if remaining == 0:
            break
    if not candidates:
        raise RuntimeError(
            f"no Python standard-library sources found under {root} (this interpreter may ship "
            "without .py files); pass your own text files instead, e.g. read_texts([...])"
        )
    if not found:
        raise RuntimeError(
            f"no readable UTF-8 standard-library source under {root} fits in max_bytes={max_bytes}; "
            "raise max_bytes or pass your own text files, e.g. read_texts([...])"
        )


def default_corpus_files(max_bytes: int = 8_000_000) -> list[Path]:
    """The running interpreter's standard-library ``.py`` files: the built-in default corpus.

    Files are taken in order of their path relative to ``sysconfig.get_paths()["stdlib"]``,
    skipping site-packages, test directories, empty files, files that are not valid UTF-8
    and files that would push the total size past ``max_bytes``; so the total is at most
    ``max_bytes`` and the list is the same on every run of the same interpreter.

    Raises RuntimeError when no source file is found.
    """
    return [path for path, _ in _stdlib_sources(max_bytes)]


def default_corpus_texts(max_bytes: int = 8_000_000) -> list[str]:
    """Contents of :func:`default_corpus_files`, one document per file."""
    return [text for _, text in _stdlib_sources(max_bytes)]


# --------------------------------------------------------------------------- reading


#: What :func:`read_texts` does with a file that is not text: "error" refuses it (ValueError
#: naming the file), "skip" leaves it out with a warning.
BAD_FILE_POLICIES = ("error", "skip")


class DataError(ValueError):
    """A data file that cannot be trained on: not UTF-8 text, binary, or holding no text."""


def _not_text_reason(data: bytes) -> str | None:
    """Why ``data`` is not UTF-8 text (None when it is)."""
    nul = data.find(b"\x00")
    if nul >= 0:
        return f"a NUL byte at offset {nul}: a binary file"
    try:
        data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        return f"byte {data[err.start]:#04x} at offset {err.start} is not valid UTF-8"
    return None


def _decode(path: Path, *, on_bad_file: str) -> str | None:
    """UTF-8 text of ``path`` (a BOM dropped, line endings kept); None for a skipped non-text file."""
    data = path.read_bytes()
    reason = _not_text_reason(data)
    if reason is None:
        return data.decode("utf-8-sig")
    if on_bad_file == "skip":
        logger.warning("skipping %s: not UTF-8 text (%s)", path, reason)
        return None
    raise DataError(f"{shown('data')} file {path} is not UTF-8 text ({reason}); give text files, or leave such "
                    f"files out with {shown('on_bad_file')} skip")


def _jsonl_texts(path: Path, content: str) -> list[str]:
    texts = []
    for lineno, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: invalid JSON: {e}") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise DataError(f'{path}:{lineno}: expected an object with a string "text" field')
        if record["text"]:
            texts.append(record["text"])
    return texts


def _file_texts(path: Path, *, on_bad_file: str) -> list[str]:
    content = _decode(path, on_bad_file=on_bad_file)
    if content is None:
        return []
    if path.suffix == ".jsonl":
        return _jsonl_texts(path, content)
    return [content] if content else []


def read_texts(paths: Iterable[str | os.PathLike[str]] | str | os.PathLike[str], *,
               on_bad_file: str = "error") -> list[str]:
    """Read documents from text files and directories, in the order given.

    - A file gives one document (its whole text), or for ``.jsonl`` one per line's
      ``"text"`` field. Named files are read whatever their suffix.
    - A directory is searched recursively (hidden entries skipped, paths sorted) for files
      with a suffix in :data:`TEXT_SUFFIXES`; those that are not UTF-8 text are skipped with a
      warning naming each.
    - A named file that is not UTF-8 text (invalid UTF-8, or a NUL byte: binary) raises
      :class:`DataError` naming it, or with ``on_bad_file="skip"`` is left out with a warning.

    Line endings are kept as they are; empty documents are dropped. Raises FileNotFoundError
    for a missing path and DataError for a path that gives no document.
    """
    if on_bad_file not in BAD_FILE_POLICIES:
        raise ValueError(f"{shown('on_bad_file')} must be one of {BAD_FILE_POLICIES}, got {on_bad_file!r}")
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    texts: list[str] = []
    for p in paths:
        path = Path(p)
        if path.is_dir():
            found: list[str] = []
            files = sorted(
                f
                for f in path.rglob("*")
                if f.suffix in TEXT_SUFFIXES
                and not any(part.startswith(".") for part in f.relative_to(path).parts)
                and f.is_file()
            )
            for f in files:  # a directory's non-text files are skipped with a warning whatever the policy
                found.extend(_file_texts(f, on_bad_file="skip"))
            if not found:
                raise DataError(
                    f"{shown('data')} directory {path} holds no readable text files "
                    f"(non-empty UTF-8 files with suffix {', '.join(sorted(TEXT_SUFFIXES))})"
                )
            texts.extend(found)
        elif path.is_file():
            found = _file_texts(path, on_bad_file=on_bad_file)
            if not found and _decode_ok(path):
                raise DataError(f"{shown('data')} file {path} holds no text")
            texts.extend(found)
        else:
            raise FileNotFoundError(f"{shown('data')}: no such file or directory: {path}")
    if not texts:
        raise DataError(f"{shown('data')}: no text left to train on (every file was skipped)")
    return texts


def _decode_ok(path: Path) -> bool:
    return _not_text_reason(path.read_bytes()) is None


# --------------------------------------------------------------------------- splitting


def split_train_val(
    texts: list[str], val_fraction: float = 0.05, seed: int = 0
) -> tuple[list[str], list[str]]:
    """Split documents into ``(train, val)``, deterministically for a given ``seed``.

    With ``n >= 2`` documents, ``clamp(round(n * val_fraction), 1, n - 1)`` documents chosen
    at random go to validation; both lists keep the input order. A single document is cut
    by characters instead: its last ``val_fraction`` (at least one character) is validation.

    Raises ValueError if ``val_fraction`` is not in (0, 1), ``texts`` is empty, or a single
    document is shorter than 2 characters.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    texts = list(texts)
    n = len(texts)
    if n == 0:
        raise ValueError("cannot split an empty list of texts")
    if n == 1:
        doc = texts[0]
        if len(doc) < 2:
            raise ValueError(f"cannot split a single document of {len(doc)} character(s) into train and val")
        n_val = min(max(round(len(doc) * val_fraction), 1), len(doc) - 1)
        cut = len(doc) - n_val
        return [doc[:cut]], [doc[cut:]]
    n_val = min(max(round(n * val_fraction), 1), n - 1)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    val_idx = set(order[:n_val])
    train = [t for i, t in enumerate(texts) if i not in val_idx]
    val = [t for i, t in enumerate(texts) if i in val_idx]
    return train, val
