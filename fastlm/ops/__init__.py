"""fastlm.ops: one public function per op, checked, then dispatched to a backend.

Every function validates its inputs (shapes, dtypes, devices) with errors that say what was
expected, picks a backend with :func:`fastlm.ops.backend.select`, and runs either the plain
PyTorch reference (``fastlm.ops.reference``) or the ``fastlm::<op>`` custom op that calls the
backend's kernel (``fastlm.ops.registry``).
"""

from __future__ import annotations

import torch

from fastlm.ops import reference  # noqa: F401  (public: fastlm.ops.reference, the oracle)
from fastlm.ops import cross_entropy_triton, decode_triton, int8_triton, lora_triton, triton_fused  # noqa: F401  (register triton kernels)
from fastlm.ops.attention_triton import attention_varlen
from fastlm.ops.fused_loss import fused_linear_cross_entropy
from fastlm.ops.logprobs import linear_distillation_loss, linear_logprobs
from fastlm.ops.triton import logprobs as _triton_logprobs  # noqa: F401  (registers its triton kernels)
from fastlm.ops.kv_append import rope_append_kv
from fastlm.ops.int8_triton import dequantize_int8, quantize_per_token, w8a8_linear
from fastlm.ops.lora_triton import lora_linear_mixed
from fastlm.ops.paged import decode_attention_paged
from fastlm.ops.registry import run
from fastlm.ops.sampling import DeferredChecks, sample  # noqa: F401  (defines fastlm::sample)
from fastlm.ops.backend import (
    BACKENDS,
    BackendUnavailableError,
    available_backends,
    backend_status,
    register_kernel,
    use_backend,
)
from fastlm.ops.checks import (
    check_dtype,
    check_floating,
    check_last_dim,
    check_ndim,
    check_same_device,
    check_same_dtype,
    check_window_softcap,
)

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "DeferredChecks",
    "attention",
    "attention_varlen",
    "available_backends",
    "backend_status",
    "cross_entropy",
    "decode_attention",
    "decode_attention_paged",
    "dequantize_int8",
    "fused_linear_cross_entropy",
    "gelu",
    "int8_linear",
    "layer_norm",
    "linear_distillation_loss",
    "linear_logprobs",
    "lora_linear",
    "lora_linear_mixed",
    "quantize_int8",
    "quantize_per_token",
    "register_kernel",
    "rms_norm",
    "rope",
    "rope_append_kv",
    "sample",
    "swiglu",
    "use_backend",
    "w8a8_linear",
]


