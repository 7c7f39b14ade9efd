"""Per-token and per-sequence log-probabilities of a fastlm model, through the fused chunked head.

``token_logprobs(model, input_ids)`` runs ``model(input_ids, return_hidden=True)`` (the final
normed hidden states, (B, T, H)) and scores the next tokens with
:func:`fastlm.ops.linear_logprobs` against the LM head's weight, so the (B·T, V) logits are
never built whole (forward or backward). Works on a fastlm ``Model``, a PEFT wrapper of one
(``fastlm.peft``: the wrapper's forward runs, so active adapters count) and a DDP wrapper.

Padding: ``attention_mask`` (B, T) of 1 (token) / 0 (padding) where each row's tokens are one
contiguous run — right padding, left padding (prompts padded on the left for generation) or
both. fastlm's Model takes right padding as ``key_lens``; a row padded on the left is rotated
so that its tokens start at position 0 (the positions a model sees for the unpadded sequence,
as transformers' position_ids from the mask give), scored, and the results rotated back.

Tied embeddings need nothing special (the head weight *is* the embedding; autograd adds both
uses). A final logit soft-cap (Gemma 2: logits ← c·tanh(logits/c)) is applied by the fused op.
A head that is not a bias-free ``nn.Linear`` (e.g. LoRA on lm_head) cannot use the fused linear
op: it is scored through ``model.head`` on the whole (B, T−1, V) logits (exact, not lean), and a
debug log line says so.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from fastlm import ops

logger = logging.getLogger(__name__)

IGNORE = -100


def _base(model: nn.Module) -> nn.Module:
    """The module that has ``head`` and ``config`` (under DDP and PEFT wrappers)."""
    seen = model
    for _ in range(4):
        if hasattr(seen, "head") and hasattr(seen, "config"):
            return seen
        inner = getattr(seen, "module", None) or getattr(seen, "model", None)
        if inner is None:
            break
        seen = inner
    raise TypeError(f"token_logprobs: expected a fastlm Model (or a PEFT/DDP wrapper of one), got {type(model).__name__}")


def _fusable(base: nn.Module) -> bool:
    head = getattr(base, "lm_head", None)
    return type(head) is nn.Linear and head.bias is None


def _check(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, temperature: float) -> None:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"token_logprobs: expected input_ids of shape (B, T), got {shape}")
    if input_ids.dtype != torch.int64:
        raise TypeError(f"token_logprobs: expected int64 input_ids, got {input_ids.dtype}")
    if input_ids.shape[1] < 2:
        raise ValueError(f"token_logprobs: input_ids needs T >= 2 tokens (the first is only context), "
                         f"got T={input_ids.shape[1]}")
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
            shape = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask)
            raise ValueError(f"token_logprobs: attention_mask must have input_ids' shape {tuple(input_ids.shape)}, "
                             f"got {shape}")
        if attention_mask.device != input_ids.device:
            raise ValueError(f"token_logprobs: attention_mask on {attention_mask.device}, input_ids on "
                             f"{input_ids.device}")
        if attention_mask.dtype.is_floating_point or attention_mask.dtype.is_complex:
            raise TypeError(f"token_logprobs: attention_mask must be bool or integer 0/1, got {attention_mask.dtype}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"token_logprobs: temperature must be a number > 0, got {temperature!r}")


def _layout(attention_mask: torch.Tensor, validate: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(start (B,), length (B,)) of each row's run of tokens; checks the run is contiguous."""
    mask = attention_mask.to(torch.int64)
    t = mask.shape[1]
    length = mask.sum(1)
    cols = torch.arange(t, device=mask.device)
    start = torch.where(mask.bool(), cols, t).amin(1).clamp(max=t - 1)  # first token (0 for an empty row)
    if validate:  # one host read per call
        inside = (cols >= start[:, None]) & (cols < (start + length)[:, None])
        if ((mask != 0) & (mask != 1)).any() or not torch.equal(inside, mask.bool()):
            raise ValueError("token_logprobs: attention_mask must be 0/1 with each row's 1s contiguous "
                             "(left and/or right padding); got a row with a gap or other values")
    return start, length


