"""A Hugging Face ``tokenizer.json`` behind the fastlm interface, configured as ``transformers``
configures it from ``tokenizer_config.json``.

What ``transformers`` (``PreTrainedTokenizerFast`` / ``AutoTokenizer``) does on loading, and
:class:`HFTokenizer` does the same way:

- Named special tokens (``bos_token``, ``eos_token``, ``unk_token``, ``sep_token``,
  ``pad_token``, ``cls_token``, ``mask_token``) and ``additional_special_tokens`` /
  ``extra_special_tokens`` from ``tokenizer_config.json`` (then ``special_tokens_map.json``)
  become *added special tokens* of the backend when they are not already added tokens, so
  their strings inside text are matched as single ids (``split_special_tokens=False``, the
  default; ``True`` in the config makes them plain text).
- BOS/EOS: the post-processor of ``tokenizer.json`` adds them (Llama 2's ``<s> $A``, Llama 3's
  ``<|begin_of_text|> $A``, Gemma's ``<bos> $A``); ``encode(text)`` equals
  ``tokenizer(text).input_ids``. As in transformers 5, ``add_bos_token``/``add_eos_token`` in
  ``tokenizer_config.json`` do not change it when ``tokenizer.json`` is present (transformers 5
  drops them on loading and saving; the file's post-processor is the truth; transformers 4's
  ``LlamaTokenizerFast`` rebuilt the post-processor from them instead, which gives the same ids
  for published checkpoints, whose post-processor already adds BOS).
- ``decode`` keeps special tokens unless ``skip_special_tokens=True``; the config's
  ``clean_up_tokenization_spaces`` applies to non-BPE models only (as transformers 5).
- Truncation and padding stored in ``tokenizer.json`` are not applied to ``encode``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import tokenizers
import torch
from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers

from fastlm.data.chat_template import parse_chat_template_entry, read_chat_templates
from fastlm.data.tokenizer_base import (
    FASTLM_TOKENIZER_FILE,
    HF_SPECIAL_TOKENS_MAP_FILE,
    HF_TOKENIZER_CONFIG_FILE,
    HF_TOKENIZER_FILE,
    SPECIAL_TOKENS,
    BOS_TOKEN,
    EOS_TOKEN,
    PAD_TOKEN,
    Tokenizer,
    check_text,
    ids_to_list,
    read_json,
    unencodable,
    write_json,
)
from fastlm._files import atomic_write_text

logger = logging.getLogger(__name__)

__all__ = ["HFTokenizer", "NAMED_SPECIAL_TOKENS"]

NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")

# Token strings tried, in order, for the bos/eos/pad ids when no config file names them
# (ids only: such guesses are neither template variables nor added to the backend).
_CONVENTIONAL_TOKENS = {
    "bos_token": (BOS_TOKEN, "<s>", "<|begin_of_text|>", "<bos>", "<|endoftext|>"),
    "eos_token": (EOS_TOKEN, "</s>", "<|end_of_text|>", "<eos>", "<|endoftext|>"),
    "pad_token": (PAD_TOKEN, "<pad>", "<|finetune_right_pad_id|>", "[PAD]"),
}

_CLEANUPS = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
             (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


def _added_token(value: Any, source: str, key: str) -> AddedToken | None:
    """A special-token entry of a HF config: ``"<s>"``, ``{"content": "<s>", ...}`` or null."""
    if value is None:
        return None
    if isinstance(value, str):
        return AddedToken(value, special=True, normalized=False)
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        flags = {k: bool(value[k]) for k in ("single_word", "lstrip", "rstrip", "normalized") if k in value}
        flags.setdefault("normalized", False)
        return AddedToken(value["content"], special=True, **flags)
    raise ValueError(f"{source}: {key!r} must be a string, an object with 'content' or null, got {value!r}")


def _extra_tokens(config: Mapping[str, Any], source: str) -> tuple[list[AddedToken], dict[str, AddedToken]]:
    """``additional_special_tokens`` / ``extra_special_tokens``: a list, or (transformers 4) a dict of named extras."""
    listed: list[AddedToken] = []
    named: dict[str, AddedToken] = {}
    for key in ("additional_special_tokens", "extra_special_tokens"):
        value = config.get(key)
        if value is None:
            continue
        if isinstance(value, Mapping):
            for name, entry in value.items():
                if (token := _added_token(entry, source, f"{key}.{name}")) is not None:
                    named[str(name)] = token
        elif isinstance(value, list):
            listed += [t for i, e in enumerate(value) if (t := _added_token(e, source, f"{key}[{i}]")) is not None]
        else:
            raise ValueError(f"{source}: {key!r} must be a list of tokens, got {type(value).__name__}")
    return listed, named


class HFTokenizer(Tokenizer):
    """A ``tokenizers.Tokenizer`` behind the fastlm interface (see the module docstring).

    Args:
        tokenizer: the wrapped tokenizer (copied: loading adds special tokens and may set the
            post-processor, as transformers does).
        bos_token, eos_token, pad_token: token strings; override ``hf_config``'s entries.
        split_special_tokens: None takes ``hf_config["split_special_tokens"]`` (default False,
            as transformers); True encodes special-token strings in text as plain text.
        hf_config: the ``tokenizer_config.json`` entries (special tokens, ``split_special_tokens``,
            ``chat_template``, ...), kept on ``save``.
        chat_template: a template source or ``{name: source}``; overrides ``hf_config``'s.
        copy: False hands ``tokenizer`` over (it is then changed in place) instead of copying it.
    """

    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        split_special_tokens: bool | None = None,
        hf_config: Mapping[str, Any] | None = None,
        chat_template: str | Mapping[str, str] | None = None,
        copy: bool = True,
    ) -> None:
        if not isinstance(tokenizer, tokenizers.Tokenizer):
            raise TypeError(f"tokenizer must be a tokenizers.Tokenizer, got {type(tokenizer).__name__}")
        self.hf_config = dict(hf_config or {})
        for key, value in (("bos_token", bos_token), ("eos_token", eos_token), ("pad_token", pad_token)):
            if value is not None:
                self.hf_config[key] = value
        if split_special_tokens is None:
            split_special_tokens = bool(self.hf_config.get("split_special_tokens", False))
        self.split_special_tokens = bool(split_special_tokens)
        self.hf_config["split_special_tokens"] = self.split_special_tokens
        if chat_template is None:
            chat_template = parse_chat_template_entry(self.hf_config.get("chat_template"), "hf_config")
        self.chat_template = parse_chat_template_entry(chat_template, "chat_template")

        self._tok = tokenizers.Tokenizer.from_str(tokenizer.to_str()) if copy else tokenizer
        self._tok.no_truncation()
        self._tok.no_padding()
        self._tok.encode_special_tokens = self.split_special_tokens
        self._configure()

    # ---- construction

    def _configure(self) -> None:
        source = HF_TOKENIZER_CONFIG_FILE
        named = {k: _added_token(self.hf_config.get(k), source, k) for k in NAMED_SPECIAL_TOKENS}
        listed, extra_named = _extra_tokens(self.hf_config, source)
        self._named: dict[str, str] = {k: t.content for k, t in {**named, **extra_named}.items() if t is not None}
        # Tokens of the config's added_tokens_decoder, then the named and extra special tokens, become
        # added tokens unless they already are.
        present = {t.content for t in self._tok.get_added_tokens_decoder().values()}
        decoder = self.hf_config.get("added_tokens_decoder") or {}
        if not isinstance(decoder, Mapping):
            raise ValueError(f"{source}: 'added_tokens_decoder' must map ids to tokens, got {type(decoder).__name__}")
        listed_in_config = []
        for key, entry in sorted(decoder.items(), key=lambda kv: int(kv[0])):
            token = _added_token(entry, source, f"added_tokens_decoder.{key}")
            if token is not None and isinstance(entry, Mapping):
                token = AddedToken(token.content, special=bool(entry.get("special", True)), single_word=token.single_word,
                                   lstrip=token.lstrip, rstrip=token.rstrip, normalized=token.normalized)
            listed_in_config.append(token)
        missing = []
        for token in [*listed_in_config, *named.values(), *extra_named.values(), *listed]:
            if token is not None and token.content not in present:
                missing.append(token)
                present.add(token.content)
        for token in missing:  # one at a time: new ids follow the order above
            (self._tok.add_special_tokens if token.special else self._tok.add_tokens)([token])

        self._ids: dict[str, int | None] = {}
        for key in ("bos_token", "eos_token", "pad_token"):
            token = self._named.get(key)
            if token is None and key not in self.hf_config:
                token = next((t for t in _CONVENTIONAL_TOKENS[key] if self._tok.token_to_id(t) is not None), None)
            self._ids[key] = None if token is None else self._tok.token_to_id(token)
        self._guessed = {k: self._tok.id_to_token(i) for k, i in self._ids.items()
                         if i is not None and k not in self._named}

        vocab = self._tok.get_vocab(with_added_tokens=True)
        # One past the largest id: ids need not be contiguous in arbitrary tokenizer.json files.
        self._vocab_size = max(vocab.values()) + 1 if vocab else 0
        self._special_ids = {i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}

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
        bytes; a small corpus may give fewer tokens than asked for. No BOS/EOS is added by
        ``encode`` by itself, and special-token strings in text stay plain text
        (``split_special_tokens=True``: training text cannot inject control tokens).

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
        return cls(tok, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN, split_special_tokens=True,
                   copy=False)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], *, split_special_tokens: bool | None = None) -> HFTokenizer:
        """Load a Hugging Face ``tokenizer.json`` with the ``tokenizer_config.json``,
        ``special_tokens_map.json`` and chat template files beside it (see the module docstring).

        ``split_special_tokens`` None: the config's value (default False).
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        tok = tokenizers.Tokenizer.from_file(str(path))
        config: dict[str, Any] = {}
        for name in (HF_TOKENIZER_CONFIG_FILE, HF_SPECIAL_TOKENS_MAP_FILE):
            cfg_path = path.parent / name
            if not cfg_path.is_file():
                continue
            cfg = read_json(cfg_path)
            if not isinstance(cfg, dict):
                raise ValueError(f"{cfg_path} must hold a JSON object")
            for key, value in cfg.items():
                config.setdefault(key, value)
        for key in ("bos_token", "eos_token", "pad_token"):
            entry = config.get(key)
            content = entry.get("content") if isinstance(entry, Mapping) else entry
            if isinstance(content, str) and tok.token_to_id(content) is None and content not in tok.get_vocab():
                logger.info("%s %r of %s is not in tokenizer.json; it is added as a new token (as transformers does)",
                            key, content, path.parent)
        templates = read_chat_templates(path.parent, config)
        return cls(tok, split_special_tokens=split_special_tokens, hf_config=config, chat_template=templates, copy=False)

    # ---- interface

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The wrapped ``tokenizers.Tokenizer``."""
        return self._tok

    def _backend_encode(self, texts: list[str], add_special_tokens: bool, split: bool | None) -> list[Any]:
        split = self.split_special_tokens if split is None else bool(split)
        self._tok.encode_special_tokens = split
        try:
            return self._tok.encode_batch(texts, add_special_tokens=add_special_tokens)
        except TypeError:
            # tokenizers rejects lone surrogates with an unhelpful TypeError; say what is wrong.
            for text in texts:
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError as e:
                    raise unencodable(text, e) from e
            raise
        finally:
            self._tok.encode_special_tokens = self.split_special_tokens

    def encode(self, text: str, *, add_special_tokens: bool = True, add_bos: bool = False, add_eos: bool = False,
               split_special_tokens: bool | None = None) -> list[int]:
        [encoding] = self._backend_encode([check_text(text)], add_special_tokens, split_special_tokens)
        return self._frame(encoding.ids, add_bos, add_eos)

    def encode_batch(self, texts: Iterable[str], *, add_special_tokens: bool = True, add_bos: bool = False,
                     add_eos: bool = False) -> list[list[int]]:
        """Encode many texts at once (in parallel, in Rust)."""
        encodings = self._backend_encode([check_text(t) for t in texts], add_special_tokens, None)
        return [self._frame(e.ids, add_bos, add_eos) for e in encodings]

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        [encoding] = self._backend_encode([check_text(text)], False, None)
        return encoding.ids, [tuple(o) for o in encoding.offsets]

    def decode(self, ids: Sequence[int] | torch.Tensor, *, skip_special_tokens: bool = False,
               clean_up_tokenization_spaces: bool | None = None) -> str:
        text = self._tok.decode(ids_to_list(ids, self._vocab_size), skip_special_tokens=skip_special_tokens)
        if clean_up_tokenization_spaces is None:
            clean_up_tokenization_spaces = bool(self.hf_config.get("clean_up_tokenization_spaces", False))
        if clean_up_tokenization_spaces and type(self._tok.model).__name__ != "BPE":
            for old, new in _CLEANUPS:
                text = text.replace(old, new)
        return text

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    @property
    def all_special_ids(self) -> list[int]:
        """Ids of the added tokens marked special (those ``skip_special_tokens`` removes)."""
        return sorted(self._special_ids)

    @property
    def special_tokens_map(self) -> dict[str, str]:
        return dict(self._named)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def bos_token_id(self) -> int | None:
        return self._ids["bos_token"]

    @property
    def eos_token_id(self) -> int | None:
        return self._ids["eos_token"]

    @property
    def pad_token_id(self) -> int | None:
        return self._ids["pad_token"]

    @property
    def bos_token(self) -> str | None:
        return self._named.get("bos_token", self._guessed.get("bos_token"))

    @property
    def eos_token(self) -> str | None:
        return self._named.get("eos_token", self._guessed.get("eos_token"))

    @property
    def pad_token(self) -> str | None:
        return self._named.get("pad_token", self._guessed.get("pad_token"))

    def save(self, directory: str | os.PathLike[str]) -> None:
        """Write ``tokenizer.json``, ``tokenizer_config.json`` (with the chat template) and ``fastlm_tokenizer.json``.

        The config keeps the entries this tokenizer was loaded with, with ``split_special_tokens``
        and the bos/eos/pad tokens in use; ``transformers.AutoTokenizer`` loads the directory the same.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write_text(directory / HF_TOKENIZER_FILE, self._tok.to_str(pretty=True))
        config = dict(self.hf_config)
        config.pop("chat_template", None)
        config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        config.setdefault("clean_up_tokenization_spaces", False)
        if isinstance(self.chat_template, str):
            config["chat_template"] = self.chat_template
        elif isinstance(self.chat_template, dict):
            config["chat_template"] = [{"name": k, "template": v} for k, v in self.chat_template.items()]
        write_json(directory / HF_TOKENIZER_CONFIG_FILE, config)
        # Written last: a directory is a complete fastlm tokenizer once this marker exists.
        write_json(directory / FASTLM_TOKENIZER_FILE,
                   {"type": "hf", "tokenizer_file": HF_TOKENIZER_FILE, "split_special_tokens": self.split_special_tokens})

    def __repr__(self) -> str:
        return (f"HFTokenizer(vocab_size={self.vocab_size}, bos={self.bos_token!r}, eos={self.eos_token!r}, "
                f"pad={self.pad_token!r}, chat_template={'yes' if self.chat_template else 'no'})")
