"""Tokenizers behind one small interface: a byte-level tokenizer and a Hugging Face wrapper.

Every tokenizer maps ``str -> list[int]`` and back as ``transformers`` does (``encode`` adds
the tokenizer's own BOS/EOS unless ``add_special_tokens=False``; ``decode`` keeps special
tokens unless ``skip_special_tokens=True``), knows its vocabulary size and its
``bos``/``eos``/``pad`` ids, renders chats with ``apply_chat_template``, and saves itself into
a directory that :func:`load_tokenizer` reads back.

- :class:`ByteTokenizer` needs no training: ids ``0..255`` are the UTF-8 bytes of the text,
  then ``<|bos|>`` (256), ``<|eos|>`` (257), ``<|pad|>`` (258).
- :class:`~fastlm.data.hf_tokenizer.HFTokenizer` wraps a ``tokenizers.Tokenizer``: one trained
  here with :meth:`HFTokenizer.train_bpe`, or any Hugging Face checkpoint's ``tokenizer.json``
  with its ``tokenizer_config.json`` and chat template, configured as transformers configures it.

Directory layout written by ``save``::

    fastlm_tokenizer.json    {"type": "byte" | "hf", ...}: which kind this directory holds
    tokenizer.json           (hf only) the Hugging Face tokenizer
    tokenizer_config.json    (hf only) special tokens and settings named the Hugging Face way, so
                             that transformers.AutoTokenizer.from_pretrained(directory) loads it
    chat_template.jinja      (hf only, when there is a template)

A plain Hugging Face checkpoint directory (``tokenizer.json`` without
``fastlm_tokenizer.json``) loads as :class:`HFTokenizer`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

import torch

from fastlm.data.hf_tokenizer import HFTokenizer
from fastlm.data.tokenizer_base import (
    BOS_TOKEN,
    EOS_TOKEN,
    FASTLM_TOKENIZER_FILE,
    HF_TOKENIZER_CONFIG_FILE,
    HF_TOKENIZER_FILE,
    PAD_TOKEN,
    SPECIAL_TOKENS,
    Tokenizer,
    check_text,
    ids_to_list,
    read_json,
    unencodable,
    write_json,
)

__all__ = [
    "BOS_TOKEN",
    "EOS_TOKEN",
    "PAD_TOKEN",
    "FASTLM_TOKENIZER_FILE",
    "HF_TOKENIZER_FILE",
    "HF_TOKENIZER_CONFIG_FILE",
    "Tokenizer",
    "ByteTokenizer",
    "HFTokenizer",
    "load_tokenizer",
]

_SPECIAL_PATTERN = re.compile("(" + "|".join(re.escape(t) for t in SPECIAL_TOKENS) + ")")


# --------------------------------------------------------------------------- bytes


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as tokens: ids 0..255 are bytes, 256/257/258 are ``<|bos|>``/``<|eos|>``/``<|pad|>``.

    ``decode(encode(s)) == s`` for every ``str`` that is valid Unicode. Id sequences that are
    not valid UTF-8 (e.g. a multi-byte character cut in half) decode with ``errors="replace"``:
    each bad byte run becomes U+FFFD. Special tokens decode to their strings (``"<|bos|>"``
    ...) unless ``skip_special_tokens=True``. ``encode`` adds no special token by itself
    (``add_special_tokens`` changes nothing); literal ``"<|bos|>"`` in text is encoded as plain
    bytes unless ``split_special_tokens=False`` is passed.
    """

    NUM_BYTES = 256

    def encode(self, text: str, *, add_special_tokens: bool = True, add_bos: bool = False, add_eos: bool = False,
               split_special_tokens: bool | None = None) -> list[int]:
        text = check_text(text)
        pieces = [text] if split_special_tokens in (None, True) else _SPECIAL_PATTERN.split(text)
        ids: list[int] = []
        for n, piece in enumerate(pieces):
            if n % 2:  # a matched special-token string
                ids.append(self.NUM_BYTES + SPECIAL_TOKENS.index(piece))
                continue
            try:
                ids += piece.encode("utf-8")
            except UnicodeEncodeError as e:
                raise unencodable(text, e) from e
        return self._frame(ids, add_bos, add_eos)

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        ids = self.encode(text)
        offsets = [(i, i + 1) for i, ch in enumerate(text) for _ in range(len(ch.encode("utf-8")))]
        return ids, offsets

    def decode(self, ids: Sequence[int] | torch.Tensor, *, skip_special_tokens: bool = False) -> str:
        ids = ids_to_list(ids, self.vocab_size)
        parts: list[str] = []
        buf = bytearray()
        for i in ids:
            if i < self.NUM_BYTES:
                buf.append(i)
                continue
            # A special token: flush the bytes before it, then render it (or not).
            parts.append(buf.decode("utf-8", errors="replace"))
            buf.clear()
            if not skip_special_tokens:
                parts.append(SPECIAL_TOKENS[i - self.NUM_BYTES])
        parts.append(buf.decode("utf-8", errors="replace"))
        return "".join(parts)

    @property
    def special_tokens_map(self) -> dict[str, str]:
        return {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN}

    @property
    def vocab_size(self) -> int:
        return self.NUM_BYTES + len(SPECIAL_TOKENS)

    @property
    def bos_token_id(self) -> int:
        return self.NUM_BYTES

    @property
    def eos_token_id(self) -> int:
        return self.NUM_BYTES + 1

    @property
    def pad_token_id(self) -> int:
        return self.NUM_BYTES + 2

    def save(self, directory: str | os.PathLike[str]) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        write_json(
            directory / FASTLM_TOKENIZER_FILE,
            {
                "type": "byte",
                "vocab_size": self.vocab_size,
                "bos_token": BOS_TOKEN,
                "eos_token": EOS_TOKEN,
                "pad_token": PAD_TOKEN,
            },
        )

    def __repr__(self) -> str:
        return f"ByteTokenizer(vocab_size={self.vocab_size})"


