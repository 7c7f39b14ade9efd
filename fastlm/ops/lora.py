"""LoRA linear layers: ``lora_linear`` (one adapter) and ``lora_linear_mixed`` (each row its own
adapter of a stack, or none: a mixed-task serving batch), with PEFT's shapes.

    y = x·Wᵀ + bias + s·(x·Aᵀ)·Bᵀ        W (out, in), A (r, in), B (out, r), s = alpha / r

Kernels: kernels/lora.py (lora_linear, forward and backward; W frozen: read in place, no
gradient unless it requires one) and kernels/lora_sgmv.py (lora_linear_mixed: rows sorted by
adapter on the device, one GEMM over all rows with a segmented low-rank epilogue), adapted in
fastlm/ops/triton/lora.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastlm.ops.checks import check_floating, check_ndim, check_same_device, check_same_dtype
from fastlm.ops.common import wide
from fastlm.ops.registry import OpSpec, define_op, run

__all__ = ["lora_linear", "lora_linear_mixed"]


# ---- references ---------------------------------------------------------------------------------


def lora_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = x·Wᵀ + bias + scale·(x·Aᵀ)·Bᵀ.  x (..., in), W (out, in), A (r, in), B (out, r)."""
    return F.linear(x, weight, bias) + scale * F.linear(F.linear(x, lora_a), lora_b)


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


# ---- backward formulas --------------------------------------------------------------------------


def lora_linear_backward(grad, x, weight, lora_a, lora_b, scale, bias):
    """With h = x·Aᵀ: dx = dy·W + s·(dy·B)·A, dW = dyᵀ·x, dA = s·(dy·B)ᵀ·x, dB = s·dyᵀ·h, dbias = Σ dy."""
    x2 = wide(x.reshape(-1, x.shape[-1]))
    dy = wide(grad.reshape(-1, grad.shape[-1]))
    a, b = wide(lora_a), wide(lora_b)
    dy_b = dy @ b  # (N, r)
    dx = dy @ wide(weight) + scale * dy_b @ a
    dw = dy.t() @ x2
    da = scale * dy_b.t() @ x2
    db = scale * dy.t() @ (x2 @ a.t())
    dbias = None if bias is None else dy.sum(dim=0).to(bias.dtype)
    return (
        dx.reshape(x.shape).to(x.dtype),
        dw.to(weight.dtype),
        da.to(lora_a.dtype),
        db.to(lora_b.dtype),
        dbias,
    )


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


# ---- specs --------------------------------------------------------------------------------------


define_op(OpSpec(
    "lora_linear",
    "Tensor x, Tensor weight, Tensor lora_a, Tensor lora_b, float scale, Tensor? bias",
    "Tensor",
    lambda x, w, a, b, scale, bias: x.new_empty((*x.shape[:-1], w.shape[0])),
    differentiable=(0, 1, 2, 3, 5),
    reference_fn=lora_linear_reference,
    reference_backward_fn=lora_linear_backward,
))
define_op(OpSpec(
    "lora_linear_mixed",
    "Tensor x, Tensor weight, Tensor lora_a, Tensor lora_b, Tensor scales, Tensor adapter_index, Tensor? bias",
    "Tensor",
    lambda x, w, a, b, scales, index, bias: x.new_empty((x.shape[0], w.shape[0])),
    differentiable=(0, 1, 2, 3, 6),
    reference_fn=lora_linear_mixed_reference,
    reference_backward_fn=lora_linear_mixed_reference_backward,
))


# ---- public functions ---------------------------------------------------------------------------


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
    if not _lora_inputs_ok(x, weight, lora_a, lora_b, bias, mixed=False):
        _check_lora_inputs(x, weight, lora_a, lora_b, bias)
    return run("lora_linear", x.device, x, weight, lora_a, lora_b, float(scale), bias)


