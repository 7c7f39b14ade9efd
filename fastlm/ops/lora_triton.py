"""LoRA on the triton backend, and mixed-adapter LoRA batches.

Importing this module

- registers the Triton kernels of ``fastlm.kernels.lora`` as the ``triton`` backend of
  ``lora_linear`` and ``lora_linear_backward`` (y = x·Wᵀ + bias + s·(x·Aᵀ)·Bᵀ; W frozen:
  read in place, never copied, no gradient unless it requires one);
- declares ``fastlm::lora_linear_mixed`` (each row uses its own adapter of a stack, or none),
  with a plain-PyTorch reference, its backward formula, and Triton kernels
  (``fastlm.kernels.lora_sgmv``: rows sorted by adapter on the device, one GEMM over all rows
  with a segmented low-rank epilogue), and its public function :func:`lora_linear_mixed`.

Triton is imported lazily, on the first kernel call: importing this module never imports it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastlm.ops.backend import kernel_module, register_kernel
from fastlm.ops.checks import check_floating, check_ndim, check_same_device, check_same_dtype
from fastlm.ops.reference import wide
from fastlm.ops.registry import OpSpec, define_op, run

__all__ = ["lora_linear_mixed", "lora_linear_mixed_reference", "lora_linear_mixed_reference_backward"]


def _or_empty(grads: list, like: list) -> list[torch.Tensor]:
    """The backward op's list: one tensor per present differentiable argument, empty if not needed."""
    return [g if g is not None else t.new_empty((0,)) for g, t in zip(grads, like) if t is not None]


# ---- fastlm::lora_linear on the triton backend ---------------------------------------------------


@register_kernel("lora_linear", "triton")
def triton_lora_linear(x, weight, lora_a, lora_b, scale, bias):
    """x (..., in), W (out, in), A (r, in), B (out, r), bias (out,) -> (..., out)."""
    return kernel_module("lora").lora_forward(x, weight, lora_a, lora_b, scale, bias)


@register_kernel("lora_linear_backward", "triton")
def triton_lora_linear_backward(grad, x, weight, lora_a, lora_b, scale, bias, needs):
    """[dx, dW, dA, dB, (dbias)] with G = s·dy·B: dx = dy·W + G·A, dA = Gᵀ·x, dB = s·dyᵀ·(x·Aᵀ)."""
    grads = kernel_module("lora").lora_backward(grad, x, weight, lora_a, lora_b, scale, bias, list(needs))
    return _or_empty(grads, [x, weight, lora_a, lora_b, bias])


# ---- fastlm::lora_linear_mixed -------------------------------------------------------------------


def lora_linear_mixed_reference(x, weight, lora_a, lora_b, scales, adapter_index, bias):
    """y_i = x_i·Wᵀ + bias + s_a·(x_i·A_aᵀ)·B_aᵀ, a = adapter_index[i] (nothing added for a = -1).

    x (M, in), W (out, in), A (n, r, in), B (n, out, r), scales (n,), adapter_index (M,).
    Plain PyTorch (differentiable): every adapter is applied to every row and masked, so the
    cost is n low-rank products, with no data-dependent shapes (no host sync).
    """
    out = F.linear(x, weight, bias)
    delta = torch.zeros_like(out)
    for a in range(lora_a.shape[0]):
        rows = (adapter_index == a)[:, None]
        delta = torch.where(rows, scales[a].to(out.dtype) * F.linear(F.linear(x, lora_a[a]), lora_b[a]), delta)
    return out + delta


def lora_linear_mixed_reference_backward(grad, x, weight, lora_a, lora_b, scales, adapter_index, bias):
    """With m_a the rows of adapter a, G = s_a·dy·B_a on them: dx = dy·W + Σ_a m_a·G·A_a,
    dW = dyᵀ·x, dA_a = Gᵀ·x_(m_a), dB_a = s_a·dy_(m_a)ᵀ·(x·A_aᵀ), dbias = Σ dy."""
    x64, dy = wide(x), wide(grad)
    a64, b64, s64 = wide(lora_a), wide(lora_b), wide(scales)
    dx = dy @ wide(weight)
    d_a, d_b = torch.zeros_like(a64), torch.zeros_like(b64)
    for a in range(lora_a.shape[0]):
        mask = (adapter_index == a).to(dy.dtype)[:, None]  # (M, 1)
        dy_a = dy * mask
        g = s64[a] * (dy_a @ b64[a])  # (M, r), zero outside adapter a's rows
        dx = dx + g @ a64[a]
        d_a[a] = g.t() @ x64
        d_b[a] = s64[a] * dy_a.t() @ (x64 @ a64[a].t())
    dw = dy.t() @ x64
    dbias = None if bias is None else dy.sum(dim=0).to(bias.dtype)
    return dx.to(x.dtype), dw.to(weight.dtype), d_a.to(lora_a.dtype), d_b.to(lora_b.dtype), dbias


