"""Cross-entropy of a chunk of logits, turning them into their gradient in place (Triton).

This is the loss step of the fused linear cross-entropy (fastlm.ops.fused_loss): for each row
z of a (C, V) logits chunk with target t (rows with t = ignore_index are skipped):

    lse      = log Σ_j exp(z_j)                    online max/sum over BLOCK_V tiles
    loss     = lse − z_t                           per row, float32 (0 on ignored rows)
    dz_j     = (exp(z_j − lse) − [j = t]) · s      written over z (0 on ignored rows)

s is read from a device tensor (no host sync): the caller passes 1/n_valid, the mean's scale
(or 1 for float16 chunks, whose scaled values would underflow; it then scales after the
matmuls). One program per row, two passes over the row (the first for max and sum, the second
for the gradient), math in float32 (float64 for float64 logits).
Imports nothing of fastlm.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import cast_rne as _cast


@triton.jit
def _cross_entropy_rows(
    LOGITS, TARGETS, LOSS, SCALE,
    stride_row, V, ignore_index,
    BLOCK_V: tl.constexpr, ACC: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
):
    """loss[row] = lse − z[target]; with COMPUTE_GRAD, z ← (softmax(z) − onehot(target))·s."""
    row = tl.program_id(0).to(tl.int64)
    z_ptr = LOGITS + row * stride_row
    target = tl.load(TARGETS + row)
    offs = tl.arange(0, BLOCK_V)
    if target == ignore_index:
        tl.store(LOSS + row, 0.0)
        if COMPUTE_GRAD:
            zeros = tl.zeros((BLOCK_V,), dtype=LOGITS.dtype.element_ty)
            for start in tl.range(0, V, BLOCK_V):
                tl.store(z_ptr + start + offs, zeros, mask=start + offs < V)
    else:
        m = tl.full((), float("-inf"), dtype=ACC)  # running max
        s = tl.zeros((), dtype=ACC)  # running Σ exp(z − m)
        for start in tl.range(0, V, BLOCK_V):
            z = tl.load(z_ptr + start + offs, mask=start + offs < V, other=float("-inf")).to(ACC)
            m_new = tl.maximum(m, tl.max(z, axis=0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
            m = m_new
        lse = m + tl.log(s)
        z_target = tl.load(z_ptr + target).to(ACC)
        tl.store(LOSS + row, _cast(lse - z_target, LOSS.dtype.element_ty))
        if COMPUTE_GRAD:
            scale = tl.load(SCALE).to(ACC)
            for start in tl.range(0, V, BLOCK_V):
                cols = start + offs
                z = tl.load(z_ptr + cols, mask=cols < V, other=0.0).to(ACC)
                dz = tl.exp(z - lse) - tl.where(cols == target, 1.0, 0.0)
                tl.store(z_ptr + cols, _cast(dz * scale, LOGITS.dtype.element_ty), mask=cols < V)


def cross_entropy_rows_(
    logits: torch.Tensor,
    targets: torch.Tensor,
    loss_rows: torch.Tensor,
    scale: torch.Tensor,
    ignore_index: int,
    compute_grad: bool,
) -> None:
    """In place: ``loss_rows`` (C,) ← per-row loss; with ``compute_grad``, ``logits`` (C, V) ←
    (softmax(logits) − onehot(targets))·scale (zero rows where ignored). targets (C,) int64,
    scale a one-element float tensor."""
    rows, vocab = logits.shape
    if rows == 0:
        return
    if logits.stride(1) != 1:
        raise ValueError("cross_entropy_rows_: logits must have a unit stride along the vocabulary")
    block_v = min(triton.next_power_of_2(vocab), 8192)  # 8192 × 16 warps: no spills on sm_90
    num_warps = 4 if block_v <= 1024 else 8 if block_v <= 4096 else 16
    acc = tl.float64 if logits.dtype == torch.float64 else tl.float32
    _cross_entropy_rows[(rows,)](
        logits, targets, loss_rows, scale, logits.stride(0), vocab, ignore_index,
        BLOCK_V=block_v, ACC=acc, COMPUTE_GRAD=compute_grad, num_warps=num_warps,
    )
