"""Loglikelihood scoring, multiple-choice accuracy and batched generation, as lm-evaluation-harness
defines them.

Loglikelihood of a continuation c given a context x (the harness's ``loglikelihood``):

    logprob = Σ_i log p(c_i | x, c_<i),   is_greedy = all_i argmax_v p(v | x, c_<i) == c_i

Encoding follows the harness's causal ``TemplateLM``: trailing spaces of the context move to the
continuation; the pair is encoded whole and the context alone, and the continuation is the
tail of the whole encoding after the context's length; an empty context becomes the prefix
token (BOS, else EOS). Inputs longer than the model's context are cut from the left. Requests
are sorted longest first (ties by tokens), batched and right-padded, and the results returned in
the original order.

Multiple choice (``output_type: multiple_choice``): each choice is scored as the continuation
``target_delimiter + choice``; ``acc`` = [argmax_j ll_j == gold] and ``acc_norm`` =
[argmax_j ll_j / len(choice_j) == gold] with len in characters of the choice without the
delimiter (the harness's definition; ties go to the first choice, as numpy's argmax).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)


def tqdm_disable(progress: bool | None) -> bool | None:
    """tqdm's ``disable``: None shows the bar only on a terminal."""
    return None if progress is None else not progress


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens (fastlm and transformers tokenizers)."""
    try:
        params = inspect.signature(tokenizer.encode).parameters
    except (TypeError, ValueError):
        params = {}
    if "add_special_tokens" in params:
        return list(tokenizer.encode(text, add_special_tokens=False))
    return list(tokenizer.encode(text))


def prefix_token_id(tokenizer) -> int:
    """The token that stands for an empty context: BOS, else EOS (the harness's choice)."""
    for name in ("bos_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return value
    raise ValueError("an empty context needs a BOS or EOS token, and the tokenizer has neither")


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) by the harness's rules (module docstring)."""
    if context == "":
        cont = encode(tokenizer, continuation)
        prefix = prefix_token_id(tokenizer)
        return ([prefix], cont) if not cont or cont[0] != prefix else (cont[:1], cont[1:])
    spaces = len(context) - len(context.rstrip())
    if spaces:
        continuation, context = context[-spaces:] + continuation, context[:-spaces]
    whole = encode(tokenizer, context + continuation)
    ctx = encode(tokenizer, context)
    return ctx, whole[len(ctx):]


@torch.no_grad()
def loglikelihood_tokens(model, requests: Sequence[tuple[Sequence[int], Sequence[int]]], *, batch_size: int = 16,
                         max_length: int | None = None, progress: bool | None = None,
                         stats: dict | None = None) -> list[tuple[float, bool]]:
    """(logprob, is_greedy) of each (context ids, continuation ids) request, in the given order.

    Each request's input is (context + continuation)[-(max_length + 1):][:-1] (max_length:
    the model's context by default); the continuation's log-probs are read off the last
    len(continuation) positions. One host read per batch. ``stats["tokens"]`` (if given) adds
    the number of input tokens run through the model."""
    from tqdm.auto import tqdm

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"loglikelihood: batch_size must be a positive integer, got {batch_size!r}")
    max_length = model.config.max_position_embeddings if max_length is None else max_length
    for i, (ctx, cont) in enumerate(requests):
        if not ctx or not cont:
            raise ValueError(f"loglikelihood: request {i} has an empty {'context' if not ctx else 'continuation'} "
                             "after tokenization")
        if len(cont) > max_length:
            raise ValueError(f"loglikelihood: request {i}'s continuation ({len(cont)} tokens) is longer than the "
                             f"model's context ({max_length})")
    order = sorted(range(len(requests)), key=lambda i: (-(len(requests[i][0]) + len(requests[i][1])),
                                                          tuple(requests[i][0]) + tuple(requests[i][1])))
    results: list[tuple[float, bool] | None] = [None] * len(requests)
    was_training = model.training
    model.eval()
    try:
        for start in tqdm(range(0, len(order), batch_size), desc="loglikelihood", disable=tqdm_disable(progress)):
            rows = order[start:start + batch_size]
            inputs = [(list(requests[i][0]) + list(requests[i][1]))[-(max_length + 1):][:-1] for i in rows]
            width = max(len(x) for x in inputs)
            if stats is not None:
                stats["tokens"] = stats.get("tokens", 0) + sum(len(x) for x in inputs)
            batch = torch.zeros(len(rows), width, dtype=torch.int64)
            targets = torch.zeros(len(rows), width, dtype=torch.int64)
            mask = torch.zeros(len(rows), width, dtype=torch.bool)
            for r, (i, inp) in enumerate(zip(rows, inputs)):
                cont = list(requests[i][1])
                batch[r, :len(inp)] = torch.tensor(inp)
                targets[r, len(inp) - len(cont):len(inp)] = torch.tensor(cont)
                mask[r, len(inp) - len(cont):len(inp)] = True
            device = model.device
            batch, targets, mask = batch.to(device), targets.to(device), mask.to(device)
            logprobs = torch.log_softmax(model(batch).float(), dim=-1)  # (B, W, V)
            picked = logprobs.gather(-1, targets[..., None]).squeeze(-1)  # (B, W)
            total = (picked * mask).sum(1)  # (B,)
            greedy = ((logprobs.argmax(-1) == targets) | ~mask).all(1)  # (B,)
            for i, value, flag in zip(rows, total.tolist(), greedy.tolist()):
                results[i] = (value, flag)
    finally:
        model.train(was_training)
    return results  # type: ignore[return-value]


