"""The tokenizer interface shared by :class:`~fastlm.data.tokenizer.ByteTokenizer` and
:class:`~fastlm.data.hf_tokenizer.HFTokenizer`, and the checks both use.

The interface follows ``transformers``: ``encode(text)`` adds the tokenizer's own special
tokens (BOS ...) unless ``add_special_tokens=False``; ``decode(ids)`` keeps special tokens
unless ``skip_special_tokens=True``; ``apply_chat_template`` renders a chat with the
tokenizer's Jinja2 template and encodes it without adding special tokens again.
"""

from __future__ import annotations

import abc
import json
import operator
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from fastlm._files import atomic_write_text
from fastlm.data.chat_template import render_chat, select_chat_template

BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|eos|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN)

FASTLM_TOKENIZER_FILE = "fastlm_tokenizer.json"
HF_TOKENIZER_FILE = "tokenizer.json"
HF_TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
HF_SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e


def check_text(text: object) -> str:
    if not isinstance(text, str):
        raise TypeError(f"encode expects text as str, got {type(text).__name__}")
    return text


def unencodable(text: str, err: UnicodeEncodeError) -> ValueError:
    return ValueError(
        f"text is not valid Unicode and cannot be encoded as UTF-8: {err.reason} "
        f"at position {err.start} ({text[err.start:err.end]!r})"
    )


def ids_to_list(ids: Sequence[int] | torch.Tensor, vocab_size: int) -> list[int]:
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


class Tokenizer(abc.ABC):
    """Common interface: ``encode`` text to ids, ``decode`` ids to text, ``save`` to a directory,
    ``apply_chat_template`` to render and encode a chat."""

    chat_template: str | dict[str, str] | None = None

    @abc.abstractmethod
    def encode(
        self,
        text: str,
        *,
        add_special_tokens: bool = True,
        add_bos: bool = False,
        add_eos: bool = False,
        split_special_tokens: bool | None = None,
    ) -> list[int]:
        """Encode ``text`` to token ids.

        ``add_special_tokens``: add what the tokenizer adds by itself (the BOS/EOS of its
        post-processor), as ``transformers``' ``tokenizer(text).input_ids``.
        ``add_bos``/``add_eos``: make sure the ids start with ``bos_token_id`` / end with
        ``eos_token_id``: added unless already there (e.g. put by the special tokens step).
        ``split_special_tokens``: overrides the tokenizer's setting for this call (False:
        special-token strings in the text become their ids; True: they are plain text).

        Raises TypeError if ``text`` is not a str, ValueError if it holds lone surrogates
        (not encodable as UTF-8) or a requested special token does not exist.
        """

    @abc.abstractmethod
    def decode(self, ids: Sequence[int] | torch.Tensor, *, skip_special_tokens: bool = False) -> str:
        """Decode token ids to text (special tokens kept unless ``skip_special_tokens``).

        Raises ValueError for an id outside ``[0, vocab_size)``.
        """

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

    @property
    def special_tokens_map(self) -> dict[str, str]:
        """Named special tokens as the template sees them: ``{"bos_token": "<s>", ...}``."""
        return {}

    @abc.abstractmethod
    def save(self, directory: str | os.PathLike[str]) -> None:
        """Write this tokenizer into ``directory`` (created if needed) for ``load_tokenizer``."""

    def encode_batch(
        self, texts: Iterable[str], *, add_special_tokens: bool = True, add_bos: bool = False, add_eos: bool = False
    ) -> list[list[int]]:
        """``[encode(t) for t in texts]``; subclasses may do it faster."""
        return [self.encode(t, add_special_tokens=add_special_tokens, add_bos=add_bos, add_eos=add_eos) for t in texts]

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids of ``text`` (no special tokens added) and each token's ``[start, end)`` character span."""
        raise NotImplementedError(f"{type(self).__name__} does not report token offsets")

    def _frame(self, ids: list[int], add_bos: bool, add_eos: bool) -> list[int]:
        """``ids`` made to start with BOS (``add_bos``) / end with EOS (``add_eos``): added only when not already there."""
        if add_bos:
            if self.bos_token_id is None:
                raise ValueError(f"add_bos=True but {type(self).__name__} has no bos token")
            if not ids or ids[0] != self.bos_token_id:
                ids.insert(0, self.bos_token_id)
        if add_eos:
            if self.eos_token_id is None:
                raise ValueError(f"add_eos=True but {type(self).__name__} has no eos token")
            if not ids or ids[-1] != self.eos_token_id:
                ids.append(self.eos_token_id)
        return ids

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = False,
        tokenize: bool = True,
        chat_template: str | None = None,
        tools: list[dict] | None = None,
        documents: list[dict] | None = None,
        **kwargs: Any,
    ) -> str | list[int]:
        """Render ``messages`` with the tokenizer's chat template, as ``transformers`` does.

        Returns the rendered string (``tokenize=False``) or its ids, encoded without adding
        special tokens (the template writes them). ``chat_template`` may name one of several
        templates or be a template source; ``kwargs`` are passed to the template (e.g.
        ``enable_thinking=False``), overriding the special-token variables.

        Raises ValueError when there is no chat template, ChatTemplateError (a ValueError)
        when the template refuses the messages, TypeError for malformed messages.
        """
        source = select_chat_template(self.chat_template, chat_template, tools)
        text = render_chat(source, messages, add_generation_prompt=add_generation_prompt, tools=tools,
                           documents=documents, special_tokens=self.special_tokens_map, **kwargs)
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def __len__(self) -> int:
        return self.vocab_size
