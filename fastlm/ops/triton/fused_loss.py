"""Triton adapter of the fused linear cross-entropy (fastlm/ops/fused_loss.py): the chunk driver
of that file with the linear log-prob row kernels (kernels/logprobs.py) as its per-chunk step, as
the ``triton`` backend of ``fused_linear_cross_entropy`` and its backward."""

from __future__ import annotations

import torch

from fastlm.ops.backend import kernel_module, register_kernel
from fastlm.ops.fused_loss import NAME, chunked_forward, reference_backward


def _triton_row_step(logits, targets, loss_rows, scale, ignore_index, compute_grad) -> None:
    """The linear log-prob kernels (kernels/logprobs.py) at T = 1: cross-entropy is their special
    case, loss_i = −logp_i and dz = g·(onehot − p) with g = −scale on every row. Same traffic as
    a dedicated kernel: the forward reads the chunk once, the gradient pass reads and writes it."""
    kernels = kernel_module("logprobs")
    rows = logits.shape[0]
    logp = loss_rows.new_empty((1, rows))
    lse = loss_rows.new_empty((rows,))
    kernels.logprobs_rows(logits, targets, logp, lse, 1.0, ignore_index)
    torch.neg(logp[0], out=loss_rows)
    if compute_grad:
        g = (-scale).to(loss_rows.dtype).reshape(()).expand(rows).contiguous()
        kernels.logprobs_grad_rows_(logits, targets, lse, None, g, None, 1.0, ignore_index)


@register_kernel(NAME, "triton")
def _triton(hidden, weight, targets, ignore_index, chunk_size, need_dh, need_dw):
    return chunked_forward(hidden, weight, targets, ignore_index, chunk_size, need_dh, need_dw, _triton_row_step)


@register_kernel(f"{NAME}_backward", "triton")
def _triton_backward(grad, hidden, weight, targets, ignore_index, chunk_size, need_dh, need_dw, loss, dh, dw, needs):
    """The backward is two scalings, the same on every backend."""
    for needed, computed, name in zip(needs, (need_dh, need_dw), ("hidden", "weight")):
        if needed and not computed:
            raise RuntimeError(
                f"{NAME}: a gradient for {name} is needed but the forward ran with need_d{name[0]}=False"
            )
    d_hidden, d_weight = reference_backward(
        grad, hidden, weight, targets, ignore_index, chunk_size, needs[0], needs[1], loss, dh, dw
    )
    return [
        d_hidden if needs[0] else hidden.new_empty((0,)),
        d_weight if needs[1] else weight.new_empty((0,)),
    ]
