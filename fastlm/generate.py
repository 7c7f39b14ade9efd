"""``fastlm.generate``: decoding with transformers' argument names.

Strategies: greedy (default), sampling (``do_sample`` with temperature/top_k/top_p),
``repetition_penalty``, beam search (``num_beams``, ``length_penalty``, ``early_stopping``),
contrastive search (``penalty_alpha`` with ``top_k``) and speculative decoding
(``draft_model``). Prompts are a (B, T) tensor — the result is (B, T + n), prompt included, as
transformers returns — or a list of token-id lists of different lengths — the result is a list
of 1-D tensors, each exactly what that prompt gives alone. Generation stops at
``max_new_tokens``, at ``eos_token_id`` (one id or several) or at ``stop_strings`` (with
``tokenizer``), per sequence; finished sequences are padded with ``pad_token_id`` (default: the
first eos id) in tensor results. ``generator`` or ``seed`` make sampling reproducible;
``streamer`` receives each step's tokens (B,) as they are produced, and
:func:`generate_stream` yields them. ``cache_implementation="paged"`` decodes greedy/sampled
batches through a :class:`fastlm.PagedKVCache` (the default is the static cache).
Arguments not passed (``do_sample``, ``temperature``, ``top_k``, ``top_p``, ``repetition_penalty``,
``max_new_tokens``, ``eos_token_id``, ``pad_token_id``) come from ``model.generation_config``
(a checkpoint's ``generation_config.json``, see :mod:`fastlm.io.generation_config`), else the
defaults (greedy, 32 new tokens); passed explicitly, None wins as in transformers. ``compile=True`` (greedy and sampling over the static cache) runs each decode step through
torch.compile — a CUDA graph on GPU (see :mod:`fastlm.decoding.step`); the first call pays the
compilation, later calls with the same batch size and length bucket reuse it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch

from fastlm.decoding.beam import beam_search
from fastlm.decoding.common import Prompts, StopStrings, eos_set, prepare_prompts
from fastlm.decoding.contrastive import contrastive_search
from fastlm.decoding.sampling import decode_steps
from fastlm.io.generation_config import UNSET, resolve_generation_args
from fastlm.model import Model


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"generate: {name} must be an integer >= {minimum}, got {value!r}")


def _defaults(model: Model, *values):
    """The arguments not passed taken from ``model.generation_config``, then the defaults (fastlm.io.generation_config)."""
    names = ("max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "repetition_penalty", "eos_token_id",
             "pad_token_id")
    return tuple(resolve_generation_args(model, **dict(zip(names, values))).values())


def _settings(model: Model, input_ids, *, max_new_tokens, do_sample, temperature, top_k, top_p, repetition_penalty,
              eos_token_id, pad_token_id, generator, seed):
    """Validated common settings: (prompts, eos ids, pad id, sampling params, generator)."""
    _check_int("max_new_tokens", max_new_tokens, 0)
    if not (isinstance(repetition_penalty, (int, float)) and repetition_penalty > 0):
        raise ValueError(f"generate: repetition_penalty must be > 0, got {repetition_penalty!r}")
    vocab = model.config.vocab_size
    eos_ids = eos_set(eos_token_id, vocab)
    pad = pad_token_id if pad_token_id is not None else (eos_ids[0] if eos_ids else 0)
    prompts = prepare_prompts(input_ids, model.device, vocab, pad)
    total = prompts.ids.shape[1] + max_new_tokens
    context = model.config.context_length
    if total > context:
        raise ValueError(
            f"generate: prompt ({prompts.ids.shape[1]}) + max_new_tokens ({max_new_tokens}) = {total} tokens "
            f"exceeds the model's context of {context}"
        )
    if do_sample:
        if not (isinstance(temperature, (int, float)) and temperature > 0):
            raise ValueError("generate: do_sample=True needs temperature > 0 (use do_sample=False for greedy)")
    else:
        temperature, top_k, top_p = 0.0, None, None
    if seed is not None:
        if generator is not None:
            raise ValueError("generate: give either generator= or seed=, not both")
        generator = torch.Generator(device=model.device).manual_seed(seed)
    return prompts, eos_ids, pad, temperature, top_k, top_p, generator


def _ragged_result(prompts: Prompts, generated: torch.Tensor, eos_ids: list[int]) -> list[torch.Tensor]:
    """Per prompt: its valid tokens and its generated ones up to and including its first eos."""
    results = []
    for row, n in enumerate(prompts.lens.tolist()):
        new = generated[row]
        if eos_ids:
            stop = torch.isin(new, torch.tensor(eos_ids, device=new.device)).nonzero()
            if len(stop):
                new = new[: int(stop[0]) + 1]
        results.append(torch.cat((prompts.ids[row, :n], new)))
    return results


def generate_stream(
    model: Model,
    input_ids,
    *,
    max_new_tokens: int = UNSET,
    do_sample: bool = UNSET,
    temperature: float = UNSET,
    top_k: int | None = UNSET,
    top_p: float | None = UNSET,
    repetition_penalty: float = UNSET,
    eos_token_id: int | Sequence[int] | None = UNSET,
    pad_token_id: int | None = UNSET,
    stop_strings: Sequence[str] | None = None,
    tokenizer=None,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    compile: bool = False,
) -> Iterator[torch.Tensor]:
    """Yield the tokens (B,) of each step as they are produced (greedy or sampling)."""
    max_new_tokens, do_sample, temperature, top_k, top_p, repetition_penalty, eos_token_id, pad_token_id = \
        _defaults(model, max_new_tokens, do_sample, temperature, top_k, top_p, repetition_penalty, eos_token_id,
                  pad_token_id)
    prompts, eos_ids, pad, temperature, top_k, top_p, generator = _settings(
        model, input_ids, max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_k=top_k,
        top_p=top_p, repetition_penalty=repetition_penalty, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
        generator=generator, seed=seed)
    stops = StopStrings(stop_strings, tokenizer, prompts.ids.shape[0]) if stop_strings else None
    with torch.no_grad():
        for token, _ in decode_steps(model, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                                     top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty,
                                     eos_ids=eos_ids, pad_id=pad, stop_strings=stops, generator=generator,
                                     sync_every=1, compile=compile):
            yield token


@torch.no_grad()
def generate(
    model: Model,
    input_ids,
    *,
    max_new_tokens: int = UNSET,
    do_sample: bool = UNSET,
    temperature: float = UNSET,
    top_k: int | None = UNSET,
    top_p: float | None = UNSET,
    repetition_penalty: float = UNSET,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
    penalty_alpha: float | None = None,
    draft_model: Model | None = None,
    num_draft_tokens: int = 4,
    eos_token_id: int | Sequence[int] | None = UNSET,
    pad_token_id: int | None = UNSET,
    stop_strings: Sequence[str] | None = None,
    tokenizer=None,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    streamer: Callable[[torch.Tensor], None] | None = None,
    cache_implementation: str = "static",
    compile: bool = False,
) -> torch.Tensor | list[torch.Tensor]:
    """Continue each prompt; see the module docstring for the strategies and arguments."""
    max_new_tokens, do_sample, temperature, top_k, top_p, repetition_penalty, eos_token_id, pad_token_id = \
        _defaults(model, max_new_tokens, do_sample, temperature, top_k, top_p, repetition_penalty, eos_token_id,
                  pad_token_id)
    _check_int("num_beams", num_beams, 1)
    if cache_implementation not in ("static", "paged"):
        raise ValueError(f"generate: cache_implementation must be 'static' or 'paged', got {cache_implementation!r}")
    contrastive_top_k = top_k  # greedy settings drop top_k, which contrastive search uses
    prompts, eos_ids, pad, temperature, top_k, top_p, generator = _settings(
        model, input_ids, max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_k=top_k,
        top_p=top_p, repetition_penalty=repetition_penalty, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
        generator=generator, seed=seed)
    special = [name for name, on in (("num_beams > 1", num_beams > 1), ("penalty_alpha", penalty_alpha is not None),
                                     ("draft_model", draft_model is not None)) if on]
    if len(special) > 1:
        raise ValueError(f"generate: choose one strategy, got {' and '.join(special)}")
    if special and (stop_strings or streamer is not None or compile):
        raise ValueError(f"generate: stop_strings, streamer and compile work with greedy and sampling, "
                         f"not {special[0]}")
    if compile and cache_implementation == "paged":
        raise ValueError("generate: compile=True decodes over the static cache, not cache_implementation='paged'")
    if max_new_tokens == 0:
        return _ragged_result(prompts, prompts.ids[:, :0], eos_ids) if prompts.ragged else prompts.ids
    if special:
        if prompts.ragged:  # each prompt alone, exactly
            return [generate(model, row[None], max_new_tokens=max_new_tokens, do_sample=do_sample,
                             temperature=temperature or 1.0, top_k=top_k if do_sample else contrastive_top_k,
                             top_p=top_p,
                             repetition_penalty=repetition_penalty, num_beams=num_beams,
                             length_penalty=length_penalty, early_stopping=early_stopping,
                             penalty_alpha=penalty_alpha, draft_model=draft_model,
                             num_draft_tokens=num_draft_tokens, eos_token_id=eos_token_id, pad_token_id=pad,
                             generator=generator)[0]
                    for row in _ragged_result(prompts, prompts.ids[:, :0], [])]
        return _special(model, prompts.ids, max_new_tokens=max_new_tokens, do_sample=do_sample,
                        temperature=temperature, top_k=top_k if do_sample else contrastive_top_k, top_p=top_p, repetition_penalty=repetition_penalty,
                        num_beams=num_beams, length_penalty=length_penalty, early_stopping=early_stopping,
                        penalty_alpha=penalty_alpha, draft_model=draft_model, num_draft_tokens=num_draft_tokens,
                        eos_ids=eos_ids, pad=pad, generator=generator)

    stops = StopStrings(stop_strings, tokenizer, prompts.ids.shape[0]) if stop_strings else None
    tokens, flags = [], []  # flags: each step's finished (B,) bool, kept on the device (no sync)
    trim = bool(eos_ids) or stops is not None
    for token, finished in decode_steps(
            model, prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
            repetition_penalty=repetition_penalty, eos_ids=eos_ids, pad_id=pad, stop_strings=stops,
            generator=generator, paged=cache_implementation == "paged", compile=compile):
        tokens.append(token)
        if trim:
            flags.append(finished)
        if streamer is not None:
            streamer(token)
    generated = torch.stack(tokens, dim=1)
    if trim:  # drop the steps run after every sequence had finished
        done = torch.stack(flags, dim=1)  # (B, n)
        finished_at = torch.where(done.any(1), done.int().argmax(1), generated.shape[1] - 1)
        generated = generated[:, : int(finished_at.max()) + 1]
    if prompts.ragged:
        return _ragged_result(prompts, generated, eos_ids)
    return torch.cat((prompts.ids, generated), dim=1)


def _special(model, ids, *, max_new_tokens, do_sample, temperature, top_k, top_p, repetition_penalty, num_beams,
             length_penalty, early_stopping, penalty_alpha, draft_model, num_draft_tokens, eos_ids, pad, generator):
    if num_beams > 1:
        if do_sample:
            raise NotImplementedError("generate: beam sampling (num_beams > 1 with do_sample=True) is not supported")
        if early_stopping not in (True, False, "never"):
            raise ValueError(f"generate: early_stopping must be True, False or 'never', got {early_stopping!r}")
        return beam_search(model, ids, max_new_tokens=max_new_tokens, num_beams=num_beams,
                           length_penalty=length_penalty, early_stopping=early_stopping,
                           repetition_penalty=repetition_penalty, eos_ids=eos_ids, pad_id=pad)
    if penalty_alpha is not None:
        if not 0 <= penalty_alpha <= 1:
            raise ValueError(f"generate: penalty_alpha must be in [0, 1], got {penalty_alpha}")
        if top_k is None and not do_sample:
            raise ValueError("generate: contrastive search needs top_k (e.g. penalty_alpha=0.6, top_k=4)")
        return contrastive_search(model, ids, max_new_tokens=max_new_tokens, penalty_alpha=penalty_alpha,
                                  top_k=top_k, eos_ids=eos_ids, pad_id=pad)
    from fastlm.decoding.speculative import speculative_decode

    _check_int("num_draft_tokens", num_draft_tokens, 1)
    return speculative_decode(model, draft_model, ids, max_new_tokens=max_new_tokens, temperature=temperature,
                              top_k=top_k, top_p=top_p, num_draft_tokens=num_draft_tokens, eos_ids=eos_ids,
                              pad_id=pad, generator=generator)
