"""Attention over dense batches and packed variable-length sequences.

Ops: ``attention`` (``fastlm::attention``, returning (out, logsumexp) with the logsumexp kept
for backward) and ``attention_varlen`` (the same over packed sequences, flash-attn's varlen
API). This file holds their specs, references, backward formulas and public functions; the
kernels are kernels/attention.py and kernels/attention_bwd.py, adapted in
fastlm/ops/triton/attn.py.

Math (per batch row b and query head h, key/value head h // (H / Hkv)):

    s = scale·q·kᵀ   (softcap c: s ← c·tanh(s / c)),   s ← -inf where masked,
    lse = logsumexp(s, -1),   o = softmax(s)·v        (rows that see no key: o = 0, lse = -inf)

The mask (:func:`attention_mask`) is causal bottom-right (query i at position i + Tk - Tq),
with an optional sliding window and right padding (key_lens).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fastlm.ops.checks import (
    check_attention_inputs,
    check_floating,
    check_lengths,
    check_ndim,
    check_same_device,
    check_same_dtype,
    check_window_softcap,
)
from fastlm.ops.common import wide
from fastlm.ops.registry import OpSpec, define_op, run

__all__ = ["attention", "attention_varlen"]


# ---- reference --------------------------------------------------------------------------------


def softcap_scores(scores: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """Gemma-2 logit soft-capping: s ← softcap·tanh(s / softcap) (identity when softcap is None)."""
    return scores if softcap is None else softcap * torch.tanh(scores / softcap)


def _attention_core(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor, scale: float,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(s, masked by ``visible``)·v in float32, and the row logsumexp, where
    s = scale·q·kᵀ, soft-capped to softcap·tanh(s / softcap) when softcap is given.

    q (B, H, Tq, D), k/v (B, Hkv, Tk, D), visible broadcastable to (B, H, Tq, Tk) ->
    out (B, H, Tq, D) in q's dtype, lse (B, H, Tq) float32 = log Σ_visible exp(s).
    A row that sees no key gives out = 0 and lse = -inf.
    """
    group = q.shape[1] // k.shape[1]
    # GQA: query head h reads key/value head h // group (transformers' repeat_kv order).
    k = wide(k).repeat_interleave(group, dim=1)
    v = wide(v).repeat_interleave(group, dim=1)
    scores = softcap_scores(torch.matmul(wide(q), k.transpose(-1, -2)) * scale, softcap)  # (B, H, Tq, Tk)
    scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # -inf where no key is visible
    any_visible = visible.any(dim=-1, keepdim=True)
    # Rows with no visible key would be NaN (all -inf); give them zero weights instead.
    probs = torch.softmax(scores.masked_fill(~any_visible, 0.0), dim=-1)
    probs = probs.masked_fill(~visible, 0.0)
    return torch.matmul(probs, v).to(q.dtype), lse


def attention_mask(
    tq: int,
    tk: int,
    *,
    causal: bool,
    key_lens: torch.Tensor | None,
    device: torch.device,
    window: int | None = None,
) -> torch.Tensor:
    """Boolean visibility mask, True where query i may attend to key j.

    Queries sit at the last tq key positions (bottom-right): query i is at position
    p_i = i + (tk - tq). Causal: j <= p_i. Sliding window (transformers' ``sliding_window``,
    requires causal): also j > p_i - window, i.e. the last ``window`` keys, itself included.
    With ``key_lens`` (B,), keys j >= key_lens[b] are hidden. Shape (B or 1, 1, tq, tk).
    """
    i = torch.arange(tq, device=device)[:, None]
    j = torch.arange(tk, device=device)[None, :]
    visible = torch.ones(tq, tk, dtype=torch.bool, device=device)
    if causal:
        visible = j <= i + (tk - tq)
    if window is not None:
        visible = visible & (j > i + (tk - tq) - window)
    visible = visible[None, None]
    if key_lens is not None:
        visible = visible & (j[None, None] < key_lens.to(device).view(-1, 1, 1, 1))
    return visible


def attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    scale: float | None = None,
    key_lens: torch.Tensor | None = None,
    window: int | None = None,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(o, lse): o = softmax(s + mask)·v and lse = logsumexp(s + mask, -1), with
    s = scale·q·kᵀ soft-capped (softcap·tanh(s / softcap)) when softcap is given, and the mask
    of :func:`attention_mask` (causal, sliding window, key_lens).

    q (B, H, Tq, D), k/v (B, Hkv, Tk, D) -> o (B, H, Tq, D), lse (B, H, Tq) float32.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    visible = attention_mask(q.shape[2], k.shape[2], causal=causal, key_lens=key_lens, device=q.device,
                             window=window)
    return _attention_core(q, k, v, visible, scale, softcap)


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    scale: float | None = None,
    key_lens: torch.Tensor | None = None,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """o = softmax(s + mask)·v.  q (B, H, Tq, D), k/v (B, Hkv, Tk, D) -> (B, H, Tq, D)."""
    return attention_forward(q, k, v, causal, scale, key_lens, window, softcap)[0]


def attention_sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    scale: float | None = None,
    key_lens: torch.Tensor | None = None,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """What the reference backend runs: :func:`attention_reference`'s result through PyTorch's
    fused ``scaled_dot_product_attention`` (no materialized (Tq, Tk) scores or GQA copies on
    its fused CPU path), in the same accumulation dtype (float32; float64 for float64).

    Bottom-right causal alignment when Tq != Tk and key_lens padding go in as a boolean mask
    (SDPA's ``is_causal`` is top-left aligned; it is used only for Tq == Tk without padding);
    GQA through ``enable_gqa``. A query row that sees no key is given key 0 for SDPA (no NaN
    in forward or backward) and then set to 0, as the reference. A sliding window or a
    soft-cap goes to the explicit formula (SDPA has no soft-cap).
    """
    if window is not None or softcap is not None:
        return attention_forward(q, k, v, causal, scale, key_lens, window, softcap)[0]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    tq, tk = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    qw, kw, vw = wide(q), wide(k), wide(v)
    if key_lens is None and (not causal or tq == tk):
        out = F.scaled_dot_product_attention(qw, kw, vw, is_causal=causal, scale=scale, enable_gqa=gqa)
        return out.to(q.dtype)
    visible = attention_mask(tq, tk, causal=causal, key_lens=key_lens, device=q.device)  # (B or 1, 1, Tq, Tk)
    seen = visible.any(dim=-1, keepdim=True)  # (B or 1, 1, Tq, 1)
    first = torch.arange(tk, device=q.device) == 0
    out = F.scaled_dot_product_attention(qw, kw, vw, attn_mask=visible | (~seen & first), scale=scale,
                                         enable_gqa=gqa)
    return torch.where(seen, out, 0.0).to(q.dtype)


# ---- backward formula ---------------------------------------------------------------------------


