"""Speculative decoding (Leviathan et al., 2023; Chen et al., 2023) with a small draft model.

Each round the draft proposes γ tokens x_1..x_γ per sequence (drawn from its filtered
distribution q, or greedily) through the same decode step as plain generation
(:class:`fastlm.decoding.step.DecodeStep`); the target scores the last emitted token and the
proposals in one forward pass over the whole batch, giving its filtered distributions
p_1..p_γ+1. Greedy: accept while x_i = argmax p_i, then emit argmax p at the first mismatch (or
the bonus p_γ+1): the output equals the target's own greedy decoding. Sampling: accept x_i with
probability min(1, p_i(x_i) / q_i(x_i)); at the first rejection emit a draw from
norm(max(0, p_i − q_i)); if all are accepted, a draw from p_γ+1. The emitted tokens are then
distributed exactly as the target's own samples.

Acceptance, the emitted tokens, eos and each sequence's count are computed on the device, for
all sequences at once (their accepted lengths differ: each cache row is rolled back to its own
length, ``lens``); the host reads one small vector per round — whether every sequence finished,
the longest cached length (the caches' capacity bound) and the most tokens any sequence still
needs (the next round's γ), the longest output so far — never per accepted token.
"""

from __future__ import annotations

import torch

from fastlm.decoding.common import eos_tensor, hits_eos
from fastlm.decoding.step import DecodeStep
from fastlm.model import Model
from fastlm.ops.reference import filtered_probs


