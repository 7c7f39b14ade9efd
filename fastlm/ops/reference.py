"""Plain-PyTorch reference implementations of every fastlm op.

These are the CPU fallback and the oracle the kernels are tested against. They favour
clarity over speed: attention materializes the (Tq, Tk) score matrix, softmaxes are taken
in float32, and results are cast back to the input dtype. Inputs are assumed valid here;
``fastlm.ops`` checks them before dispatching.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F


def wide(t: torch.Tensor) -> torch.Tensor:
    """The accumulation dtype of the references: float32, or float64 for float64 inputs."""
    return t if t.dtype == torch.float64 else t.float()


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


def attention(
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


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_lens: torch.Tensor,
    scale: float | None = None,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Attention of the last Tq tokens of each sequence over its cached keys.

    q (B, H, Tq, D); caches (B, Hkv, Lmax, D); cache_lens (B,) valid lengths *including*
    the Tq new tokens, which sit at positions cache_lens[b] - Tq ... cache_lens[b] - 1.
    Query t of sequence b, at position p = cache_lens[b] - Tq + t, sees keys j <= p, and with a
    sliding window only j > p - window. softcap: scores s ← softcap·tanh(s / softcap).
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    tq, lmax = q.shape[2], k_cache.shape[2]
    t = torch.arange(tq, device=q.device)[None, :, None]
    j = torch.arange(lmax, device=q.device)[None, None, :]
    last_visible = cache_lens.to(q.device).view(-1, 1, 1) - tq + t  # (B, Tq, 1)
    visible = j <= last_visible
    if window is not None:
        visible = visible & (j > last_visible - window)
    visible = visible[:, None]  # (B, 1, Tq, Lmax)
    if softcap is not None:  # SDPA has no soft-cap: the materialized reference core
        return _attention_core(q, k_cache, v_cache, visible, scale, softcap)[0]
    # The same float32 softmax as _attention_core, through PyTorch's fused attention (no
    # materialized GQA copies or score matrix: this is also the CPU decode path).
    out = F.scaled_dot_product_attention(wide(q), wide(k_cache), wide(v_cache), attn_mask=visible, scale=scale,
                                         enable_gqa=q.shape[1] != k_cache.shape[1])
    # A query that sees no key (cache_lens < Tq) gets zeros, as in _attention_core.
    return torch.where(last_visible[:, None] >= 0, out, 0.0).to(q.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """y = x / sqrt(mean(x², -1) + eps) · weight, computed in float32 (Llama's convention:
    normalize in float32, cast to the input dtype, then scale by the weight)."""
    normed = F.rms_norm(wide(x), (x.shape[-1],), eps=eps)  # x·rsqrt(mean(x²) + eps)
    return weight * normed.to(x.dtype)


def layer_norm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5
) -> torch.Tensor:
    """y = (x - mean) / sqrt(var + eps) · weight + bias over the last dim (biased variance)."""
    xf = wide(x)
    mean = xf.mean(dim=-1, keepdim=True)
    var = (xf - mean).pow(2).mean(dim=-1, keepdim=True)
    y = (xf - mean) * torch.rsqrt(var + eps) * wide(weight) + wide(bias)
    return y.to(x.dtype)


@functools.lru_cache(maxsize=64)
def _inv_freq(head_dim: int, theta: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """theta^(-2i/head_dim) for i < head_dim / 2 (cached: the same for every layer and step)."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=dtype) / head_dim))


