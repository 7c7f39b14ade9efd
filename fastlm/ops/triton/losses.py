"""Triton adapter of the losses family (fastlm/ops/losses.py): kernels/cross_entropy.py as the
``triton`` backend of ``cross_entropy`` and ``cross_entropy_backward``.

Forward: one program per row, lse by an online max/sum over vocabulary tiles, loss_i =
lse_i − z_i[t_i] (0 where t_i = ignore_index), read-only over the logits; the mean divides by
n_valid on the device (no host read). Backward: dz_i = grad · (softmax(z_i) − onehot(t_i)) /
n_valid, written by the same kernel in place over one (N, V) buffer in the logits' dtype — the
only buffer of that size it allocates (F.cross_entropy allocates the same; the reference's
float32 copy of the logits is avoided). The gradient is recomputed in backward rather than kept
from the forward as Liger does: the op cannot overwrite its input logits (a custom op that does
not mutate its arguments, so torch.compile and a caller that keeps the logits stay correct), and
a gradient kept from the forward would be a second (N, V) buffer alive beside the saved logits.
"""

from __future__ import annotations

import torch

from fastlm.ops.backend import kernel_module, register_kernel

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check(logits: torch.Tensor) -> None:
    if logits.dtype not in _DTYPES:
        raise TypeError(f"cross_entropy (triton): logits dtype {logits.dtype} is not supported; expected one of "
                        f"{', '.join(map(str, _DTYPES))}")


def _n_valid(targets: torch.Tensor, ignore_index: int, dtype: torch.dtype) -> torch.Tensor:
    return (targets != ignore_index).sum().to(dtype)


@register_kernel("cross_entropy", "triton")
def triton_cross_entropy(logits, targets, ignore_index):
    """logits (N, V), targets (N,) int64 -> mean loss over non-ignored rows (float32; float64 for float64)."""
    _check(logits)
    out_dtype = torch.promote_types(logits.dtype, torch.float32)
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    rows = torch.empty(logits.shape[0], dtype=out_dtype, device=logits.device)
    unused_scale = torch.ones(1, dtype=torch.float32, device=logits.device)
    kernel_module("cross_entropy").cross_entropy_rows_(logits, targets, rows, unused_scale, ignore_index, False)
    return rows.sum() / _n_valid(targets, ignore_index, out_dtype)


@register_kernel("cross_entropy_backward", "triton")
def triton_cross_entropy_backward(grad, logits, targets, ignore_index, needs):
    """-> [dlogits (N, V) in logits' dtype] (an empty tensor when not needed)."""
    if not needs[0]:
        return [logits.new_empty((0,))]
    _check(logits)
    acc = torch.promote_types(logits.dtype, torch.float32)
    scale = (grad.to(acc) / _n_valid(targets, ignore_index, acc)).reshape(1)
    dlogits = logits.contiguous().clone()  # overwritten in place by its gradient
    rows = torch.empty(logits.shape[0], dtype=acc, device=logits.device)
    kernel_module("cross_entropy").cross_entropy_rows_(dlogits, targets, rows, scale, ignore_index, True)
    return [dlogits]
