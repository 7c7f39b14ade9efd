"""Tokenizers behind one small interface: a byte-level tokenizer and a Hugging Face wrapper.

Every tokenizer maps ``str -> list[int]`` and back, knows its vocabulary size and its
``bos``/``eos``/``pad`` ids, and saves itself into a directory that :func:`load_tokenizer`
reads back.

- :class:`ByteTokenizer` needs no training: ids ``0..255`` are the UTF-8 bytes of the text,
  then ``<|bos|>`` (256), ``<|eos|>`` (257), ``<|pad|>`` (258).
- :class:`HFTokenizer` wraps a ``tokenizers.Tokenizer``: one trained here with
  :meth:`HFTokenizer.train_bpe`, or any Hugging Face ``tokenizer.json``.

Directory layout written by ``save``::

    fastlm_tokenizer.json    {"type": "byte" | "hf", ...}: which kind this directory holds
    tokenizer.json           (hf only) the Hugging Face tokenizer
    tokenizer_config.json    (hf only) special tokens named the Hugging Face way, so that
                             transformers.AutoTokenizer.from_pretrained(directory) loads it

A plain Hugging Face checkpoint directory (``tokenizer.json`` without
``fastlm_tokenizer.json``) loads as :class:`HFTokenizer`.
"""

from __future__ import annotations

import abc
import json
import logging
import operator
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import tokenizers
import torch
from tokenizers import decoders, models, pre_tokenizers, trainers

from fastlm._files import atomic_write_text

logger = logging.getLogger(__name__)

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

BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|eos|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN)

FASTLM_TOKENIZER_FILE = "fastlm_tokenizer.json"
HF_TOKENIZER_FILE = "tokenizer.json"
HF_TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
HF_SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"

# Token strings tried, in order, when no config file names a special token.
_CONVENTIONAL_TOKENS = {
    "bos": (BOS_TOKEN, "<s>", "<|begin_of_text|>", "<bos>", "<|endoftext|>"),
    "eos": (EOS_TOKEN, "</s>", "<|end_of_text|>", "<eos>", "<|endoftext|>"),
    "pad": (PAD_TOKEN, "<pad>", "<|finetune_right_pad_id|>", "[PAD]"),
}


# --------------------------------------------------------------------------- helpers


def _write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e


def _check_text(text: object) -> str:
    if not isinstance(text, str):
        raise TypeError(f"encode expects text as str, got {type(text).__name__}")
    return text


def _unencodable(text: str, err: UnicodeEncodeError) -> ValueError:
    return ValueError(
        f"text is not valid Unicode and cannot be encoded as UTF-8: {err.reason} "
        f"at position {err.start} ({text[err.start:err.end]!r})"
    )


def _ids_to_list(ids: Sequence[int] | torch.Tensor, vocab_size: int) -> list[int]:
    """Turn ``ids`` (a sequence of ints or a 0-D/1-D integer tensor) into a checked ``list[int]``."""
    if isinstance(ids, torch.Tensor):
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise TypeError(f"decode expects an integer tensor, got dtype {ids.dtype}")
        if ids.dim() > 1:
            raise ValueError(f"decode expects a 1-D tensor of ids, got shape {tuple(ids.shape)}")
        out = ids.reshape(-1).tolist()
    else:
        if isinstance(ids, (str, bytes)):
            raise TypeError(f"decode expects a sequence of int ids, got {type(ids).__name__}")
        try:
            out = [operator.index(i) for i in ids]
        except TypeError as e:
            raise TypeError(f"decode expects a sequence of int ids: {e}") from e
    for i in out:
        if not 0 <= i < vocab_size:
            raise ValueError(f"token id {i} is out of range for vocab_size {vocab_size}")
    return out


# --------------------------------------------------------------------------- interface