def attention_backward(grad, q, k, v, causal, scale, key_lens, window, softcap, out, lse):
    """FlashAttention-2's backward from the saved output and logsumexp: with raw scores
    r = q·kᵀ·scale and s = r (or s = c·tanh(r / c) with softcap c),
    P = exp(s - lse) on visible keys (0 on rows with lse = -inf), dV = Pᵀ·dO,
    dS = P ∘ (dO·Vᵀ - rowsum(dO ∘ O)), dR = dS ∘ ds/dr with ds/dr = 1 - tanh²(r / c) = 1 - (s / c)²
    (1 without softcap), dQ = dR·K·scale, dK = dRᵀ·Q·scale; GQA gradients summed over the query
    heads of each group."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    b, h, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    group = h // hkv
    visible = attention_mask(tq, tk, causal=causal, key_lens=key_lens, device=q.device, window=window)
    qf, do, of = wide(q), wide(grad), wide(out)
    kf = wide(k).repeat_interleave(group, dim=1)
    vf = wide(v).repeat_interleave(group, dim=1)
    lse = wide(lse)[..., None]
    scores = softcap_scores(torch.matmul(qf, kf.transpose(-1, -2)) * scale, softcap)
    p = torch.exp(scores - torch.where(torch.isinf(lse), torch.zeros_like(lse), lse))
    p = p.masked_fill(~visible | torch.isinf(lse), 0.0)
    dv = torch.matmul(p.transpose(-1, -2), do)
    dp = torch.matmul(do, vf.transpose(-1, -2))
    ds = p * (dp - (do * of).sum(dim=-1, keepdim=True))
    if softcap is not None:
        ds = ds * (1.0 - (scores / softcap).square())
    dq = torch.matmul(ds, kf) * scale
    dk = torch.matmul(ds.transpose(-1, -2), qf) * scale

    def fold(g):  # (B, H, Tk, D) -> (B, Hkv, Tk, D)
        return g.view(b, hkv, group, tk, d).sum(dim=2)

    return dq.to(q.dtype), fold(dk).to(k.dtype), fold(dv).to(v.dtype)


# ---- specs --------------------------------------------------------------------------------------


def _attention_fake(q, k, v, causal, scale, key_lens, window, softcap):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.promote_types(q.dtype, torch.float32))


define_op(OpSpec(
    "attention",
    "Tensor q, Tensor k, Tensor v, bool causal, float? scale, Tensor? key_lens, int? window, float? softcap",
    "(Tensor, Tensor)",  # out (B, H, Tq, D), logsumexp (B, H, Tq) float32
    _attention_fake,
    differentiable=(0, 1, 2),
    outputs_to_backward="Tensor out, Tensor lse",
    auxiliary_outputs=True,
    reference_fn=attention_forward,
    reference_backward_fn=attention_backward,
    reference_eager=attention_sdpa,
))


def _spans(cu_seqlens: torch.Tensor) -> list[tuple[int, int]]:
    offsets = cu_seqlens.tolist()
    return list(zip(offsets[:-1], offsets[1:]))


def attention_varlen_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale,
                               window=None, softcap=None):
    """Plain PyTorch: ``attention_forward`` on each packed sequence.

    q (total_q, H, D), k/v (total_k, Hkv, D) -> (out (total_q, H, D), lse (H, total_q) float32;
    float64 for float64 inputs). Sequence b is rows cu_seqlens[b] .. cu_seqlens[b + 1] - 1.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    outs, lses = [], []
    for (qs, qe), (ks, ke) in zip(_spans(cu_seqlens_q), _spans(cu_seqlens_k)):
        qb, kb, vb = (t.transpose(0, 1)[None] for t in (q[qs:qe], k[ks:ke], v[ks:ke]))  # (1, heads, T, D)
        o, lse = attention_forward(qb, kb, vb, causal, scale, None, window, softcap)
        outs.append(o[0].transpose(0, 1))
        lses.append(lse[0])
    lse_dtype = wide(q).dtype
    if not outs:
        return torch.zeros_like(q), q.new_full((q.shape[1], q.shape[0]), float("-inf"), dtype=lse_dtype)
    return torch.cat(outs, dim=0), torch.cat(lses, dim=1).to(lse_dtype)


