"""Contrastive search (Su et al., 2022): penalty_alpha with top_k.

Among the top_k most likely next tokens v, pick
    argmax_v (1 - α)·p(v | x) - α·max_j cos(h_v, h_j)
where h_v is the model's last hidden state after appending v and h_j those of the context.
Each sequence keeps top_k identical rows in the KV cache; a step feeds a different candidate to
each row, then every row of the group continues from the chosen one (cache reorder).
With eos ids, "all finished" is read every ``CHECK_EVERY`` steps, and the extra steps trimmed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastlm.decoding.common import eos_tensor, hits_eos

CHECK_EVERY = 8  # steps between host reads of "every sequence finished" (one read each)


@torch.no_grad()
def contrastive_search(
    model,
    ids: torch.Tensor,
    *,
    max_new_tokens: int,
    penalty_alpha: float,
    top_k: int,
    eos_ids: list[int],
    pad_id: int,
) -> torch.Tensor:
    """ids (B, T) equal-length prompts -> (B, T + n)."""
    b, t = ids.shape
    k = top_k
    device = ids.device
    cache = model.new_cache(b * k, t + max_new_tokens)
    hidden = model(ids.repeat_interleave(k, dim=0), cache=cache, return_hidden=True)  # (B·k, T, H)
    context = hidden[::k]  # (B, T, H): one copy per sequence
    logits = model.head(hidden[::k, -1]).float()  # (B, V)
    group = torch.arange(b, device=device)[:, None] * k
    finished = torch.zeros(b, dtype=torch.bool, device=device)
    out = []
    eos = eos_tensor(eos_ids, logits.device)
    flags = []  # per step: had every sequence finished (0-d bool, on the device)
    for _ in range(max_new_tokens):
        probs = torch.softmax(logits, dim=-1)
        top_probs, candidates = probs.topk(k, dim=-1)  # (B, k)
        cand_hidden = model(candidates.reshape(-1, 1), cache=cache, return_hidden=True, validate=False)  # (B·k, 1, H)
        cand_hidden = cand_hidden[:, 0].view(b, k, -1)
        similarity = F.cosine_similarity(cand_hidden[:, :, None], context[:, None], dim=-1).amax(dim=-1)  # (B, k)
        score = (1 - penalty_alpha) * top_probs - penalty_alpha * similarity
        choice = score.argmax(dim=-1)  # (B,)
        token = candidates.gather(1, choice[:, None]).squeeze(1)
        token = torch.where(finished, torch.full_like(token, pad_id), token)
        out.append(token)
        finished = finished | hits_eos(token, eos)
        flags.append(finished.all())
        if eos is not None and len(out) % CHECK_EVERY == 0 and bool(flags[-1]):
            break
        chosen_rows = (group + choice[:, None]).squeeze(1)  # (B,)
        cache.reorder(chosen_rows.repeat_interleave(k))
        chosen_hidden = cand_hidden[torch.arange(b, device=device), choice]  # (B, H)
        context = torch.cat((context, chosen_hidden[:, None]), dim=1)
        logits = model.head(chosen_hidden).float()
    tokens = torch.stack(out, dim=1)  # (B, n)
    if eos is not None:  # drop the steps after the one where every sequence had finished
        all_done = torch.stack(flags)
        tokens = tokens[:, : int(torch.where(all_done.any(), all_done.int().argmax(), len(out) - 1)) + 1]
    return torch.cat((ids, tokens), dim=1)
