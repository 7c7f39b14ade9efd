"""The triton backend of attention, and variable-length (packed) attention.

Importing this module registers, for the ``triton`` backend:

- ``attention`` / ``attention_backward``: FlashAttention-2-style kernels of
  ``fastlm.kernels.attention`` behind the ``fastlm::attention`` custom op (dense batches,
  causal bottom-right, GQA/MQA, ``key_lens`` padding, sliding window, logit soft-cap, D <= 256,
  fp16/bf16/fp32);
- ``attention_varlen`` / ``attention_varlen_backward``: the same kernels over packed sequences.

It also declares the ``fastlm::attention_varlen`` custom op (with a plain-PyTorch reference
that loops over the sequences) and its public function :func:`attention_varlen`.
Triton itself is imported lazily, on the first kernel call: importing fastlm never imports it.

Deterministic backward: with ``FASTLM_DETERMINISTIC=1`` in the environment or
``torch.use_deterministic_algorithms(True)``, the triton backward never uses atomics, so two
runs give bit-identical gradients. Otherwise GQA/MQA problems that would underfill the GPU
may split dK/dV over query heads and sum them with fp32 atomics (non-deterministic order).
"""

from __future__ import annotations

import math
import os
from types import ModuleType

import torch

from fastlm.ops import reference, reference_backward
from fastlm.ops.backend import kernel_module, register_kernel
from fastlm.ops.checks import check_floating, check_ndim, check_same_device, check_same_dtype, check_window_softcap
from fastlm.ops.registry import OpSpec, define_op, run

__all__ = [
    "attention_varlen", "attention_varlen_reference", "deterministic_backward", "kernel_modules", "register_kernels",
]

DETERMINISTIC_ENV = "FASTLM_DETERMINISTIC"


def deterministic_backward() -> bool:
    """True if the backward must be bit-reproducible: ``FASTLM_DETERMINISTIC=1`` or
    ``torch.are_deterministic_algorithms_enabled()``."""
    flag = os.environ.get(DETERMINISTIC_ENV, "0").strip().lower() in ("1", "true", "yes", "on")
    return flag or torch.are_deterministic_algorithms_enabled()


def kernel_modules() -> tuple[ModuleType, ModuleType]:
    """(fastlm.kernels.attention, fastlm.kernels.attention_bwd): forward and backward launchers.
    The forward module is loaded first: the backward one imports its helpers from it."""
    return kernel_module("attention"), kernel_module("attention_bwd")


# --------------------------------------------------------------------------------------------
# Triton kernels of the dense op (fastlm::attention)
# --------------------------------------------------------------------------------------------


def triton_attention(q, k, v, causal, scale, key_lens, window, softcap):
    """(out, lse) of ``fastlm::attention`` on the triton backend."""
    return kernel_modules()[0].attention_forward(q, k, v, causal, scale, key_lens, window, softcap)


def triton_attention_backward(grad, q, k, v, causal, scale, key_lens, window, softcap, out, lse, needs):
    """[dq, dk, dv] of ``fastlm::attention_backward``: an empty tensor where ``needs`` is False."""
    grads = kernel_modules()[1].attention_backward(
        grad, q, k, v, causal, scale, key_lens, out, lse, needs, window=window, softcap=softcap,
        deterministic=deterministic_backward())
    return list(grads)


# --------------------------------------------------------------------------------------------
# Variable-length attention: reference, custom op, triton kernels, public function
# --------------------------------------------------------------------------------------------


def _spans(cu_seqlens: torch.Tensor) -> list[tuple[int, int]]:
    offsets = cu_seqlens.tolist()
    return list(zip(offsets[:-1], offsets[1:]))


def attention_varlen_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale,
                               window=None, softcap=None):
    """Plain PyTorch: ``reference.attention_forward`` on each packed sequence.

    q (total_q, H, D), k/v (total_k, Hkv, D) -> (out (total_q, H, D), lse (H, total_q) float32;
    float64 for float64 inputs). Sequence b is rows cu_seqlens[b] .. cu_seqlens[b + 1] - 1.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    outs, lses = [], []
    for (qs, qe), (ks, ke) in zip(_spans(cu_seqlens_q), _spans(cu_seqlens_k)):
        qb, kb, vb = (t.transpose(0, 1)[None] for t in (q[qs:qe], k[ks:ke], v[ks:ke]))  # (1, heads, T, D)
        o, lse = reference.attention_forward(qb, kb, vb, causal, scale, None, window, softcap)
        outs.append(o[0].transpose(0, 1))
        lses.append(lse[0])
    lse_dtype = reference.wide(q).dtype
    if not outs:
        return torch.zeros_like(q), q.new_full((q.shape[1], q.shape[0]), float("-inf"), dtype=lse_dtype)
    return torch.cat(outs, dim=0), torch.cat(lses, dim=1).to(lse_dtype)


def attention_varlen_reference_backward(
    grad, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, window, softcap, out, lse
):
    """(dq, dk, dv): ``reference_backward.attention_backward`` on each packed sequence."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    dqs, dks, dvs = [], [], []
    for (qs, qe), (ks, ke) in zip(_spans(cu_seqlens_q), _spans(cu_seqlens_k)):
        args = (t.transpose(0, 1)[None] for t in (grad[qs:qe], q[qs:qe], k[ks:ke], v[ks:ke]))
        g, qb, kb, vb = args
        ob, lb = out[qs:qe].transpose(0, 1)[None], lse[:, qs:qe][None]
        dq, dk, dv = reference_backward.attention_backward(g, qb, kb, vb, causal, scale, None, window, softcap, ob, lb)
        dqs.append(dq[0].transpose(0, 1))
        dks.append(dk[0].transpose(0, 1))
        dvs.append(dv[0].transpose(0, 1))
    if not dqs:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    return torch.cat(dqs), torch.cat(dks), torch.cat(dvs)


