"""Beam search with transformers' semantics (same tokens on the same weights).

Per step, for B prompts × num_beams running beams: log-softmax of the next-token logits
(repetition penalty applied to them as transformers does), plus each beam's running score,
flattened over (beam, token); the top K = max(2, 1 + #eos) · num_beams continuations are kept.
Continuations ending in eos (or reaching max length) join the finished hypotheses with score
Σ log p / generated_len^length_penalty when among the top num_beams; the best num_beams others
keep running. Stops when no running beam can beat the finished ones (transformers' early-stop
heuristic for ``early_stopping`` False/True/"never"), and returns the best hypothesis.
The stop condition stays on the device and is read every ``CHECK_EVERY`` steps; the steps run
past the end until then leave the finished hypotheses unchanged.
"""

from __future__ import annotations

import torch

from fastlm.decoding.common import apply_repetition_penalty

_NEG = -1.0e9
CHECK_EVERY = 4  # steps between host reads of the stop condition (one read each)


def _gather(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """t (B, K, ...) gathered along dim 1 with index (B, k)."""
    while index.dim() < t.dim():
        index = index.unsqueeze(-1)
    return torch.gather(t, 1, index.expand(*index.shape[:2], *t.shape[2:]))


@torch.no_grad()
def beam_search(
    model,
    ids: torch.Tensor,
    *,
    max_new_tokens: int,
    num_beams: int,
    length_penalty: float,
    early_stopping: bool | str,
    repetition_penalty: float,
    eos_ids: list[int],
    pad_id: int,
) -> torch.Tensor:
    """ids (B, T) equal-length prompts -> (B, T + n) best beams (prompt included)."""
    b, prompt_len = ids.shape
    max_length = prompt_len + max_new_tokens
    keep = max(2, 1 + len(eos_ids)) * num_beams
    device = ids.device
    top_mask = torch.arange(keep, device=device) < num_beams
    eos = torch.tensor(eos_ids, device=device, dtype=torch.int64)

    running = torch.full((b, num_beams, max_length), pad_id, dtype=torch.int64, device=device)
    running[:, :, :prompt_len] = ids[:, None]
    finished_seqs = running.clone()
    running_scores = torch.zeros(b, num_beams, device=device)
    running_scores[:, 1:] = _NEG
    finished_scores = torch.full((b, num_beams), _NEG, device=device)
    is_finished = torch.zeros(b, num_beams, dtype=torch.bool, device=device)
    improvable = torch.ones(b, 1, dtype=torch.bool, device=device)
    gen_len = torch.zeros(b, num_beams, dtype=torch.int64, device=device)  # generated tokens per finished beam
    done = torch.zeros((), dtype=torch.bool, device=device)  # the search has ended (kept on the device)

    cache = model.new_cache(b * num_beams, max_length)
    logits = model(running[:, :, :prompt_len].reshape(b * num_beams, prompt_len), cache=cache)[:, -1]
    cur = prompt_len
    while True:
        log_probs = torch.log_softmax(logits.float(), dim=-1)  # (B·nb, V)
        vocab = log_probs.shape[-1]
        if repetition_penalty != 1.0:
            present = torch.zeros_like(log_probs, dtype=torch.bool)
            present.scatter_(1, running[:, :, :cur].reshape(b * num_beams, cur), True)
            log_probs = apply_repetition_penalty(log_probs, present, repetition_penalty)
        scores = (log_probs.view(b, num_beams, vocab) + running_scores[:, :, None]).view(b, -1)
        top_scores, top_index = torch.topk(scores, keep)
        top_beam, top_token = top_index // vocab, top_index % vocab
        candidates = _gather(running, top_beam)
        candidates[:, :, cur] = top_token
        stops = torch.isin(top_token, eos) if eos_ids else torch.zeros_like(top_token, dtype=torch.bool)
        if cur + 1 >= max_length:
            stops = torch.ones_like(stops)

        # The best num_beams continuations that did not stop keep running.
        masked = top_scores + stops.float() * _NEG
        next_index = torch.topk(masked, num_beams).indices
        running = _gather(candidates, next_index)
        running_scores = _gather(masked, next_index)
        source_beam = _gather(top_beam, next_index)

        # Stopped continuations among the top num_beams join the finished hypotheses.
        just_finished = stops & top_mask[None, :]
        final = top_scores / ((cur + 1 - prompt_len) ** length_penalty)
        full = is_finished.all(dim=-1, keepdim=True) & (early_stopping is True)
        final = final + full.float() * _NEG + (~improvable).float() * _NEG + (~just_finished).float() * _NEG
        merged_scores = torch.cat((finished_scores, final), dim=1)
        best = torch.topk(merged_scores, num_beams).indices
        # Steps run after the search ended (it is read back every CHECK_EVERY steps) change nothing.
        finished_seqs = torch.where(done, finished_seqs, _gather(torch.cat((finished_seqs, candidates), dim=1), best))
        finished_scores = torch.where(done, finished_scores, _gather(merged_scores, best))
        is_finished = torch.where(done, is_finished, _gather(torch.cat((is_finished, just_finished), dim=1), best))
        new_len = torch.full_like(top_token, cur + 1 - prompt_len)
        gen_len = torch.where(done, gen_len, _gather(torch.cat((gen_len, new_len), dim=1), best))

        cur += 1
        if early_stopping == "never" and length_penalty > 0.0:
            hypothetical = max_length - prompt_len
        else:
            hypothetical = cur - prompt_len
        best_running = running_scores[:, :1] / (hypothetical**length_penalty)
        worst_finished = torch.where(is_finished, finished_scores.min(dim=1, keepdim=True).values, -1.0e9)
        improvable = improvable & (best_running > worst_finished).any(dim=-1, keepdim=True)
        closed = is_finished.all() & (early_stopping is True)
        done = done | ~improvable.any() | closed | stops.all()  # 0-d bool, on the device
        if cur >= max_length or (cur - prompt_len) % CHECK_EVERY == 0 and bool(done):
            break
        flat_source = (source_beam + torch.arange(b, device=device)[:, None] * num_beams).flatten()
        cache.reorder(flat_source)
        logits = model(running[:, :, cur - 1].reshape(-1, 1), cache=cache, validate=False)[:, -1]
    length = prompt_len + int(gen_len[:, 0].max())
    return finished_seqs[:, 0, :length]