class Tokenizer(abc.ABC):
    """Common interface: ``encode`` text to ids, ``decode`` ids to text, ``save`` to a directory."""

    @abc.abstractmethod
    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Encode ``text`` to token ids, optionally framed by ``bos_token_id``/``eos_token_id``.

        Raises TypeError if ``text`` is not a str, ValueError if it holds lone surrogates
        (not encodable as UTF-8) or a requested special token does not exist.
        """

    @abc.abstractmethod
    def decode(self, ids: Sequence[int] | torch.Tensor, *, skip_special_tokens: bool = True) -> str:
        """Decode token ids to text. Raises ValueError for an id outside ``[0, vocab_size)``."""

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of ids: every valid id lies in ``[0, vocab_size)``."""

    @property
    @abc.abstractmethod
    def bos_token_id(self) -> int | None: ...

    @property
    @abc.abstractmethod
    def eos_token_id(self) -> int | None: ...

    @property
    @abc.abstractmethod
    def pad_token_id(self) -> int | None: ...

    @abc.abstractmethod
    def save(self, directory: str | os.PathLike[str]) -> None:
        """Write this tokenizer into ``directory`` (created if needed) for :func:`load_tokenizer`."""

    def encode_batch(
        self, texts: Iterable[str], *, add_bos: bool = False, add_eos: bool = False
    ) -> list[list[int]]:
        """``[encode(t) for t in texts]``; subclasses may do it faster."""
        return [self.encode(t, add_bos=add_bos, add_eos=add_eos) for t in texts]

    def _frame(self, ids: list[int], add_bos: bool, add_eos: bool) -> list[int]:
        if add_bos:
            if self.bos_token_id is None:
                raise ValueError(f"add_bos=True but {type(self).__name__} has no bos token")
            ids.insert(0, self.bos_token_id)
        if add_eos:
            if self.eos_token_id is None:
                raise ValueError(f"add_eos=True but {type(self).__name__} has no eos token")
            ids.append(self.eos_token_id)
        return ids

    def __len__(self) -> int:
        return self.vocab_size


# --------------------------------------------------------------------------- bytes


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as tokens: ids 0..255 are bytes, 256/257/258 are ``<|bos|>``/``<|eos|>``/``<|pad|>``.

    ``decode(encode(s)) == s`` for every ``str`` that is valid Unicode. Id sequences that are
    not valid UTF-8 (e.g. a multi-byte character cut in half) decode with ``errors="replace"``:
    each bad byte run becomes U+FFFD. With ``skip_special_tokens=False`` the special tokens
    decode to their strings (``"<|bos|>"`` ...); literal ``"<|bos|>"`` in text is always
    encoded as plain bytes, never as the special id.
    """

    NUM_BYTES = 256

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        text = _check_text(text)
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise _unencodable(text, e) from e
        return self._frame(list(data), add_bos, add_eos)

    def decode(self, ids: Sequence[int] | torch.Tensor, *, skip_special_tokens: bool = True) -> str:
        ids = _ids_to_list(ids, self.vocab_size)
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
        _write_json(
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


# --------------------------------------------------------------------------- Hugging Face


def _token_content(value: Any, source: Path, key: str) -> str | None:
    """A special-token entry of a HF config: ``"<s>"``, ``{"content": "<s>", ...}`` or null."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"{source}: {key!r} must be a string, an object with 'content' or null, got {value!r}")