def attention_varlen_reference_backward(
    grad, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, window, softcap, out, lse
):
    """(dq, dk, dv): ``attention_backward`` on each packed sequence."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    dqs, dks, dvs = [], [], []
    for (qs, qe), (ks, ke) in zip(_spans(cu_seqlens_q), _spans(cu_seqlens_k)):
        args = (t.transpose(0, 1)[None] for t in (grad[qs:qe], q[qs:qe], k[ks:ke], v[ks:ke]))
        g, qb, kb, vb = args
        ob, lb = out[qs:qe].transpose(0, 1)[None], lse[:, qs:qe][None]
        dq, dk, dv = attention_backward(g, qb, kb, vb, causal, scale, None, window, softcap, ob, lb)
        dqs.append(dq[0].transpose(0, 1))
        dks.append(dk[0].transpose(0, 1))
        dvs.append(dv[0].transpose(0, 1))
    if not dqs:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    return torch.cat(dqs), torch.cat(dks), torch.cat(dvs)


def _varlen_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, window, softcap):
    lse_dtype = torch.promote_types(q.dtype, torch.float32)
    return torch.empty_like(q), q.new_empty((q.shape[1], q.shape[0]), dtype=lse_dtype)


define_op(OpSpec(
    "attention_varlen",
    "Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q, "
    "int max_seqlen_k, bool causal, float? scale, int? window, float? softcap",
    "(Tensor, Tensor)",  # out (total_q, H, D), logsumexp (H, total_q) float32
    _varlen_fake,
    differentiable=(0, 1, 2),
    outputs_to_backward="Tensor out, Tensor lse",
    auxiliary_outputs=True,
    reference_fn=attention_varlen_reference,
    reference_backward_fn=attention_varlen_reference_backward,
))


# ---- public functions ---------------------------------------------------------------------------


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    key_lens: torch.Tensor | None = None,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention, o = softmax(s + mask)·v with s = q·kᵀ·scale.

    q (B, H, Tq, D), k and v (B, Hkv, Tk, D) with H divisible by Hkv (GQA/MQA: query head h
    reads key/value head h // (H / Hkv)) -> o (B, H, Tq, D). scale defaults to 1/sqrt(D).
    causal: query i, at position p_i = i + (Tk - Tq) (aligned bottom-right as for a cached
    prefix), sees keys j <= p_i. key_lens (B,) int: for right-padded batches, keys
    j >= key_lens[b] are hidden. window (int >= 1, needs causal; transformers'
    ``sliding_window``): query i sees only keys p_i - window < j <= p_i. softcap (float > 0,
    Gemma 2): s ← softcap·tanh(s / softcap) before masking and softmax.
    A query row that sees no key returns zeros (and zero gradients), never NaN. Differentiable.
    """
    check_attention_inputs("attention", q, k, v)
    if key_lens is not None:
        check_lengths("attention key_lens", key_lens, q.shape[0], q.device)
    window, softcap = check_window_softcap("attention", window, softcap, bool(causal))
    return run("attention", q.device, q, k, v, bool(causal), scale, key_lens, window, softcap)


def check_cu_seqlens(op: str, name: str, cu: torch.Tensor, total: int, device: torch.device,
                     values: bool = True) -> list[int] | None:
    """``cu`` (num_seqs + 1,) int32 on ``device`` as cumulative offsets of ``total`` packed rows.
    With ``values`` (and not under torch.compile) the offsets are read to the host (one
    device→host copy), checked (0 first, non-decreasing, ``total`` last) and returned; else None."""
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"{op}: expected {name} to be a torch.Tensor, got {type(cu).__name__}")
    if cu.dim() != 1 or cu.shape[0] < 1:
        raise ValueError(f"{op}: expected {name} of shape (num_seqs + 1,), got {tuple(cu.shape)}")
    if cu.dtype != torch.int32:
        raise TypeError(f"{op}: expected {name} of dtype torch.int32, got {cu.dtype}")
    if cu.device != device:
        raise ValueError(f"{op}: expected {name} on {device}, got {cu.device}")
    if not values or torch.compiler.is_compiling():  # value checks need the data (a device sync): eager only
        return None
    offsets = cu.tolist()
    if offsets[0] != 0 or any(b < a for a, b in zip(offsets, offsets[1:])):
        raise ValueError(f"{op}: {name} must start at 0 and be non-decreasing, got {offsets}")
    if offsets[-1] != total:
        raise ValueError(f"{op}: {name}[-1] = {offsets[-1]} must equal the {total} packed tokens")
    return offsets