def loglikelihood(model, tokenizer, pairs: Sequence[tuple[str, str]], *, batch_size: int = 16,
                  progress: bool | None = None, stats: dict | None = None) -> list[tuple[float, bool]]:
    """(sum of log-probs, is_greedy) of each continuation given its context (module docstring)."""
    requests = []
    for i, pair in enumerate(pairs):
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(isinstance(s, str) for s in pair)):
            raise TypeError(f"loglikelihood: pairs[{i}] must be a (context, continuation) pair of strings, "
                            f"got {pair!r}")
        requests.append(encode_pair(tokenizer, pair[0], pair[1]))
    return loglikelihood_tokens(model, requests, batch_size=batch_size, progress=progress, stats=stats)


@dataclass
class ChoiceResult:
    """Per example: log-likelihood of each choice, the predictions and whether they are right."""

    loglikelihoods: list[float]
    pred: int
    pred_norm: int
    acc: float
    acc_norm: float


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda j: (values[j], -j))


def choice_results(loglikelihoods: Sequence[float], choices: Sequence[str], gold: int) -> ChoiceResult:
    """acc and acc_norm of one example from the choices' log-likelihoods (harness definition)."""
    pred = _argmax(loglikelihoods)
    normed = [ll / len(c) if len(c) else float("-inf") for ll, c in zip(loglikelihoods, choices)]
    pred_norm = _argmax(normed)
    return ChoiceResult(list(loglikelihoods), pred, pred_norm, float(pred == gold), float(pred_norm == gold))


def multiple_choice(model, tokenizer, examples: Sequence[tuple[str, Sequence[str], int]], *,
                    target_delimiter: str = " ", batch_size: int = 16,
                    progress: bool | None = None,
                    stats: dict | None = None) -> tuple[dict[str, float], list[ChoiceResult]]:
    """({"acc", "acc_norm"} as fractions, per-example results) of (context, choices, gold) examples."""
    pairs, spans = [], []
    for i, (context, choices, gold) in enumerate(examples):
        if not choices:
            raise ValueError(f"multiple_choice: example {i} has no choices")
        if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(choices):
            raise ValueError(f"multiple_choice: example {i}: gold must be an index in [0, {len(choices)}), "
                             f"got {gold!r}")
        spans.append((len(pairs), len(choices)))
        pairs.extend((context, target_delimiter + choice) for choice in choices)
    scores = loglikelihood(model, tokenizer, pairs, batch_size=batch_size, progress=progress, stats=stats)
    results = [choice_results([s for s, _ in scores[a:a + n]], ex[1], ex[2]) for (a, n), ex in zip(spans, examples)]
    count = max(len(results), 1)
    return ({"acc": sum(r.acc for r in results) / count, "acc_norm": sum(r.acc_norm for r in results) / count},
            results)


def chat_prompt(tokenizer, prompt: str, system: str | None = None) -> str:
    """``prompt`` as a user turn rendered by the tokenizer's chat template (generation prompt on)."""
    apply = getattr(tokenizer, "apply_chat_template", None)
    if apply is None:
        raise ValueError(f"chat=True needs a tokenizer with apply_chat_template; {type(tokenizer).__name__} has "
                         "none (this fastlm tokenizer predates chat templates): use chat: false")
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return apply(messages, add_generation_prompt=True, tokenize=False)


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """The text before the first occurrence of any stop string (the harness's post-processing)."""
    for s in stop:
        if s:
            text = text.split(s)[0]
    return text


@torch.no_grad()
def generate_texts(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 64,
                   stop: Sequence[str] = (), do_sample: bool = False, temperature: float = 1.0,
                   top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                   chat: bool = False, system: str | None = None, batch_size: int = 16,
                   progress: bool | None = None) -> tuple[list[str], int]:
    """Completions of ``prompts`` through :func:`fastlm.generate` (batched, longest first), each cut
    at its first stop string; also the number of tokens generated. Prompts longer than the
    context minus max_new_tokens are cut from the left (as the harness does)."""
    from tqdm.auto import tqdm

    from fastlm.generate import generate

    texts = [chat_prompt(tokenizer, p, system) if chat else p for p in prompts]
    encoded = [encode(tokenizer, t) for t in texts]
    room = model.config.max_position_embeddings - max_new_tokens
    if room < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's context of "
                         f"{model.config.max_position_embeddings}")
    for i, ids in enumerate(encoded):
        if not ids:
            encoded[i] = [prefix_token_id(tokenizer)]
        elif len(ids) > room:
            logger.warning("prompt %d has %d tokens; keeping the last %d", i, len(ids), room)
            encoded[i] = ids[-room:]
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    outputs: list[str] = [""] * len(encoded)
    generated = 0
    eos = getattr(tokenizer, "eos_token_id", None)
    for start in tqdm(range(0, len(order), batch_size), desc="generate", disable=tqdm_disable(progress)):
        rows = order[start:start + batch_size]
        result = generate(model, [encoded[i] for i in rows], max_new_tokens=max_new_tokens, do_sample=do_sample,
                          temperature=temperature, top_k=top_k, top_p=top_p, eos_token_id=eos,
                          stop_strings=list(stop) or None, tokenizer=tokenizer if stop else None,
                          seed=None if seed is None else seed + start)
        for i, seq in zip(rows, result):
            new = seq[len(encoded[i]):].tolist()
            generated += len(new)
            outputs[i] = cut_at_stop(tokenizer.decode(new), stop)
    return outputs, generated
