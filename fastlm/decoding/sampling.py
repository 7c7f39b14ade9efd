"""Greedy and sampled decoding through the KV cache, as a stream of per-step tokens.

Prefill runs the (right-padded, possibly ragged) prompts once; each step then feeds one token
per sequence. The loop itself never reads device values on the host, except every
``sync_every`` steps to stop once all sequences finished (only when some can: eos ids, stop
strings), and where the caller asks for it (stop strings, streaming to the host).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from fastlm import ops
from fastlm.decoding.common import (Prompts, StopStrings, apply_repetition_penalty, eos_tensor, hits_eos,
                                     presence)
from fastlm.decoding.eager import EagerStep, any_bad, reason_not_lean
from fastlm.decoding.packed import packed_linears
from fastlm.decoding.step import DecodeStep, pick_greedy, reusable_cache, weights_version
from fastlm.model import Model


def prefill(model, prompts: Prompts, cache) -> torch.Tensor:
    """Run the prompts into ``cache``; float32 logits (B, V) at each prompt's last token. A
    plain Model applies its head to those B positions only (as transformers' logits_to_keep)."""
    rows = torch.arange(prompts.ids.shape[0], device=prompts.ids.device)
    key_lens = prompts.lens if prompts.ragged else None
    if isinstance(model, Model):
        # the ids were range-checked by prepare_prompts: no second host read here
        hidden = model(prompts.ids, cache=cache, key_lens=key_lens, return_hidden=True, validate=False)
        return model.head(hidden[rows, prompts.lens - 1]).float()
    return model(prompts.ids, cache=cache, key_lens=key_lens)[rows, prompts.lens - 1].float()


def decode_steps(
    model,
    prompts: Prompts,
    *,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    repetition_penalty: float,
    eos_ids: list[int],
    pad_id: int,
    stop_strings: StopStrings | None,
    generator: torch.Generator | None,
    sync_every: int = 8,
    paged: bool = False,
    compile: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (tokens (B,), finished (B,) bool) for each generated position. With ``paged``, the
    KV cache is a :class:`fastlm.PagedKVCache` whose finished sequences give back their blocks
    at each host check. Otherwise each step is a :class:`DecodeStep` over a static cache,
    compiled with ``compile`` (the cache is then kept on the model for the next call), or
    eagerly, where it can, the lean :class:`fastlm.decoding.eager.EagerStep` (on the CPU over
    prepacked weights: :mod:`fastlm.decoding.packed`)."""
    b, t = prompts.ids.shape
    plain = isinstance(model, Model)  # adapter wrappers run their own forward at every step
    if compile and not plain:
        raise ValueError(f"generate: compile=True needs a plain fastlm.Model, got {type(model).__name__} "
                         "(merge the adapter into the model first)")
    if compile:
        cache = reusable_cache(model, b, t + max_new_tokens)
    else:
        cache = model.new_cache(b, t + max_new_tokens, paged=paged)
    last = prefill(model, prompts, cache)  # (B, V)
    lean = plain and not paged and not compile and reason_not_lean(model, cache) is None
    if lean:
        step_fn = EagerStep(model, cache, packed_linears(model, b, weights_version(model)))
    else:
        step_fn = DecodeStep(model, cache, compile=compile) if plain and not paged else None
    present = presence(prompts, last.shape[-1]) if repetition_penalty != 1.0 else None
    finished = torch.zeros(b, dtype=torch.bool, device=last.device)
    eos = eos_tensor(eos_ids, last.device)
    checks = ops.DeferredChecks()  # NaN/inf logits are flagged on the device, raised at the end
    bad_greedy = torch.zeros(b, dtype=torch.bool, device=last.device)
    bests = []  # the lean greedy steps' row maxima (B,): NaN/+inf flagged on the device, 64 steps at a time
    pad = torch.tensor(pad_id, device=last.device)

    def raise_if_bad() -> None:
        checks.raise_if_any()
        bad = bad_greedy | any_bad(bests) if bests else bad_greedy
        if bool(bad.any()):
            raise ValueError(f"generate: the logits of sequence(s) {bad.nonzero().flatten().tolist()} "
                             "contain NaN or +inf")
    # Plain greedy steps pick their tokens inside the decode step (one graph when compiled)
    fused_greedy = step_fn is not None and temperature == 0.0 and present is None and stop_strings is None
    token = None  # the first step picks from the prefill's logits
    # Without eos ids or stop strings no sequence finishes early: no host check at all.
    can_finish = eos is not None or stop_strings is not None
    for step in range(max_new_tokens):
        if fused_greedy and step > 0:
            if lean:
                token, finished, best = step_fn.greedy(token, finished, eos, pad)
                bests.append(best)
                if len(bests) == 64:  # folded now and then: a long generation keeps no long list
                    bad_greedy = bad_greedy | any_bad(bests)
                    bests.clear()
            else:
                token, finished, bad_greedy = step_fn.greedy(token, finished, bad_greedy, eos, pad_id)
            yield token, finished
        else:
            scores = last if present is None else apply_repetition_penalty(last, present, repetition_penalty)
            if temperature == 0.0:  # greedy: the first argmax; NaN/inf logits flagged on the device
                token, now_finished, bad_greedy = pick_greedy(scores, finished, bad_greedy, eos, pad_id)
            else:
                token = ops.sample(scores, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator,
                                   check=checks)
                token = torch.where(finished, pad_id, token)
                now_finished = finished | hits_eos(token, eos)
            if present is not None:
                present.scatter_(1, token[:, None], True)
            if stop_strings is not None:
                now_finished = now_finished | stop_strings.update(token, finished)
            finished = now_finished
            yield token, finished
        if step + 1 == max_new_tokens:
            raise_if_bad()
            return
        if stop_strings is not None or (can_finish and (step + 1) % sync_every == 0):
            done = finished.tolist()
            if all(done):
                raise_if_bad()
                return
            if paged:
                for seq in (i for i, d in enumerate(done) if d and not cache.released[i]):
                    cache.free(seq)
        if step_fn is None:
            last = model(token[:, None], cache=cache, validate=False)[:, -1].float()
        elif not fused_greedy:
            last = step_fn(token)


def trim_finished(tokens: torch.Tensor, finished_at: torch.Tensor) -> torch.Tensor:
    """Drop trailing steps after every sequence finished. tokens (B, n); finished_at (B,) is the
    step each sequence finished at (n when it never did)."""
    return tokens[:, : int(finished_at.max().item()) + 1] if tokens.shape[1] else tokens