def check_max_seqlen(op: str, name: str, value: int, offsets: list[int] | None) -> None:
    """``value`` an int >= 0 and, given the offsets :func:`check_cu_seqlens` read, at least the
    longest sequence's length."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{op}: {name} must be an integer >= 0, got {value!r}")
    if offsets is None or len(offsets) < 2:
        return
    longest = max(b - a for a, b in zip(offsets, offsets[1:]))
    if value < longest:
        raise ValueError(f"{op}: {name}={value} is shorter than the longest sequence ({longest})")


def attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    *,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool = False,
    scale: float | None = None,
    window: int | None = None,
    softcap: float | None = None,
    validate: bool = True,
) -> torch.Tensor:
    """Attention over packed variable-length sequences (flash-attn's varlen API).

    q (total_q, H, D), k and v (total_k, Hkv, D) with H divisible by Hkv (GQA/MQA); cu_seqlens_q
    and cu_seqlens_k (num_seqs + 1,) int32 cumulative offsets starting at 0: sequence b is
    query rows cu_seqlens_q[b] .. cu_seqlens_q[b + 1] - 1 and key rows likewise. max_seqlen_*:
    the longest sequence (sizes the kernel grid). Each query attends only to keys of its own
    sequence; causal aligns bottom-right per sequence (query i of a sequence with Tq queries and
    Tk keys sees keys j <= i + Tk - Tq); window (int >= 1, needs causal): only keys
    j > i + Tk - Tq - window; softcap (float > 0): scores s ← softcap·tanh(s / softcap).
    scale defaults to 1/sqrt(D). Returns (total_q, H, D);
    rows that see no key are 0. Differentiable. Equal to ``fastlm.ops.attention`` on each sequence.
    ``validate=False`` skips the checks of the offsets' values and of max_seqlen_* against them
    (a device→host read of cu_seqlens), for callers that checked them once (the model, once per
    forward instead of once per layer); shapes, dtypes and devices are always checked.
    """
    check_ndim("attention_varlen", q=(q, 3), k=(k, 3), v=(v, 3))
    check_floating("attention_varlen", q=q, k=k, v=v)
    check_same_dtype("attention_varlen", q=q, k=k, v=v)
    check_same_device("attention_varlen", q=q, k=k, v=v)
    if k.shape != v.shape:
        raise ValueError(
            f"attention_varlen: k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"attention_varlen: head dims differ: q has D={q.shape[-1]}, k/v have D={k.shape[-1]}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(
            f"attention_varlen: the {q.shape[1]} query heads must be a multiple of the "
            f"{k.shape[1]} key/value heads (GQA)")
    op = "attention_varlen"
    offsets_q = check_cu_seqlens(op, "cu_seqlens_q", cu_seqlens_q, q.shape[0], q.device, validate)
    if cu_seqlens_k is cu_seqlens_q and k.shape[0] == q.shape[0]:  # self-attention: read the offsets once
        offsets_k = offsets_q
    else:
        offsets_k = check_cu_seqlens(op, "cu_seqlens_k", cu_seqlens_k, k.shape[0], q.device, validate)
    if cu_seqlens_q.shape != cu_seqlens_k.shape:
        raise ValueError(
            f"attention_varlen: cu_seqlens_q and cu_seqlens_k must describe the same number of sequences, "
            f"got shapes {tuple(cu_seqlens_q.shape)} and {tuple(cu_seqlens_k.shape)}")
    check_max_seqlen(op, "max_seqlen_q", max_seqlen_q, offsets_q)
    check_max_seqlen(op, "max_seqlen_k", max_seqlen_k, offsets_k)
    window, softcap = check_window_softcap("attention_varlen", window, softcap, bool(causal))
    return run("attention_varlen", q.device, q, k, v, cu_seqlens_q, cu_seqlens_k,
               int(max_seqlen_q), int(max_seqlen_k), bool(causal), None if scale is None else float(scale),
               window, softcap)
