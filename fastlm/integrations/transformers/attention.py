"""The ``"fastlm"`` attention implementation of Hugging Face transformers.

:func:`register` adds two entries under the name ``"fastlm"``:

- ``transformers.AttentionInterface``: :func:`fastlm_attention_forward`, which runs every
  attention call of the model through ``fastlm.ops.attention`` (no padding) or
  ``fastlm.ops.attention_varlen`` (padded batches);
- ``transformers.masking_utils.AttentionMaskInterface``: :func:`fastlm_mask`. Without a mask
  function registered under the same name, transformers skips mask creation for a custom
  attention name and padded batches go silently wrong; this one never builds a (Tq, Tk) mask,
  it returns transformers' 2D padding mask (B, M) of kept keys (or ``None``), as the
  FlashAttention-2 path does.

The geometry read from the 2D mask ``keep`` (B, M), M <= Tk: key j of row b is real iff
``keep[b, j]`` (keys at j >= M are hidden: the unfilled tail of a static cache), and query i is
the token at key index ``M - Tq + i`` (the queries are the newest tokens; with Tq = M, as in a
training batch or a first prefill, query i is token i). Each row's real keys must form one
contiguous span [s_b, e_b) — left padding, right padding or both, as tokenizers and
``generate`` produce; a mask with holes is refused on the device (``torch._assert_async``, no
host sync). The padded batch then becomes 3·B packed sequences for ``attention_varlen`` without
any host sync: per row (real queries, real keys), (padded queries, no keys) -> zeros, and (no
queries, padded keys). Rows are rotated (a gather) so each row's real tokens come first:

    s_b  = first kept key, n_b = e_b - s_b kept keys
    qs_b = clamp(s_b - (M - Tq), 0, Tq), nq_b = clamp(e_b - (M - Tq), 0, Tq) - qs_b real queries

and per-sequence bottom-right causal alignment in ``attention_varlen`` (query i' sees keys
j' <= i' + n_b - nq_b) is then exactly transformers' causal mask (n_b - nq_b = M - Tq + qs_b - s_b).
Sliding windows (transformers' ``sliding_window``: query i sees keys with i - j < window) and
Gemma-2 soft-capping (``softcap``: scores s -> softcap·tanh(s / softcap)) go to the fastlm ops'
``window=`` / ``softcap=``; a window at least as long as the keys is a no-op and is dropped. Padded query rows come back as zeros.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

import fastlm.ops as ops
from fastlm.ops.checks import check_window_softcap
from fastlm.ops.registry import run

logger = logging.getLogger(__name__)

NAME = "fastlm"

__all__ = ["NAME", "fastlm_attention_forward", "fastlm_mask", "register", "is_registered"]


# --------------------------------------------------------------------------------------------
# Mask function
# --------------------------------------------------------------------------------------------

# transformers' mask-function building blocks whose meaning this backend implements: causal or
# bidirectional attention, the sliding window (applied from the ``sliding_window`` argument of
# the attention call), the offsets and their and-combination. Anything else (packed sequences
# found from position_ids, or_mask/and_mask overlays, chunked or block attention) is refused.
_UNDERSTOOD_MASKS = frozenset({
    "causal_mask_function",
    "bidirectional_mask_function",
    "sliding_window_overlay.<locals>.inner_mask",
    "sliding_window_causal_mask_function",
    "sliding_window_bidirectional_overlay.<locals>.inner_mask",
    "and_masks.<locals>.and_mask",
    "add_offsets_to_mask_function.<locals>.inner_mask",
})


def _mask_parts(fn: Callable, seen: set[int] | None = None) -> set[str]:
    """Qualified names of ``fn`` and of every function captured in its closures."""
    seen = set() if seen is None else seen
    if id(fn) in seen:
        return set()
    seen.add(id(fn))
    names = {getattr(fn, "__qualname__", type(fn).__name__)}
    for cell in getattr(fn, "__closure__", None) or ():
        try:
            content = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        if callable(content) and not isinstance(content, torch.Tensor):
            names |= _mask_parts(content, seen)
        elif isinstance(content, (list, tuple)):
            for item in content:
                if callable(item) and not isinstance(item, torch.Tensor):
                    names |= _mask_parts(item, seen)
    return names


def fastlm_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int | torch.Tensor = 0,
    kv_offset: int = 0,
    mask_function: Callable | None = None,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor | None:
    """transformers' mask function for ``"fastlm"``: the 2D padding mask (B, M) bool, or None.

    Called by ``create_causal_mask`` / ``create_sliding_window_causal_mask`` once per forward.
    ``attention_mask`` (B, past + Tq) bool from the caller is sliced to its last ``kv_length``
    columns (a sliding-window cache keeps only those keys). Returns None when there is no
    padding mask, or (prefill / training, eager) when it keeps every key: attention is then
    plain causal over all keys (bottom-right aligned) through ``fastlm.ops.attention``.
    """
    if mask_function is not None:
        unknown = _mask_parts(mask_function) - _UNDERSTOOD_MASKS
        if unknown:
            raise NotImplementedError(
                f"attn_implementation='fastlm' supports causal, bidirectional and sliding-window masks over "
                f"a 2D padding mask; this model built a mask from {sorted(unknown)} (packed sequences from "
                f"position_ids, or a custom mask overlay). Use attn_implementation='sdpa' for it, or pad the "
                f"batch and pass attention_mask")
    if attention_mask is None:
        static_tail = isinstance(q_offset, torch.Tensor) or kv_offset + kv_length != q_offset + q_length
        if static_tail:
            raise NotImplementedError(
                "attn_implementation='fastlm': a cache with preallocated slots (StaticCache) needs the 2D "
                "attention_mask (B, tokens so far) to know which slots are filled; pass attention_mask "
                "(generate() does)")
        return None
    if attention_mask.dim() != 2:
        raise ValueError(
            f"attn_implementation='fastlm' expects a 2D attention_mask (batch, keys), got shape "
            f"{tuple(attention_mask.shape)}")
    keep = attention_mask[:, -kv_length:].to(torch.bool)
    # A batch without padding takes the dense path. Checking needs the mask's values (a host
    # sync), so only for prefill and training (several queries), never per decoded token.
    if q_length > 1 and keep.shape[1] == kv_length and not torch.compiler.is_compiling() and bool(keep.all()):
        return None
    return keep


# --------------------------------------------------------------------------------------------
# Attention function
# --------------------------------------------------------------------------------------------


def _rotate(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rows rotated left by shift: out[b, t] = x[b, (t + shift[b]) mod T].  x (B, T, ...)."""
    t = x.shape[1]
    idx = (torch.arange(t, device=x.device)[None, :] + shift[:, None]) % t  # (B, T)
    idx = idx.view(*idx.shape, *([1] * (x.dim() - 2))).expand_as(x)
    return x.gather(1, idx)