def _check_lora_inputs(x, weight, lora_a, lora_b, bias) -> None:
    """:func:`lora_linear`'s inputs, each fault named."""
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
    if not _lora_inputs_ok(x, weight, lora_a, lora_b, bias, mixed=True):
        _check_mixed_inputs(x, weight, lora_a, lora_b, bias)
    out_f, in_f = weight.shape
    n = lora_a.shape[0]
    if not isinstance(scales, torch.Tensor):
        scales = torch.tensor([float(s) for s in scales], dtype=torch.float32, device=x.device)
    device = x.device
    if not (scales.shape == (n,) and scales.dtype.is_floating_point and isinstance(adapter_index, torch.Tensor)
            and adapter_index.dtype in (torch.int32, torch.int64) and adapter_index.shape == x.shape[:-1]
            and scales.device == device and adapter_index.device == device):
        _check_mixed_index(x, weight, lora_a, lora_b, bias, scales, adapter_index)
    if validate and not torch.compiler.is_compiling() and adapter_index.numel() and (
            (adapter_index < -1) | (adapter_index >= n)).any():
        raise ValueError(f"lora_linear_mixed: adapter_index values must be in [-1, {n}) (-1: no adapter)")
    if scales.dtype != torch.float32:
        scales = scales.float()
    if x.dim() == 2:  # already (N, in): no view in between (two autograd nodes fewer)
        return run("lora_linear_mixed", x.device, x, weight, lora_a, lora_b, scales, adapter_index, bias)
    out = run("lora_linear_mixed", x.device, x.reshape(-1, in_f), weight, lora_a, lora_b, scales,
              adapter_index.reshape(-1), bias)
    return out.view(*x.shape[:-1], out_f)


def _lora_inputs_ok(x, weight, lora_a, lora_b, bias, mixed: bool) -> bool:
    """Whether the LoRA linears' tensors pass their checks — one floating dtype and device; W (out,
    in), x (..., in); A (r, in) and B (out, r), or stacked (n, r, in) and (n, out, r) when
    ``mixed``; bias (out,) or None — in one pass of plain comparisons (the per-call path; the
    checks that name the fault run only when this says no)."""
    tensor = torch.Tensor
    if not (isinstance(x, tensor) and isinstance(weight, tensor) and isinstance(lora_a, tensor)
            and isinstance(lora_b, tensor) and (bias is None or isinstance(bias, tensor))):
        return False
    ws, a_shape, b_shape, dtype, device = weight.shape, lora_a.shape, lora_b.shape, x.dtype, x.device
    if len(ws) != 2 or not x.dim() or x.shape[-1] != ws[1] or len(a_shape) != 2 + mixed or a_shape[-1] != ws[1]:
        return False
    adapters = a_shape[:1] if mixed else ()
    return (b_shape == (*adapters, ws[0], a_shape[-2]) and dtype.is_floating_point and weight.dtype == dtype
            and lora_a.dtype == dtype and lora_b.dtype == dtype and weight.device == device
            and lora_a.device == device and lora_b.device == device
            and (bias is None or (bias.dtype == dtype and bias.device == device and bias.shape == ws[:1])))


def _check_mixed_inputs(x, weight, lora_a, lora_b, bias) -> None:
    """:func:`lora_linear_mixed`'s tensors but the scales and indices, each fault named."""
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
    check_same_device("lora_linear_mixed", **tensors)


def _check_mixed_index(x, weight, lora_a, lora_b, bias, scales, adapter_index) -> None:
    """:func:`lora_linear_mixed`'s scales (a tensor by now) and adapter_index, each fault named."""
    n = lora_a.shape[0]
    if scales.shape != (n,) or not scales.dtype.is_floating_point:
        raise ValueError(f"lora_linear_mixed: expected {n} floating-point scales (one per adapter), "
                         f"got {scales.dtype} {tuple(scales.shape)}")
    if not isinstance(adapter_index, torch.Tensor) or adapter_index.dtype not in (torch.int32, torch.int64):
        raise TypeError("lora_linear_mixed: adapter_index must be an int32/int64 tensor")
    if adapter_index.shape != x.shape[:-1]:
        raise ValueError(f"lora_linear_mixed: expected adapter_index of shape {tuple(x.shape[:-1])} (x's rows), "
                         f"got {tuple(adapter_index.shape)}")
    tensors = {"x": x, "weight": weight, "lora_a": lora_a, "lora_b": lora_b}
    if bias is not None:
        tensors["bias"] = bias
    check_same_device("lora_linear_mixed", **tensors, scales=scales, adapter_index=adapter_index)
