"""``fastlm chat``: an interactive, streaming chat with a checkpoint on the command line.

Each line read from the input is a user turn; the conversation so far is rendered with the
tokenizer's chat template (``add_generation_prompt=True``), the reply is streamed as it is
generated and then kept as the assistant turn, so the model sees the whole conversation.
Lines ``/reset`` (forget the conversation) and ``/exit`` (or end of input) are commands. When
the conversation no longer fits in the model's context, its oldest turns are dropped (the
system message stays).

Decoding settings the caller leaves unset come from the checkpoint's
``generation_config.json`` (eos ids, temperature, top_p ...), as ``fastlm.generate`` takes them.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from typing import Any, TextIO

import torch

from fastlm.data.tokenizer_base import Tokenizer
from fastlm.generate import generate_stream

__all__ = ["add_chat_parser", "chat_loop", "reply", "stop_ids"]

PROMPT = "you> "


class MessageTooLong(ValueError):
    """One user turn does not fit in the model's context with the reply's room."""


def stop_ids(model: Any, tokenizer: Tokenizer) -> list[int] | None:
    """The eos ids to stop at: the checkpoint's generation_config.json ids, else the tokenizer's eos."""
    config = getattr(model, "generation_config", None) or getattr(getattr(model, "model", None), "generation_config", None)
    if config is not None and config.eos_token_id is not None:
        eos = config.eos_token_id
        return list(eos) if isinstance(eos, list) else [eos]
    return None if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]


def _fit(messages: list[dict], tokenizer: Tokenizer, room: int) -> list[int]:
    """The prompt ids of ``messages`` (generation prompt added), dropping the oldest non-system
    turns in place until it is at most ``room`` tokens. Raises MessageTooLong when even the last
    user turn alone does not fit."""
    while True:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        if len(ids) <= room:
            return ids
        first = 1 if messages and messages[0].get("role") == "system" else 0
        if len(messages) - first <= 1:
            raise MessageTooLong(f"the message is {len(ids)} tokens with the template, more than the {room} the "
                             "model's context leaves for it; write a shorter one or lower --max-new-tokens")
        del messages[first]  # the oldest turn, with the reply to it: user/assistant stay alternating
        if len(messages) - first > 1 and messages[first].get("role") == "assistant":
            del messages[first]


def reply(model: Any, tokenizer: Tokenizer, messages: list[dict], out: TextIO, **generation: Any) -> str:
    """Generate the assistant's answer to ``messages``, writing it to ``out`` as it streams; returns it.

    ``generation`` holds ``fastlm.generate`` arguments (``max_new_tokens``, ``do_sample``, ...).
    """
    max_new = generation.get("max_new_tokens") or 256
    room = model.config.max_position_embeddings - max_new
    ids = _fit(messages, tokenizer, room)
    generation = {**generation, "max_new_tokens": max_new}
    if "eos_token_id" not in generation:
        stop = stop_ids(model, tokenizer)
        if stop is not None:
            generation["eos_token_id"] = stop
    prompt = torch.tensor([ids], device=model.device)
    generated: list[int] = []
    shown = ""
    for token in generate_stream(model, prompt, **generation):
        generated.append(int(token[0]))
        text = tokenizer.decode(generated, skip_special_tokens=True)
        if not text.endswith("\ufffd"):  # hold back an incomplete UTF-8 character
            out.write(text[len(shown):])
            out.flush()
            shown = text
    text = tokenizer.decode(generated, skip_special_tokens=True)
    out.write(text[len(shown):] + "\n")
    out.flush()
    return text


def chat_loop(model: Any, tokenizer: Tokenizer, lines: Iterable[str], out: TextIO, *, system: str | None = None,
              show_prompt: bool = False, **generation: Any) -> list[dict]:
    """Run the conversation over ``lines`` (user turns and commands); returns the final messages."""
    if tokenizer.chat_template is None:
        raise ValueError("fastlm chat needs a tokenizer with a chat template (chat_template.jinja or 'chat_template' "
                         "in tokenizer_config.json); this checkpoint has none, use `fastlm generate` instead")
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    if show_prompt:
        out.write(PROMPT)
        out.flush()
    for line in lines:
        text = line.rstrip("\n")
        if text.strip() == "/exit":
            break
        if text.strip() == "/reset":
            messages = list(start)
            out.write("(conversation reset)\n")
        elif text.strip():
            messages.append({"role": "user", "content": text})
            try:
                answer = reply(model, tokenizer, messages, out, **generation)
            except MessageTooLong as err:  # tell the user and keep chatting
                messages.pop()
                out.write(f"(not sent: {err})\n")
            else:
                messages.append({"role": "assistant", "content": answer})
        if show_prompt:
            out.write(PROMPT)
            out.flush()
    return messages


def _check(args: argparse.Namespace) -> None:
    """Every option checked before anything is loaded."""
    from fastlm.cli_generate import check_sampling_and_model

    check_sampling_and_model(args)


def _run(args: argparse.Namespace) -> int:
    from fastlm import load_tokenizer
    from fastlm.cli_generate import _load_model

    _check(args)
    tokenizer = load_tokenizer(args.model)
    if tokenizer.chat_template is None:
        raise ValueError(f"--model {args.model}: the tokenizer has no chat template (chat_template.jinja or "
                         "'chat_template' in tokenizer_config.json); use fastlm generate instead")
    model = _load_model(args.model, args.device)
    if args.adapter:
        from fastlm import peft

        model = peft.from_pretrained(model, args.adapter)
    given = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                 repetition_penalty=args.repetition_penalty)  # the others: generation_config.json's
    generation = dict(max_new_tokens=args.max_new_tokens, seed=args.seed,
                      **{k: v for k, v in given.items() if v is not None})
    if args.greedy:
        generation["do_sample"] = False
    chat_loop(model, tokenizer, sys.stdin, sys.stdout, system=args.system, show_prompt=sys.stdin.isatty(),
              **generation)
    return 0


def add_chat_parser(sub: Any) -> None:
    """Register ``fastlm chat`` on the subcommand parsers ``sub``."""
    from fastlm.cli import add_parser

    chat = add_parser(sub, "chat", help="interactive streaming chat with a checkpoint (its chat template)",
                      description="Chat with a checkpoint through its chat template; /reset starts over, /exit ends.")
    chat.add_argument("--model", required=True, help="checkpoint directory with a tokenizer and a chat template")
    chat.add_argument("--adapter", help="a PEFT adapter folder (LoRA or prompt tuning) for --model")
    chat.add_argument("--system", help="a system message opening the conversation")
    chat.add_argument("--max-new-tokens", type=int, default=256, help="longest reply")
    chat.add_argument("--greedy", action="store_true", help="greedy decoding (default: generation_config.json's)")
    chat.add_argument("--temperature", type=float, default=None, help="sampling temperature (default: "
                                                                      "generation_config.json's)")
    chat.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens (default: "
                                                            "generation_config.json's)")
    chat.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass (default: "
                                                              "generation_config.json's)")
    chat.add_argument("--repetition-penalty", type=float, default=None, help="penalty on repeated tokens (default: "
                                                                            "generation_config.json's)")
    chat.add_argument("--seed", type=int, default=0, help="random seed of sampling")
    chat.add_argument("--device", default=None, help="cpu or cuda (default: cpu)")
    chat.set_defaults(func=_run)