def _hidden_rows(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, validate: bool
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The model's final hidden states that predict each next token: (h (B·(T−1), H), targets
    (B, T−1) with IGNORE where the target is padding, start (B,) or None). With an attention mask
    each row is rotated to start at column 0 (module docstring); ``start`` says by how much."""
    b, t = input_ids.shape
    ids, key_lens, start = input_ids, None, None
    if attention_mask is not None:
        start, key_lens = _layout(attention_mask, validate)
        rolled = (torch.arange(t, device=ids.device)[None, :] + start[:, None]) % t  # (B, T): new col -> old col
        ids = input_ids.gather(1, rolled)
        ids = torch.where(torch.arange(t, device=ids.device)[None, :] < key_lens[:, None], ids, 0)
    hidden = model(ids, key_lens=key_lens, return_hidden=True, validate=validate)  # (B, T, H)
    targets = ids[:, 1:]
    if key_lens is not None:  # target j+1 must be a token (then its context is too)
        targets = torch.where(torch.arange(1, t, device=ids.device)[None, :] < key_lens[:, None], targets, IGNORE)
    return hidden[:, :-1].reshape(-1, hidden.shape[-1]), targets, start


def _head_weight(base: nn.Module, h: torch.Tensor) -> torch.Tensor:
    weight = base.lm_head.weight
    if weight.dtype != h.dtype and not torch.is_autocast_enabled(h.device.type):
        weight = weight.to(h.dtype)
    return weight


def token_logprobs(
    model: nn.Module,
    input_ids: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    validate: bool = True,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each next token: out[b, j] = log p(input_ids[b, j+1] | input_ids[b, :j+1]).

    input_ids (B, T) int64 (T >= 2), attention_mask (B, T) 0/1 or None -> (B, T−1) float32,
    with p = softmax(logits / temperature); 0 where the predicted token or its context start is
    padding. ``return_entropy``: also the (B, T−1) entropy of each next-token distribution (0
    at padding). Differentiable w.r.t. the model's parameters. ``validate=False`` skips the
    host-reading checks (token range, mask contiguity) for data checked already.
    """
    _check(input_ids, attention_mask, temperature)
    base = _base(model)
    b, t = input_ids.shape
    h, targets, start = _hidden_rows(model, input_ids, attention_mask, validate)
    targets = targets.reshape(-1)
    if _fusable(base):
        weight = _head_weight(base, h)
        out = ops.linear_logprobs(h, weight, targets, temperature=float(temperature), ignore_index=IGNORE,
                                  return_entropy=return_entropy, softcap=getattr(base.config, "final_softcap", None),
                                  validate=validate)
    else:
        logger.debug("token_logprobs: %s head (not a bias-free linear): scoring the full logits",
                     type(base.lm_head).__name__)
        out = _unfused(base.head(h), targets, float(temperature), return_entropy)
    outs = out if return_entropy else (out,)
    outs = tuple(o.reshape(b, t - 1) for o in outs)
    if start is not None:  # rotate back: old col c <- new col (c − start) mod T
        back = (torch.arange(t - 1, device=input_ids.device)[None, :] - start[:, None]) % t  # (B, T−1)
        outs = tuple(torch.nn.functional.pad(o, (0, 1)).gather(1, back) for o in outs)
    return outs if return_entropy else outs[0]


def _unfused(logits: torch.Tensor, targets: torch.Tensor, temperature: float, return_entropy: bool):
    """Log-probs (and entropy) from full logits (N, V): the path for heads the fused op cannot apply."""
    logits = logits if logits.dtype == torch.float64 else logits.float()
    logp = torch.log_softmax(logits / temperature, dim=-1)
    valid = targets != IGNORE
    out = logp.gather(-1, torch.where(valid, targets, 0)[:, None]).squeeze(-1) * valid
    if not return_entropy:
        return out
    entropy = -(logp.exp() * logp).sum(-1) * valid
    return out, entropy


def sequence_logprobs(
    model: nn.Module,
    input_ids: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    average: bool = False,
    temperature: float = 1.0,
    validate: bool = True,
) -> torch.Tensor:
    """Σ (or, with ``average``, the mean) of the token log-probs over completion tokens -> (B,).

    input_ids (B, T), loss_mask (B, T) 0/1 marking the tokens scored (the completion: 1 from the
    first completion token on; loss_mask[:, 0] is ignored, the first token having no context),
    attention_mask as for :func:`token_logprobs`. out[b] = Σ_{j ≥ 1, loss_mask[b, j] = 1}
    log p(input_ids[b, j] | input_ids[b, :j]); the mean divides by that count (a row with no
    scored token gives 0). DPO's policy and reference log-probs (TRL's ``concatenated_forward``).
    """
    if not isinstance(loss_mask, torch.Tensor) or loss_mask.shape != getattr(input_ids, "shape", None):
        shape = tuple(loss_mask.shape) if isinstance(loss_mask, torch.Tensor) else type(loss_mask).__name__
        raise ValueError(f"sequence_logprobs: loss_mask must have input_ids' shape (B, T), got {shape}")
    if loss_mask.device != input_ids.device:
        raise ValueError(f"sequence_logprobs: loss_mask on {loss_mask.device}, input_ids on {input_ids.device}")
    lp = token_logprobs(model, input_ids, attention_mask=attention_mask, temperature=temperature, validate=validate)
    mask = loss_mask[:, 1:].to(lp.dtype)
    if attention_mask is not None:
        mask = mask * attention_mask[:, 1:].to(lp.dtype)
    total = (lp * mask).sum(1)
    return total / mask.sum(1).clamp(min=1) if average else total


def preference_rows(
    model: nn.Module,
    input_ids: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    validate: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float | None] | None:
    """The inputs of :func:`fastlm.ops.linear_preference_loss` for a batch of sequences (rows as
    :func:`sequence_logprobs` scores them): (hidden (B·(T−1), H), head weight (V, H), targets
    (B, T−1) with IGNORE at padding, mask (B, T−1), the final logit soft-cap or None), or None
    when the model's head is not fusable (then nothing is run; score with
    :func:`sequence_logprobs`). Left-padded rows are rotated as in :func:`token_logprobs`; their
    mask goes with them."""
    _check(input_ids, attention_mask, 1.0)
    if not isinstance(loss_mask, torch.Tensor) or loss_mask.shape != input_ids.shape:
        shape = tuple(loss_mask.shape) if isinstance(loss_mask, torch.Tensor) else type(loss_mask).__name__
        raise ValueError(f"preference_rows: loss_mask must have input_ids' shape (B, T), got {shape}")
    base = _base(model)
    if not _fusable(base):
        return None
    h, targets, start = _hidden_rows(model, input_ids, attention_mask, validate)
    mask = loss_mask
    if start is not None:
        t = input_ids.shape[1]
        mask = mask.gather(1, (torch.arange(t, device=mask.device)[None, :] + start[:, None]) % t)
    return h, _head_weight(base, h), targets, mask[:, 1:], getattr(base.config, "final_softcap", None)
