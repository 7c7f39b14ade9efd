"""Supervised fine-tuning examples from chats, rendered with the model's own chat template.

A training row is either a prompt/completion pair (``{"prompt": str, "completion": str}``) or a
conversation (``{"messages": [{"role": ..., "content": ...}, ...]}``). With the ``"chat"``
template (the default when the tokenizer has a chat template) a row is rendered with
``tokenizer.apply_chat_template`` and the loss is taken on the assistant turns only, every
assistant turn of a multi-turn chat:

- when the template marks assistant text with ``{% generation %}`` blocks, those spans are the
  learned text (as ``transformers``' ``return_assistant_tokens_mask``);
- otherwise each assistant turn ``k`` is found by rendering prefixes, as TRL's assistant-only
  loss does: it spans from the end of ``render(messages[:k], add_generation_prompt=True)`` to
  the end of ``render(messages[:k+1])``, so it includes the turn's end token (``<|im_end|>``,
  ``<|eot_id|>``, ``<end_of_turn>``) the model must learn to stop with.

Token ``i`` is learned when its character span overlaps an assistant span. A prompt/completion
pair becomes ``[{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, Union

from fastlm.data.chat_template import compile_chat_template, render_chat, select_chat_template
from fastlm.data.tokenizer_base import Tokenizer

__all__ = [
    "IGNORE_INDEX",
    "Row",
    "check_special_tokens",
    "encode_chat_example",
    "encode_rows",
    "parse_row",
    "resolve_template",
]

IGNORE_INDEX = -100
Row = Union[tuple[str, str], list[dict]]  # (prompt, completion) or a list of messages


def parse_row(row: object, where: str) -> Row:
    """One jsonl row: ``{"prompt", "completion"}`` strings, or ``{"messages": [...]}``.

    Raises ValueError naming ``where`` (``file:line``) and the expected shapes.
    """
    if isinstance(row, dict) and "messages" in row:
        messages = row["messages"]
        if not (isinstance(messages, list) and messages and all(isinstance(m, dict) for m in messages)):
            raise ValueError(f'{where}: "messages" must be a non-empty list of {{"role": ..., "content": ...}} objects')
        for i, message in enumerate(messages):
            if not isinstance(message.get("role"), str):
                raise ValueError(f'{where}: messages[{i}] has no "role" string')
        return messages
    if isinstance(row, dict) and isinstance(row.get("prompt"), str) and isinstance(row.get("completion"), str):
        return row["prompt"], row["completion"]
    raise ValueError(f'{where}: expected {{"prompt": str, "completion": str}} or {{"messages": [...]}}')


def resolve_template(tokenizer: Tokenizer, template: str | None, plain_templates: Sequence[str] = ()) -> str:
    """The template to build examples with: ``template``, or (None) ``"chat"`` when the
    tokenizer has a chat template, else ``"plain"``.

    Raises ValueError for ``"chat"`` without a chat template, or an unknown name.
    """
    if template is None:
        return "chat" if tokenizer.chat_template is not None else "plain"
    if template == "chat":
        if tokenizer.chat_template is None:
            raise ValueError("--template chat needs a tokenizer with a chat template (chat_template.jinja or "
                             "'chat_template' in tokenizer_config.json), and this checkpoint's tokenizer has none; "
                             f"use one of: {', '.join(plain_templates) or 'plain'}")
        return template
    if plain_templates and template not in plain_templates:
        raise ValueError(f"unknown prompt template {template!r}; available: chat, {', '.join(plain_templates)}")
    return template


def check_special_tokens(tokenizer: Tokenizer, tokens: Sequence[str], template: str) -> None:
    """Make sure each of ``tokens`` encodes to one id (a real special token, not its text pieces)."""
    for token in tokens:
        ids = tokenizer.encode(token, add_special_tokens=False, split_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(f"--template {template} writes {token!r}, but this tokenizer has no such token "
                             f"(it encodes to {len(ids)} ordinary pieces); use a tokenizer with {template} tokens "
                             "or --template plain")


def _assistant_spans(tokenizer: Tokenizer, source: str, messages: list[dict], text: str,
                     kwargs: Mapping[str, Any]) -> list[tuple[int, int]]:
    """Character spans of the assistant turns in ``text`` (the whole rendered chat)."""
    special = tokenizer.special_tokens_map
    if re.search(r"\{%-?\s*generation\s*-?%\}", source):
        rendered, spans = render_chat(source, messages, special_tokens=special, return_generation_spans=True, **kwargs)
        if rendered != text:
            raise ValueError("the chat template renders differently when tracking {% generation %} blocks")
        if spans:
            return spans
    spans = []
    for k, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        before = render_chat(source, messages[:k], add_generation_prompt=True, special_tokens=special, **kwargs) \
            if k else ""
        through = render_chat(source, messages[: k + 1], special_tokens=special, **kwargs)
        if not (text.startswith(through) and through.startswith(before)):
            raise ValueError(
                f"cannot find assistant turn {k} in the rendered chat: this chat template does not render the "
                "conversation up to that turn as a prefix of the whole (e.g. it rewrites earlier turns); add "
                "{% generation %} blocks around assistant text to the template")
        spans.append((len(before), len(through)))
    return spans


def encode_chat_example(tokenizer: Tokenizer, messages: list[dict], max_len: int, *,
                        chat_template: str | None = None, **kwargs: Any) -> tuple[list[int], list[int]]:
    """(input ids, targets) of one chat: targets are the ids on assistant tokens, ``IGNORE_INDEX``
    elsewhere; truncated to ``max_len + 1`` tokens.

    Raises ValueError when the chat has no assistant turn, the template refuses the messages
    (ChatTemplateError) or the tokenizer has no chat template.
    """
    if not any(m.get("role") == "assistant" for m in messages):
        raise ValueError("a training chat needs at least one assistant message to learn from "
                         f"(roles: {[m.get('role') for m in messages]})")
    source = select_chat_template(tokenizer.chat_template, chat_template)
    compile_chat_template(source)
    text = render_chat(source, messages, special_tokens=tokenizer.special_tokens_map, **kwargs)
    ids, offsets = tokenizer.encode_with_offsets(text)
    spans = _assistant_spans(tokenizer, source, messages, text, kwargs)
    targets, s = [], 0
    for token, (start, end) in zip(ids, offsets):
        while s < len(spans) and start >= spans[s][1]:
            s += 1
        learned = s < len(spans) and end > spans[s][0] and end > start
        targets.append(token if learned else IGNORE_INDEX)
    return ids[: max_len + 1], targets[: max_len + 1]