def _varlen_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, window, softcap):
    lse_dtype = torch.promote_types(q.dtype, torch.float32)
    return torch.empty_like(q), q.new_empty((q.shape[1], q.shape[0]), dtype=lse_dtype)


VARLEN_SPEC = OpSpec(
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
)
define_op(VARLEN_SPEC)


def triton_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale,
                            window, softcap):
    return kernel_modules()[0].attention_varlen_forward(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, window, softcap)


def triton_attention_varlen_backward(
    grad, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, window, softcap, out, lse,
    needs
):
    grads = kernel_modules()[1].attention_varlen_backward(
        grad, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, out, lse, needs,
        window=window, softcap=softcap, deterministic=deterministic_backward())
    return list(grads)


TRITON_KERNELS = {
    ("attention", "triton"): triton_attention,
    ("attention_backward", "triton"): triton_attention_backward,
    ("attention_varlen", "triton"): triton_attention_varlen,
    ("attention_varlen_backward", "triton"): triton_attention_varlen_backward,
}


def register_kernels() -> None:
    """Register the triton kernels above (done on import; idempotent)."""
    for (op, backend), fn in TRITON_KERNELS.items():
        register_kernel(op, backend)(fn)


register_kernels()


def _check_cu_seqlens(name: str, cu: torch.Tensor, total: int, device: torch.device) -> None:
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"attention_varlen: expected {name} to be a torch.Tensor, got {type(cu).__name__}")
    if cu.dim() != 1 or cu.shape[0] < 1:
        raise ValueError(f"attention_varlen: expected {name} of shape (num_seqs + 1,), got {tuple(cu.shape)}")
    if cu.dtype != torch.int32:
        raise TypeError(f"attention_varlen: expected {name} of dtype torch.int32, got {cu.dtype}")
    if cu.device != device:
        raise ValueError(f"attention_varlen: expected {name} on {device}, got {cu.device}")
    if torch.compiler.is_compiling():  # value checks need the data (a device sync): eager only
        return
    offsets = cu.tolist()
    if offsets[0] != 0 or any(b < a for a, b in zip(offsets, offsets[1:])):
        raise ValueError(f"attention_varlen: {name} must start at 0 and be non-decreasing, got {offsets}")
    if offsets[-1] != total:
        raise ValueError(f"attention_varlen: {name}[-1] = {offsets[-1]} must equal the {total} packed tokens")


def _check_max_seqlen(name: str, value: int, cu: torch.Tensor) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"attention_varlen: {name} must be an integer >= 0, got {value!r}")
    if torch.compiler.is_compiling() or cu.shape[0] < 2:
        return
    longest = int((cu[1:] - cu[:-1]).max())
    if value < longest:
        raise ValueError(f"attention_varlen: {name}={value} is shorter than the longest sequence ({longest})")


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
    _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], q.device)
    _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], q.device)
    if cu_seqlens_q.shape != cu_seqlens_k.shape:
        raise ValueError(
            f"attention_varlen: cu_seqlens_q and cu_seqlens_k must describe the same number of sequences, "
            f"got shapes {tuple(cu_seqlens_q.shape)} and {tuple(cu_seqlens_k.shape)}")
    _check_max_seqlen("max_seqlen_q", max_seqlen_q, cu_seqlens_q)
    _check_max_seqlen("max_seqlen_k", max_seqlen_k, cu_seqlens_k)
    window, softcap = check_window_softcap("attention_varlen", window, softcap, bool(causal))
    return run("attention_varlen", q.device, q, k, v, cu_seqlens_q, cu_seqlens_k,
               int(max_seqlen_q), int(max_seqlen_k), bool(causal), None if scale is None else float(scale),
               window, softcap)