# --------------------------------------------------------------------------- loading


def _load_fastlm_config(path: Path) -> Tokenizer:
    config = read_json(path)
    kind = config.get("type") if isinstance(config, dict) else None
    if kind == "byte":
        return ByteTokenizer()
    if kind == "hf":
        hf_file = path.parent / config.get("tokenizer_file", HF_TOKENIZER_FILE)
        if not hf_file.is_file():
            raise FileNotFoundError(f"{path} names a Hugging Face tokenizer but {hf_file} does not exist")
        # Directories saved before tokenizer_config.json recorded split_special_tokens keep the marker's value.
        hf_config = hf_file.parent / HF_TOKENIZER_CONFIG_FILE
        recorded = hf_config.is_file() and "split_special_tokens" in read_json(hf_config)
        return HFTokenizer.from_file(hf_file, split_special_tokens=None if recorded else config.get("split_special_tokens"))
    raise ValueError(f"{path}: unknown tokenizer type {kind!r} (expected 'byte' or 'hf')")


def load_tokenizer(path: str | os.PathLike[str]) -> Tokenizer:
    """Load a tokenizer from a directory written by ``save`` or a HF checkpoint, or from a file.

    A directory is read through its ``fastlm_tokenizer.json`` when present, else its
    ``tokenizer.json``. A file may be a ``fastlm_tokenizer.json`` or any HF ``tokenizer.json``.
    Raises FileNotFoundError naming the path and the files looked for.
    """
    path = Path(path)
    if path.is_dir():
        marker = path / FASTLM_TOKENIZER_FILE
        if marker.is_file():
            return _load_fastlm_config(marker)
        hf_file = path / HF_TOKENIZER_FILE
        if hf_file.is_file():
            return HFTokenizer.from_file(hf_file)
        raise FileNotFoundError(
            f"no tokenizer in {path}: looked for {FASTLM_TOKENIZER_FILE} and {HF_TOKENIZER_FILE} "
            "(sentencepiece-only checkpoints need converting to tokenizer.json first)"
        )
    if path.is_file():
        if path.name == FASTLM_TOKENIZER_FILE:
            return _load_fastlm_config(path)
        return HFTokenizer.from_file(path)
    raise FileNotFoundError(f"tokenizer path not found: {path}")