def _check_heads(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if k.shape != v.shape:
        raise ValueError(f"{name}: k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"{name}: batch sizes differ: q has {q.shape[0]}, k/v have {k.shape[0]}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"{name}: head dims differ: q has D={q.shape[-1]}, k/v have D={k.shape[-1]}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(
            f"{name}: the {q.shape[1]} query heads must be a multiple of the {k.shape[1]} key/value heads (GQA)"
        )


def _check_lengths(name: str, lens: torch.Tensor, batch: int, device: torch.device) -> None:
    if lens.shape != (batch,):
        raise ValueError(f"{name}: expected shape ({batch},) (one length per sequence), got {tuple(lens.shape)}")
    if lens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name}: expected int32 or int64 lengths, got {lens.dtype}")
    if lens.device != device:
        raise ValueError(f"{name}: expected lengths on {device}, got {lens.device}")


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
    check_ndim("attention", q=(q, 4), k=(k, 4), v=(v, 4))
    check_floating("attention", q=q, k=k, v=v)
    check_same_dtype("attention", q=q, k=k, v=v)
    check_same_device("attention", q=q, k=k, v=v)
    _check_heads("attention", q, k, v)
    if key_lens is not None:
        _check_lengths("attention key_lens", key_lens, q.shape[0], q.device)
    window, softcap = check_window_softcap("attention", window, softcap, bool(causal))
    return run("attention", q.device, q, k, v, bool(causal), scale, key_lens, window, softcap)


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_lens: torch.Tensor,
    *,
    scale: float | None = None,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Attention of the newest Tq tokens of each sequence over its KV cache.

    q (B, H, Tq, D) (Tq = 1 for plain decoding, a few for speculative verification);
    k_cache, v_cache (B, Hkv, Lmax, D); cache_lens (B,) int: valid cache length of each
    sequence, *including* the Tq new tokens already written at cache_lens[b] - Tq ... - 1.
    Causal among the new tokens: query t, at position p = cache_lens[b] - Tq + t, sees keys
    j <= p, and with a sliding window (int >= 1) only j > p - window. softcap (float > 0):
    scores s ← softcap·tanh(s / softcap). Returns (B, H, Tq, D).
    """
    check_ndim("decode_attention", q=(q, 4), k_cache=(k_cache, 4), v_cache=(v_cache, 4))
    check_floating("decode_attention", q=q, k_cache=k_cache, v_cache=v_cache)
    check_same_dtype("decode_attention", q=q, k_cache=k_cache, v_cache=v_cache)
    check_same_device("decode_attention", q=q, k_cache=k_cache, v_cache=v_cache)
    _check_heads("decode_attention", q, k_cache, v_cache)
    _check_lengths("decode_attention cache_lens", cache_lens, q.shape[0], q.device)
    window, softcap = check_window_softcap("decode_attention", window, softcap)
    return run("decode_attention", q.device, q, k_cache, v_cache, cache_lens, scale, window, softcap)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """y = x / sqrt(mean(x², -1) + eps) · weight.  x (..., D), weight (D,) -> (..., D)."""
    check_floating("rms_norm", x=x, weight=weight)
    check_same_device("rms_norm", x=x, weight=weight)
    check_last_dim("rms_norm", x, weight=weight)
    return run("rms_norm", x.device, x, weight, float(eps))


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """y = (x - mean) / sqrt(var + eps) · weight + bias.  x (..., D), weight/bias (D,)."""
    check_floating("layer_norm", x=x, weight=weight, bias=bias)
    check_same_device("layer_norm", x=x, weight=weight, bias=bias)
    check_last_dim("layer_norm", x, weight=weight, bias=bias)
    return run("layer_norm", x.device, x, weight, bias, float(eps))


def rope(x: torch.Tensor, positions: torch.Tensor, *, theta: float = 10000.0) -> torch.Tensor:
    """Rotary position embedding (Llama's rotate-half convention).

    x (B, H, T, D), D even; positions (T,) or (B, T) integer positions. With x = [x1, x2]
    (halves of D) and angle[p, i] = p · theta^(-2i/D) for i < D/2:
    y = [x1·cos - x2·sin, x2·cos + x1·sin].
    """
    check_ndim("rope", x=(x, 4))
    check_floating("rope", x=x)
    if x.shape[-1] % 2:
        raise ValueError(f"rope: head dim must be even, got D={x.shape[-1]}")
    if positions.dtype.is_floating_point or positions.dtype == torch.bool:
        raise TypeError(f"rope: positions must be an integer tensor, got {positions.dtype}")
    if positions.device != x.device:
        raise ValueError(f"rope: positions on {positions.device} but x on {x.device}")
    b, _, t, _ = x.shape
    if positions.shape not in ((t,), (b, t)):
        raise ValueError(f"rope: positions must have shape ({t},) or ({b}, {t}), got {tuple(positions.shape)}")
    if theta <= 0:
        raise ValueError(f"rope: theta must be > 0, got {theta}")
    return run("rope", x.device, x, positions, float(theta))


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """y = silu(gate) · up = gate · sigmoid(gate) · up.  gate, up (..., F) -> (..., F)."""
    check_floating("swiglu", gate=gate, up=up)
    check_same_dtype("swiglu", gate=gate, up=up)
    check_same_device("swiglu", gate=gate, up=up)
    if gate.shape != up.shape:
        raise ValueError(f"swiglu: gate and up shapes differ: {tuple(gate.shape)} vs {tuple(up.shape)}")
    return run("swiglu", gate.device, gate, up)


def gelu(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's GELU (tanh approximation): 0.5·x·(1 + tanh(sqrt(2/π)·(x + 0.044715·x³)))."""
    check_floating("gelu", x=x)
    return run("gelu", x.device, x)


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = x·Wᵀ + bias + scale·(x·Aᵀ)·Bᵀ with PEFT's shapes.

    x (..., in), weight W (out, in), lora_a A (r, in), lora_b B (out, r), bias (out,) -> (..., out).
    """
    tensors = {"x": x, "weight": weight, "lora_a": lora_a, "lora_b": lora_b}
    if bias is not None:
        tensors["bias"] = bias
    check_floating("lora_linear", **tensors)
    check_same_dtype("lora_linear", **tensors)
    check_same_device("lora_linear", **tensors)
    check_ndim("lora_linear", weight=(weight, 2), lora_a=(lora_a, 2), lora_b=(lora_b, 2))
    out_f, in_f = weight.shape
    r = lora_a.shape[0]
    if x.shape[-1] != in_f or lora_a.shape[1] != in_f:
        raise ValueError(
            f"lora_linear: inner dims differ: x (..., {x.shape[-1]}), weight ({out_f}, {in_f}), "
            f"lora_a ({r}, {lora_a.shape[1]}); expected x (..., in), W (out, in), A (r, in)"
        )
    if lora_b.shape != (out_f, r):
        raise ValueError(f"lora_linear: expected lora_b of shape ({out_f}, {r}) (out, r), got {tuple(lora_b.shape)}")
    if bias is not None and bias.shape != (out_f,):
        raise ValueError(f"lora_linear: expected bias of shape ({out_f},), got {tuple(bias.shape)}")
    return run("lora_linear", x.device, x, weight, lora_a, lora_b, float(scale), bias)


def quantize_int8(weight: torch.Tensor, group_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8: scales = max|W[o, group]| / 127, q = round(W / scales) ∈ [-127, 127].

    weight (out, in) float -> (qweight int8 (out, in), scales float32): per output channel
    (out,) when group_size is None, else per group of group_size consecutive inputs
    (out, in / group_size), in divisible by group_size. Dequantize with fastlm.ops.int8_triton.dequantize_int8.
    """
    check_ndim("quantize_int8", weight=(weight, 2))
    check_floating("quantize_int8", weight=weight)
    if not torch.isfinite(weight).all():
        raise ValueError("quantize_int8: weight has NaN or infinite values")
    if group_size is None:
        return run("quantize_int8", weight.device, weight)
    out_f, in_f = weight.shape
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1 or in_f % group_size:
        raise ValueError(
            f"quantize_int8: group_size must be a positive integer dividing in_features={in_f}, got {group_size!r}"
        )
    # Group-wise = per-channel quantization of the (out·G, group_size) view.
    q, scales = run("quantize_int8", weight.device, weight.reshape(out_f * (in_f // group_size), group_size))
    return q.reshape(out_f, in_f), scales.reshape(out_f, in_f // group_size)


def int8_linear(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """y = x·Wᵀ + bias, W[o, i] = qweight[o, i]·scales[o] (per channel, scales (out,)) or
    qweight[o, i]·scales[o, i // (in/G)] (group-wise, scales (out, G), G dividing in).
    x (..., in) float, qweight int8 (out, in), bias (out,) -> (..., out) in x's dtype."""
    check_floating("int8_linear", x=x, scales=scales)
    check_ndim("int8_linear", qweight=(qweight, 2))
    check_dtype("int8_linear", qweight, torch.int8, "qweight")
    tensors = {"x": x, "qweight": qweight, "scales": scales}
    if bias is not None:
        tensors["bias"] = bias
    check_same_device("int8_linear", **tensors)
    out_f, in_f = qweight.shape
    if x.shape[-1] != in_f:
        raise ValueError(f"int8_linear: x has {x.shape[-1]} input features, qweight expects {in_f}")
    groups_ok = scales.dim() == 2 and scales.shape[0] == out_f and scales.shape[1] >= 1 and in_f % scales.shape[1] == 0
    if scales.shape != (out_f,) and not groups_ok:
        raise ValueError(
            f"int8_linear: expected scales of shape ({out_f},) (per channel) or ({out_f}, G) with G "
            f"dividing {in_f} (group-wise), got {tuple(scales.shape)}"
        )
    if bias is not None and bias.shape != (out_f,):
        raise ValueError(f"int8_linear: expected bias of shape ({out_f},), got {tuple(bias.shape)}")
    return run("int8_linear", x.device, x, qweight, scales, bias)


def cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100, *, validate: bool = True
) -> torch.Tensor:
    """Mean negative log-likelihood, -mean_i log softmax(logits_i)[targets_i], over targets != ignore_index.

    logits (N, V) float, targets (N,) int64 -> scalar float32. ``validate=False`` skips the
    target-range check (a device→host read) for callers that checked their data already.
    """
    check_ndim("cross_entropy", logits=(logits, 2), targets=(targets, 1))
    check_floating("cross_entropy", logits=logits)
    check_dtype("cross_entropy", targets, torch.int64, "targets")
    check_same_device("cross_entropy", logits=logits, targets=targets)
    if targets.shape[0] != logits.shape[0]:
        raise ValueError(f"cross_entropy: {logits.shape[0]} rows of logits but {targets.shape[0]} targets")
    vocab = logits.shape[1]
    out_of_range = (targets != ignore_index) & ((targets < 0) | (targets >= vocab)) if validate else None
    if validate and not torch.compiler.is_compiling() and out_of_range.any():
        raise ValueError(f"cross_entropy: targets must be in [0, {vocab}) or equal ignore_index={ignore_index}")
    return run("cross_entropy", logits.device, logits, targets, int(ignore_index))