def rope_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float, like: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of angle[p, i] = p · theta^(-2i/head_dim), duplicated over both halves.

    positions (..., T) -> cos/sin (..., T, head_dim) on like's device, in float32 (float64 if
    ``like`` is float64).
    """
    dtype = wide(like).dtype
    if torch.compiler.is_compiling():  # traced: the frequencies become constants of the graph
        inv_freq = _inv_freq.__wrapped__(head_dim, float(theta), dtype, like.device)
    else:
        inv_freq = _inv_freq(head_dim, float(theta), dtype, like.device)
    angles = positions.to(device=like.device, dtype=dtype)[..., None] * inv_freq
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def rope(x: torch.Tensor, positions: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """Rotary embedding, Llama's rotate-half convention.

    x (B, H, T, D) with D even; positions (T,) or (B, T). With x = [x1, x2] split in halves,
    y = x·cos + [-x2, x1]·sin, angles from :func:`rope_cos_sin`.
    """
    cos, sin = rope_cos_sin(positions, x.shape[-1], theta, x)
    if positions.dim() == 2:  # (B, T, D) -> broadcast over heads
        cos, sin = cos[:, None], sin[:, None]
    return rotate_half(x, cos, sin)


def rotate_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x·cos + [-x2, x1]·sin in x's accumulation dtype, cast back to x's dtype; cos/sin
    broadcastable to x (..., D)."""
    xf = wide(x)
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """y = silu(gate) · up, silu(g) = g · sigmoid(g)."""
    return F.silu(gate) * up


def gelu(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's tanh approximation: 0.5·x·(1 + tanh(sqrt(2/π)·(x + 0.044715·x³)))."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = x·Wᵀ + bias + scale·(x·Aᵀ)·Bᵀ.  x (..., in), W (out, in), A (r, in), B (out, r)."""
    return F.linear(x, weight, bias) + scale * F.linear(F.linear(x, lora_a), lora_b)


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: scale = max|W_row| / 127, q = round(W / scale).

    weight (out, in) -> qweight int8 (out, in), scales float32 (out,). All-zero rows get
    scale 1 so that dequantization is exact.
    """
    w = weight.float()
    amax = w.abs().amax(dim=1)
    scales = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    qweight = torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    return qweight, scales


def dequantize_int8(qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """W[o, i] = qweight[o, i]·scales[o] for per-channel scales (out,), or
    qweight[o, i]·scales[o, i // g] for group-wise scales (out, in/g). -> (out, in) float32."""
    s = wide(scales)
    if s.dim() == 2:
        s = s.repeat_interleave(qweight.shape[1] // s.shape[1], dim=1)  # (out, in)
        return wide(qweight).to(s.dtype) * s
    return wide(qweight).to(s.dtype) * s[:, None]


def int8_linear(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """y = x·Wᵀ + bias with W = dequantize_int8(qweight, scales) in x's dtype.  x (..., in)."""
    weight = dequantize_int8(qweight, scales).to(x.dtype)
    return F.linear(x, weight, None if bias is None else bias.to(x.dtype))


# Sampling: the semantics live in fastlm/ops/sampling_reference.py (filters, tie rule, draw).
from fastlm.ops.sampling_reference import filtered_probs, sample  # noqa: E402, F401


def cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100
) -> torch.Tensor:
    """Mean over non-ignored rows of logsumexp(logits_i) - logits_i[target_i], in float32.

    logits (N, V), targets (N,) int64 -> scalar. All rows ignored gives NaN (as PyTorch).
    The float32 logsumexp runs over row chunks of at most 2^24 logits (64 MiB), so a bf16/fp16
    input is never copied whole to float32 (2048 × 32000 bf16: 4 GiB otherwise).
    """
    valid = targets != ignore_index
    safe_targets = torch.where(valid, targets, torch.zeros_like(targets))
    rows = max(1, CROSS_ENTROPY_CHUNK // max(1, logits.shape[-1]))
    lse = torch.cat([torch.logsumexp(wide(chunk), dim=-1) for chunk in logits.split(rows)])
    nll = lse - wide(logits.gather(-1, safe_targets[:, None]).squeeze(-1))
    nll = torch.where(valid, nll, torch.zeros_like(nll))
    return nll.sum() / valid.sum()


CROSS_ENTROPY_CHUNK = 1 << 24  # logits per float32 chunk in cross_entropy