class HFTokenizer(Tokenizer):
    """A ``tokenizers.Tokenizer`` behind the fastlm interface.

    ``encode`` never runs the tokenizer's post-processor (which may add BOS by itself);
    BOS/EOS are added only through ``add_bos``/``add_eos``. With ``split_special_tokens=True``
    (the default) special-token strings inside the text (e.g. a literal ``"<|eos|>"``) are
    encoded as ordinary text, so untrusted text cannot inject control tokens and
    ``decode(encode(s)) == s`` holds for byte-level BPE; pass False to match
    ``transformers``' default, which turns them into the special ids.

    Args:
        tokenizer: the wrapped tokenizer (copied if its ``encode_special_tokens`` flag has to change).
        bos_token, eos_token, pad_token: token strings in its vocabulary, or None.
        split_special_tokens: see above.
        hf_config: extra ``tokenizer_config.json`` entries (e.g. ``chat_template``) kept on ``save``.
    """

    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        split_special_tokens: bool = True,
        hf_config: dict[str, Any] | None = None,
    ) -> None:
        if not isinstance(tokenizer, tokenizers.Tokenizer):
            raise TypeError(f"tokenizer must be a tokenizers.Tokenizer, got {type(tokenizer).__name__}")
        if tokenizer.encode_special_tokens != split_special_tokens:
            tokenizer = tokenizers.Tokenizer.from_str(tokenizer.to_str())
            tokenizer.encode_special_tokens = split_special_tokens
        self._tok = tokenizer
        self._tokens: dict[str, str | None] = {"bos": bos_token, "eos": eos_token, "pad": pad_token}
        self._ids: dict[str, int | None] = {}
        for kind, token in self._tokens.items():
            if token is None:
                self._ids[kind] = None
                continue
            token_id = tokenizer.token_to_id(token)
            if token_id is None:
                raise ValueError(f"{kind}_token {token!r} is not in the tokenizer's vocabulary")
            self._ids[kind] = token_id
        self.split_special_tokens = split_special_tokens
        self.hf_config = dict(hf_config or {})
        # One past the largest id: ids need not be contiguous in arbitrary tokenizer.json files.
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        self._vocab_size = max(vocab.values()) + 1 if vocab else 0

    # ---- construction

    @classmethod
    def train_bpe(
        cls,
        texts: Iterable[str],
        vocab_size: int,
        *,
        min_frequency: int = 2,
        show_progress: bool = False,
    ) -> HFTokenizer:
        """Train a byte-level BPE on ``texts`` with ``<|bos|>``/``<|eos|>``/``<|pad|>`` at ids 0/1/2.

        Byte-level pre-tokenization (GPT-2 regex, no prefix space), all 256 byte symbols in the
        initial alphabet (so any text encodes, without unknown tokens) and the ByteLevel decoder
        (so decoding inverts encoding exactly). ``vocab_size`` counts the specials and the 256
        bytes; a small corpus may give fewer tokens than asked for.

        Raises ValueError if ``vocab_size < 259`` or ``texts`` holds no non-empty text, TypeError
        if an item is not a str.
        """
        min_vocab = 256 + len(SPECIAL_TOKENS)
        if not isinstance(vocab_size, int) or vocab_size < min_vocab:
            raise ValueError(
                f"vocab_size must be an int >= {min_vocab} (256 bytes + {len(SPECIAL_TOKENS)} "
                f"special tokens), got {vocab_size!r}"
            )
        if min_frequency < 1:
            raise ValueError(f"min_frequency must be >= 1, got {min_frequency}")

        tok = tokenizers.Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=show_progress,
        )
        seen = [0]

        def checked(items: Iterable[str]) -> Iterator[str]:
            for n, text in enumerate(items):
                if not isinstance(text, str):
                    raise TypeError(f"training texts must be str, item {n} is {type(text).__name__}")
                if text:
                    seen[0] += 1
                    yield text

        tok.train_from_iterator(checked(texts), trainer=trainer)
        if seen[0] == 0:
            raise ValueError("cannot train a tokenizer on an empty corpus (no non-empty texts)")
        tok.encode_special_tokens = True
        return cls(tok, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN)

    @classmethod
    def from_file(
        cls, path: str | os.PathLike[str], *, split_special_tokens: bool = True
    ) -> HFTokenizer:
        """Load a Hugging Face ``tokenizer.json``.

        Special tokens come from ``tokenizer_config.json`` beside it, then
        ``special_tokens_map.json`` (values may be strings, ``{"content": ...}`` dicts or
        null; an explicit null means "none"). A token no config file mentions falls back to
        the first conventional string present in the vocabulary (``<|bos|>``, ``<s>``,
        ``<|begin_of_text|>``, ``<|endoftext|>``, ... ; ``<|eos|>``, ``</s>``, ...;
        ``<|pad|>``, ``<pad>``, ...).
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        tok = tokenizers.Tokenizer.from_file(str(path))
        tok.encode_special_tokens = split_special_tokens

        hf_config: dict[str, Any] = {}
        named: dict[str, str | None] = {}
        for name in (HF_TOKENIZER_CONFIG_FILE, HF_SPECIAL_TOKENS_MAP_FILE):
            cfg_path = path.parent / name
            if not cfg_path.is_file():
                continue
            cfg = _read_json(cfg_path)
            if not isinstance(cfg, dict):
                raise ValueError(f"{cfg_path} must hold a JSON object")
            if name == HF_TOKENIZER_CONFIG_FILE:
                hf_config = cfg
            for kind in ("bos", "eos", "pad"):
                key = f"{kind}_token"
                if key in cfg and kind not in named:
                    named[kind] = _token_content(cfg[key], cfg_path, key)

        tokens: dict[str, str | None] = {}
        for kind, candidates in _CONVENTIONAL_TOKENS.items():
            if kind in named:
                token = named[kind]
                if token is not None and tok.token_to_id(token) is None:
                    logger.warning("%s_token %r named in the configs of %s is not in its vocabulary; "
                                   "using none", kind, token, path)
                    token = None
            else:
                token = next((t for t in candidates if tok.token_to_id(t) is not None), None)
            tokens[kind] = token
        return cls(
            tok,
            bos_token=tokens["bos"],
            eos_token=tokens["eos"],
            pad_token=tokens["pad"],
            split_special_tokens=split_special_tokens,
            hf_config=hf_config,
        )

    # ---- interface

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The wrapped ``tokenizers.Tokenizer``."""
        return self._tok

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        text = _check_text(text)
        try:
            ids = self._tok.encode(text, add_special_tokens=False).ids
        except TypeError:
            # tokenizers rejects lone surrogates with an unhelpful TypeError; say what is wrong.
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:
                raise _unencodable(text, e) from e
            raise
        return self._frame(ids, add_bos, add_eos)

    def encode_batch(
        self, texts: Iterable[str], *, add_bos: bool = False, add_eos: bool = False
    ) -> list[list[int]]:
        """Encode many texts at once (in parallel, in Rust)."""
        texts = [_check_text(t) for t in texts]
        try:
            encodings = self._tok.encode_batch(texts, add_special_tokens=False)
        except TypeError:
            return super().encode_batch(texts, add_bos=add_bos, add_eos=add_eos)  # names the bad text
        return [self._frame(e.ids, add_bos, add_eos) for e in encodings]

    def decode(self, ids: Sequence[int] | torch.Tensor, *, skip_special_tokens: bool = True) -> str:
        ids = _ids_to_list(ids, self._vocab_size)
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def bos_token_id(self) -> int | None:
        return self._ids["bos"]

    @property
    def eos_token_id(self) -> int | None:
        return self._ids["eos"]

    @property
    def pad_token_id(self) -> int | None:
        return self._ids["pad"]

    @property
    def bos_token(self) -> str | None:
        return self._tokens["bos"]

    @property
    def eos_token(self) -> str | None:
        return self._tokens["eos"]

    @property
    def pad_token(self) -> str | None:
        return self._tokens["pad"]

    def save(self, directory: str | os.PathLike[str]) -> None:
        """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``fastlm_tokenizer.json``.

        The config keeps the entries this tokenizer was loaded with (``chat_template``, ...),
        with the special tokens set to ours; ``transformers.AutoTokenizer`` loads the directory.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write_text(directory / HF_TOKENIZER_FILE, self._tok.to_str(pretty=True))
        config = dict(self.hf_config)
        config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        config.setdefault("clean_up_tokenization_spaces", False)
        config.update({f"{kind}_token": token for kind, token in self._tokens.items()})
        _write_json(directory / HF_TOKENIZER_CONFIG_FILE, config)
        # Written last: a directory is a complete fastlm tokenizer once this marker exists.
        _write_json(
            directory / FASTLM_TOKENIZER_FILE,
            {"type": "hf", "tokenizer_file": HF_TOKENIZER_FILE, "split_special_tokens": self.split_special_tokens},
        )

    def __repr__(self) -> str:
        return (
            f"HFTokenizer(vocab_size={self.vocab_size}, bos={self.bos_token!r}, "
            f"eos={self.eos_token!r}, pad={self.pad_token!r})"
        )


# --------------------------------------------------------------------------- loading


def _load_fastlm_config(path: Path) -> Tokenizer:
    config = _read_json(path)
    kind = config.get("type") if isinstance(config, dict) else None
    if kind == "byte":
        return ByteTokenizer()
    if kind == "hf":
        hf_file = path.parent / config.get("tokenizer_file", HF_TOKENIZER_FILE)
        if not hf_file.is_file():
            raise FileNotFoundError(f"{path} names a Hugging Face tokenizer but {hf_file} does not exist")
        return HFTokenizer.from_file(hf_file, split_special_tokens=config.get("split_special_tokens", True))
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