def _draw(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """probs (N, V) -> one draw per row (N,)."""
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class _Drafter:
    """One draft token per call: the draft's next-token logits (B, V) after feeding tokens (B,),
    through :class:`DecodeStep` (a plain Model whose cache holds the prompt) or the model's own
    forward (an empty cache: a one-token prompt; adapter wrappers)."""

    def __init__(self, draft, cache) -> None:
        self.draft, self.cache = draft, cache
        self.step = DecodeStep(draft, cache) if isinstance(draft, Model) else None

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.step is not None and self.cache.filled:
            return self.step(tokens)
        return self.draft(tokens[:, None], cache=self.cache, validate=False)[:, -1].float()


def _accept(target_logits, proposed, q, dist, greedy, generator):
    """Acceptance for every sequence at once, on the device. target_logits (B, γ + 1, V) (row i
    scores proposal i + 1, row γ the bonus), proposed (B, γ), q (B, γ, V) the draft's
    probabilities (sampling) -> (accepted (B,) int64 in [0, γ], next token (B,))."""
    b, gamma = proposed.shape
    if greedy:
        choice = target_logits.argmax(-1)  # (B, γ + 1)
        accepted = (choice[:, :gamma] == proposed).long().cumprod(1).sum(1)  # the accepted prefix
        return accepted, choice.gather(1, accepted[:, None]).squeeze(1)
    p = dist(target_logits.flatten(0, 1)).view(b, gamma + 1, -1)  # (B, γ + 1, V)
    if gamma == 0:
        return proposed.new_zeros(b), _draw(p[:, 0], generator)
    u = torch.rand(b, gamma, generator=generator, dtype=torch.float64, device=p.device)
    p_x = p[:, :gamma].gather(2, proposed[..., None]).squeeze(2)  # (B, γ): p_i(x_i)
    q_x = q.gather(2, proposed[..., None]).squeeze(2)
    accepted = (u * q_x < p_x).long().cumprod(1).sum(1)  # accept with probability min(1, p/q)
    # At the first rejection i: a draw from norm(max(0, p_i − q_i)); all accepted: from p_γ+1.
    first = accepted.clamp(max=gamma - 1)[:, None, None].expand(-1, 1, p.shape[-1])
    residual = (p[:, :gamma] - q).clamp(min=0).gather(1, first).squeeze(1)  # (B, V)
    residual = residual / residual.sum(-1, keepdim=True).clamp(min=torch.finfo(residual.dtype).tiny)
    row = torch.where((accepted < gamma)[:, None], residual, p[:, gamma])
    return accepted, _draw(row, generator)


@torch.no_grad()
def speculative_decode(target, draft, ids, *, max_new_tokens, temperature, top_k, top_p, num_draft_tokens,
                       eos_ids, pad_id, generator) -> torch.Tensor:
    """ids (B, T) equal-length prompts -> (B, T + n): each row as decoded alone, padded with
    pad_id after its eos (n: the longest row)."""
    if draft is target:
        raise ValueError("generate: draft_model must be a different (smaller) model than the target")
    if draft.config.vocab_size != target.config.vocab_size:
        raise ValueError(
            f"generate: the draft model's vocabulary ({draft.config.vocab_size}) differs from the target's "
            f"({target.config.vocab_size}); they must share the tokenizer"
        )
    if ids.shape[1] + max_new_tokens > draft.config.context_length:
        raise ValueError("generate: prompt + max_new_tokens exceeds the draft model's context")
    greedy = temperature == 0.0
    b, t = ids.shape
    device = ids.device
    # A round writes γ + 1 positions from each sequence's length; the slack lets γ stay whole.
    capacity = min(t + max_new_tokens + num_draft_tokens,
                   target.config.context_length, draft.config.context_length)
    t_cache, d_cache = target.new_cache(b, capacity), draft.new_cache(b, capacity)
    if t > 1:  # the prompt but its last token, which each round feeds first (lens = T - 1 + emitted)
        target(ids[:, :-1], cache=t_cache)
        draft(ids[:, :-1].to(draft.device), cache=d_cache)
    drafter = _Drafter(draft, d_cache)
    eos = eos_tensor(eos_ids, device)

    def dist(logits):  # (N, V) -> filtered probabilities (float64 for exact ratios)
        return filtered_probs(logits.float(), temperature, top_k, top_p).double()

    width = max_new_tokens + num_draft_tokens + 2  # the last column takes the writes of finished rows
    out = torch.full((b, width), pad_id, dtype=torch.int64, device=device)
    produced = torch.zeros(b, dtype=torch.int64, device=device)  # tokens emitted per sequence
    finished = torch.zeros(b, dtype=torch.bool, device=device)  # eos emitted, or max_new_tokens reached
    last = ids[:, -1]  # (B,): the newest token, not yet in either cache
    gamma = min(num_draft_tokens, max_new_tokens)
    while True:
        base = t_cache.lens.clone()  # (B,)
        proposals, q = [last], []
        for i in range(gamma + 1):  # the draft also takes x_γ, so both caches hold the same tokens
            d_logits = drafter(proposals[-1].to(draft.device)).to(device)
            if i == gamma:
                break
            if greedy:
                proposals.append(d_logits.argmax(-1))
            else:
                q.append(dist(d_logits))
                proposals.append(_draw(q[-1], generator))
        chunk = torch.stack(proposals, dim=1)  # (B, γ + 1): last, x_1..x_γ
        target_logits = target(chunk, cache=t_cache, validate=False).float()  # (B, γ + 1, V)
        q_all = torch.stack(q, dim=1) if q else None  # (B, γ, V)
        accepted, next_token = _accept(target_logits, chunk[:, 1:], q_all, dist, greedy, generator)
        # Emitted: x_1..x_accepted then next_token; cut after an eos and at max_new_tokens.
        emitted = torch.cat((chunk[:, 1:], next_token[:, None]), dim=1)  # (B, γ + 1)
        emitted.scatter_(1, accepted[:, None], next_token[:, None])
        j = torch.arange(gamma + 1, device=device)
        valid = j[None] <= accepted[:, None]
        is_eos = hits_eos(emitted, eos) & valid
        first_eos = torch.where(is_eos.any(1), is_eos.int().argmax(1), gamma + 1)
        count = torch.minimum(torch.minimum(accepted + 1, first_eos + 1), max_new_tokens - produced)
        count = torch.where(finished, 0, count)  # (B,) tokens this round adds to each sequence
        column = torch.where(j[None] < count[:, None], produced[:, None] + j[None], width - 1)
        out.scatter_(1, column, emitted)
        produced = produced + count
        finished = finished | (is_eos & (j[None] < count[:, None])).any(1) | (produced >= max_new_tokens)
        # Keep the fed token and the accepted proposals in both caches (finished rows: nothing).
        lens = base + count
        last = torch.where(finished, last, emitted.gather(1, (count - 1).clamp(min=0)[:, None]).squeeze(1))
        # The round's one device→host read.
        left = torch.where(finished, 0, max_new_tokens - produced)
        done, longest, most_left, n = torch.stack((finished.all().long(), lens.max(), left.max(),
                                                   produced.max())).tolist()
        for cache in (t_cache, d_cache):
            cache.truncate(lens.to(cache.lens.device), longest)
        if done:
            break
        gamma = min(num_draft_tokens, most_left - 1, capacity - longest - 1)
    return torch.cat((ids, out[:, :n]), dim=1)