def _cu(starts: torch.Tensor, counts: torch.Tensor, length: int, second: str) -> torch.Tensor:
    """Cumulative offsets of the three sequences per row, (3B + 1,) int32: rows laid out one after
    the other, each of ``length`` slots whose first ``counts[b]`` are real. ``second``: whether the
    padded slots form the 2nd sequence ("pad") or the 3rd ("last") of their row."""
    real_end = starts + counts
    row_end = starts + length
    if second == "pad":  # (real), (pad), ()
        bounds = torch.stack((real_end, row_end, row_end), dim=1)
    else:  # (real), (), (pad)
        bounds = torch.stack((real_end, real_end, row_end), dim=1)
    zero = bounds.new_zeros(1)
    return torch.cat((zero, bounds.reshape(-1))).to(torch.int32)


def _padded_attention(query, key, value, keep, causal, scaling, window, softcap):
    """query (B, H, Tq, D), key/value (B, Hkv, Tk, D), keep (B, M) bool -> (B, Tq, H, D)."""
    b, _, tq, _ = query.shape
    tk = key.shape[2]
    m = keep.shape[1]
    if m > tk:
        raise ValueError(f"attn_implementation='fastlm': the attention mask covers {m} keys but there are {tk}")
    idx = torch.arange(m, device=keep.device)
    count = keep.sum(dim=1)
    first = torch.where(keep, idx, m).amin(dim=1)
    end = torch.where(keep, idx + 1, 0).amax(dim=1)
    torch._assert_async(
        ((end - first == count) | (count == 0)).all(),
        "attn_implementation='fastlm': each row of attention_mask must keep one contiguous span of tokens "
        "(left and/or right padding)")
    first = torch.where(count > 0, first, torch.zeros_like(first))
    n_keys = count
    lead = m - tq  # key index of query 0
    q_first = (first - lead).clamp(0, tq)
    n_queries = ((first + n_keys - lead).clamp(0, tq) - q_first).clamp(min=0)

    h, hkv, d = query.shape[1], key.shape[1], query.shape[3]
    q = _rotate(query.transpose(1, 2), q_first).reshape(b * tq, h, d)
    k = _rotate(key.transpose(1, 2), first).reshape(b * tk, hkv, d)
    v = _rotate(value.transpose(1, 2), first).reshape(b * tk, hkv, d)
    rows = torch.arange(b, device=keep.device)
    cu_q = _cu(rows * tq, n_queries, tq, "pad")
    cu_k = _cu(rows * tk, n_keys, tk, "last")
    # The offsets are valid by construction: call the registered op directly, skipping the public
    # function's value checks of them (each a host sync).
    window, softcap = check_window_softcap("attention_varlen", window, softcap, bool(causal))
    out = run("attention_varlen", q.device, q, k, v, cu_q, cu_k, tq, tk, bool(causal), scaling, window, softcap)
    return _rotate(out.view(b, tq, h, d), (tq - q_first) % tq)