MIXED_SPEC = OpSpec(
    "lora_linear_mixed",
    "Tensor x, Tensor weight, Tensor lora_a, Tensor lora_b, Tensor scales, Tensor adapter_index, Tensor? bias",
    "Tensor",
    lambda x, w, a, b, scales, index, bias: x.new_empty((x.shape[0], w.shape[0])),
    differentiable=(0, 1, 2, 3, 6),
    reference_fn=lora_linear_mixed_reference,
    reference_backward_fn=lora_linear_mixed_reference_backward,
)
define_op(MIXED_SPEC)


@register_kernel("lora_linear_mixed", "triton")
def triton_lora_linear_mixed(x, weight, lora_a, lora_b, scales, adapter_index, bias):
    return kernel_module("lora_sgmv").lora_mixed_forward(x, weight, lora_a, lora_b, scales, adapter_index, bias)


@register_kernel("lora_linear_mixed_backward", "triton")
def triton_lora_linear_mixed_backward(grad, x, weight, lora_a, lora_b, scales, adapter_index, bias, needs):
    grads = kernel_module("lora_sgmv").lora_mixed_backward(
        grad, x, weight, lora_a, lora_b, scales, adapter_index, bias, list(needs))
    return _or_empty(grads, [x, weight, lora_a, lora_b, bias])


def lora_linear_mixed(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scales: torch.Tensor | list[float] | tuple[float, ...],
    adapter_index: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    validate: bool = True,
) -> torch.Tensor:
    """LoRA linear where each row uses its own adapter (or none): a mixed-task serving batch.

    y[..., :] = x·Wᵀ + bias + s_a·(x·A_aᵀ)·B_aᵀ with a = adapter_index[...], nothing added
    where a = -1. x (..., in); W (out, in); lora_a (n, r, in) and lora_b (n, out, r): the
    adapters stacked (pad smaller ranks with zero rows of A / columns of B); scales (n,) (alpha/r
    of each adapter); adapter_index x.shape[:-1] int32/int64 in [-1, n); bias (out,) or None.
    Returns (..., out). Differentiable in x, W, A, B and bias. Equal to ``lora_linear`` on
    each row with its own adapter. ``validate=False`` skips the range check of adapter_index
    (a device sync), for callers that build valid indices themselves.
    """
    tensors = {"x": x, "weight": weight, "lora_a": lora_a, "lora_b": lora_b}
    if bias is not None:
        tensors["bias"] = bias
    check_floating("lora_linear_mixed", **tensors)
    check_same_dtype("lora_linear_mixed", **tensors)
    check_ndim("lora_linear_mixed", weight=(weight, 2), lora_a=(lora_a, 3), lora_b=(lora_b, 3))
    out_f, in_f = weight.shape
    n, r = lora_a.shape[0], lora_a.shape[1]
    if x.dim() == 0 or x.shape[-1] != in_f or lora_a.shape[2] != in_f:
        raise ValueError(
            f"lora_linear_mixed: inner dims differ: x {tuple(x.shape)}, weight ({out_f}, {in_f}), lora_a "
            f"{tuple(lora_a.shape)}; expected x (..., in), W (out, in), lora_a (n, r, in)")
    if lora_b.shape != (n, out_f, r):
        raise ValueError(f"lora_linear_mixed: expected lora_b of shape ({n}, {out_f}, {r}) (n, out, r), "
                         f"got {tuple(lora_b.shape)}")
    if bias is not None and bias.shape != (out_f,):
        raise ValueError(f"lora_linear_mixed: expected bias of shape ({out_f},), got {tuple(bias.shape)}")
    if not isinstance(scales, torch.Tensor):
        scales = torch.tensor([float(s) for s in scales], dtype=torch.float32, device=x.device)
    if scales.shape != (n,) or not scales.dtype.is_floating_point:
        raise ValueError(f"lora_linear_mixed: expected {n} floating-point scales (one per adapter), "
                         f"got {scales.dtype} {tuple(scales.shape)}")
    if not isinstance(adapter_index, torch.Tensor) or adapter_index.dtype not in (torch.int32, torch.int64):
        raise TypeError("lora_linear_mixed: adapter_index must be an int32/int64 tensor")
    if adapter_index.shape != x.shape[:-1]:
        raise ValueError(f"lora_linear_mixed: expected adapter_index of shape {tuple(x.shape[:-1])} (x's rows), "
                         f"got {tuple(adapter_index.shape)}")
    check_same_device("lora_linear_mixed", **tensors, scales=scales, adapter_index=adapter_index)
    if validate and not torch.compiler.is_compiling() and adapter_index.numel() and (
            (adapter_index < -1) | (adapter_index >= n)).any():
        raise ValueError(f"lora_linear_mixed: adapter_index values must be in [-1, {n}) (-1: no adapter)")
    x2 = x.reshape(-1, in_f)
    out = run("lora_linear_mixed", x.device, x2, weight, lora_a, lora_b, scales.to(torch.float32),
              adapter_index.reshape(-1), bias)
    return out.view(*x.shape[:-1], out_f)
