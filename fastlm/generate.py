"""Autoregressive generation through the KV cache and ops.sample.

This is the minimal loop (greedy and sampling); the decoding issue adds the fast engine and
the other strategies with transformers' argument names.
"""

from __future__ import annotations

import torch

from fastlm import ops
from fastlm.model import Model


@torch.no_grad()
def generate(
    model: Model,
    input_ids: torch.Tensor,
    *,
    max_new_tokens: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    eos_token_id: int | None = None,
) -> torch.Tensor:
    """Continue each row of ``input_ids`` (B, T); returns (B, T + n) with the prompt included.

    Greedy unless ``do_sample``; sampling applies temperature, top_k and top_p in
    transformers' order. With ``eos_token_id``, a sequence that produced it is padded with it
    and generation stops early once every sequence has, so n <= max_new_tokens.
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError("generate: expected input_ids of shape (B, T)")
    if input_ids.shape[1] == 0:
        raise ValueError("generate: the prompt is empty; give at least one token per row")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"generate: max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    total = input_ids.shape[1] + max_new_tokens
    context = model.config.max_position_embeddings
    if total > context:
        raise ValueError(
            f"generate: prompt ({input_ids.shape[1]}) + max_new_tokens ({max_new_tokens}) = {total} tokens "
            f"exceeds the model's context of {context}"
        )
    if not do_sample:
        temperature, top_k, top_p = 0.0, None, None
    elif temperature == 0:
        raise ValueError("generate: do_sample=True needs temperature > 0 (use do_sample=False for greedy)")
    if max_new_tokens == 0:
        return input_ids

    input_ids = input_ids.to(model.device)
    cache = model.new_cache(input_ids.shape[0], total)
    logits = model(input_ids, cache=cache)[:, -1]
    tokens = [input_ids]
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    for step in range(max_new_tokens):
        next_token = ops.sample(logits.float(), temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        if eos_token_id is not None:
            next_token = torch.where(finished, torch.full_like(next_token, eos_token_id), next_token)
            finished |= next_token == eos_token_id
        tokens.append(next_token[:, None])
        if step + 1 == max_new_tokens or (eos_token_id is not None and bool(finished.all())):
            break
        logits = model(next_token[:, None], cache=cache)[:, -1]
    return torch.cat(tokens, dim=1)