def fastlm_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention function for ``"fastlm"``.

    query (B, H, Tq, D), key/value (B, Hkv, Tk, D) (GQA: H a multiple of Hkv, never repeated),
    attention_mask: None or :func:`fastlm_mask`'s (B, M) bool -> ((B, Tq, H, D), None), as
    transformers' own attention functions. Dropout is refused: fastlm's attention kernels have no
    dropout (set ``attention_dropout=0`` or use 'sdpa'). No attention weights are returned.
    """
    if dropout:
        raise NotImplementedError(
            f"attn_implementation='fastlm' has no attention dropout, got dropout={dropout} (the model is in "
            f"training mode with config.attention_dropout > 0); set attention_dropout=0.0 or use 'sdpa'")
    if kwargs.get("output_attentions"):
        raise NotImplementedError("attn_implementation='fastlm' does not return attention weights; use 'eager'")
    if kwargs.get("position_bias") is not None or kwargs.get("s_aux") is not None:
        raise NotImplementedError("attn_implementation='fastlm' has no position bias or attention sinks; use 'eager'")
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    tk = key.shape[2]
    if sliding_window is not None and sliding_window >= tk:
        sliding_window = None  # every key is inside the window
    if attention_mask is None:
        out = ops.attention(query, key, value, causal=bool(causal), scale=scaling, window=sliding_window, softcap=softcap)
        return out.transpose(1, 2).contiguous(), None
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2 or attention_mask.dtype != torch.bool:
        raise TypeError(
            "attn_implementation='fastlm' expects the (batch, keys) bool mask built by its own mask function; got "
            f"{type(attention_mask).__name__} {tuple(getattr(attention_mask, 'shape', ()))} — was the model's "
            "mask built for another attention implementation?")
    out = _padded_attention(query, key, value, attention_mask, causal, scaling, sliding_window, softcap)
    return out, None


def register() -> None:
    """Register ``"fastlm"`` with transformers' AttentionInterface and AttentionMaskInterface
    (idempotent). Nothing else of transformers is changed."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, fastlm_attention_forward)
    AttentionMaskInterface.register(NAME, fastlm_mask)


def is_registered() -> bool:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    return NAME in AttentionInterface._global_mapping and NAME in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping
