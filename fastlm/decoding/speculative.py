"""Speculative decoding (Leviathan et al., 2023; Chen et al., 2023) with a small draft model.

Each round the draft proposes γ tokens x_1..x_γ (drawn from its filtered distribution q, or
greedily); the target scores them in one forward pass, giving its filtered distributions
p_1..p_γ+1. Greedy: accept while x_i = argmax p_i, then emit argmax p at the first mismatch
(or the bonus p_γ+1): the output equals the target's own greedy decoding. Sampling: accept x_i
with probability min(1, p_i(x_i) / q_i(x_i)); at the first rejection emit a draw from
norm(max(0, p_i − q_i)); if all are accepted, a draw from p_γ+1. The emitted tokens are then
distributed exactly as the target's own samples. Rejected tokens are rolled back in both caches.
Acceptance and the emitted token are computed on the device: one host read per round.
"""

from __future__ import annotations

import torch

from fastlm.ops.reference import filtered_probs


def _draw(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def _one(target, draft, ids, *, max_new_tokens, temperature, top_k, top_p, num_draft_tokens, eos_ids, generator):
    """ids (1, T) -> the generated tokens (n,), stopping after an eos."""
    greedy = temperature == 0.0
    capacity = ids.shape[1] + max_new_tokens  # a round never writes past the last new token

    def dist(logits):  # (N, V) -> filtered probabilities (float64 for exact ratios)
        return filtered_probs(logits.float(), temperature, top_k, top_p).double()

    t_cache, d_cache = target.new_cache(1, capacity), draft.new_cache(1, capacity)
    t_logits = target(ids, cache=t_cache)[:, -1]
    d_logits = draft(ids, cache=d_cache)[:, -1]
    out: list[int] = []
    while len(out) < max_new_tokens:
        gamma = min(num_draft_tokens, max_new_tokens - len(out))
        base = t_cache.filled
        proposals, q = [], []
        for _ in range(gamma):
            if greedy:
                token = d_logits.argmax(-1)
            else:
                q.append(dist(d_logits)[0])
                token = _draw(q[-1][None], generator)
            proposals.append(token)
            d_logits = draft(token[:, None], cache=d_cache, validate=False)[:, -1]
        proposed = torch.cat(proposals)  # (γ,)
        verify = target(proposed[None], cache=t_cache, validate=False)[0]  # (γ, V)
        target_logits = torch.cat((t_logits, verify))  # (γ + 1, V): row i scores proposal i
        # All on the device: accepted = length of the accepted prefix, then the emitted token.
        if greedy:
            choice = target_logits.argmax(-1)  # (γ + 1,)
            accept = choice[:gamma] == proposed
        else:
            p = dist(target_logits)  # (γ + 1, V)
            qs = torch.stack(q)  # (γ, V)
            u = torch.rand(gamma, generator=generator, dtype=torch.float64, device=p.device)
            rows = torch.arange(gamma, device=p.device)
            accept = u * qs[rows, proposed] < p[rows, proposed]  # accept with probability min(1, p/q)
        accepted_t = accept.long().cumprod(0).sum()  # 0-d
        if greedy:
            next_token = choice.index_select(0, accepted_t[None])[0]  # (a 0-d index would be read back)
        else:
            # At the first rejection i: a draw from norm(max(0, p_i − q_i)); all accepted: from p_γ.
            residual = (p[:gamma] - qs).clamp(min=0).index_select(0, accepted_t.clamp(max=gamma - 1)[None])[0]
            row = torch.where(accepted_t < gamma, residual / residual.sum(), p[gamma])
            next_token = _draw(row[None], generator)[0]
        # The round's one device→host read: the proposals, how many were accepted, the new token.
        *proposed_host, accepted, next_host = torch.cat((proposed, accepted_t[None], next_token[None])).tolist()
        new = proposed_host[:accepted] + [next_host]
        stop = next((i for i, token in enumerate(new) if token in eos_ids), None)
        if stop is not None:
            out += new[: stop + 1]
            break
        out += new
        if len(out) >= max_new_tokens:
            break
        # Keep the accepted proposals in both caches, then feed the emitted token.
        for cache in (t_cache, d_cache):
            cache.truncate(torch.full_like(cache.lens, base + accepted), base + accepted)
        token = torch.tensor([[new[-1]]], device=ids.device)
        t_logits = target(token, cache=t_cache, validate=False)[:, -1]
        d_logits = draft(token, cache=d_cache, validate=False)[:, -1]
    return torch.tensor(out[:max_new_tokens], dtype=torch.int64, device=ids.device)


def speculative_decode(target, draft, ids, *, max_new_tokens, temperature, top_k, top_p, num_draft_tokens,
                       eos_ids, pad_id, generator) -> torch.Tensor:
    """ids (B, T) -> (B, T + n): each row decoded on its own, shorter rows padded with pad_id."""
    if draft is target:
        raise ValueError("generate: draft_model must be a different (smaller) model than the target")
    if draft.config.vocab_size != target.config.vocab_size:
        raise ValueError(
            f"generate: the draft model's vocabulary ({draft.config.vocab_size}) differs from the target's "
            f"({target.config.vocab_size}); they must share the tokenizer"
        )
    if ids.shape[1] + max_new_tokens > draft.config.context_length:
        raise ValueError("generate: prompt + max_new_tokens exceeds the draft model's context")
    rows = [_one(target, draft, row[None].to(draft.device), max_new_tokens=max_new_tokens, temperature=temperature,
                 top_k=top_k, top_p=top_p, num_draft_tokens=num_draft_tokens, eos_ids=eos_ids, generator=generator)
            for row in ids]
    width = max(len(r) for r in rows)
    out = torch.full((ids.shape[0], width), pad_id, dtype=torch.int64, device=ids.device)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return torch.cat((ids, out), dim=1)
