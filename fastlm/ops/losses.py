"""The cross-entropy loss over materialized logits (the fused linear + cross-entropy that never
materializes them is fastlm/ops/fused_loss.py).

    loss = -(1 / n_valid) · Σ_{i : t_i ≠ ignore_index} log softmax(z_i)[t_i]

Kernel: kernels/cross_entropy.py (one program per row, online logsumexp), adapted in
fastlm/ops/triton/losses.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastlm.ops.checks import check_dtype, check_floating, check_ndim, check_same_device
from fastlm.ops.common import wide
from fastlm.ops.registry import OpSpec, define_op, run

__all__ = ["cross_entropy"]

CROSS_ENTROPY_CHUNK = 1 << 24  # logits per float32 chunk in cross_entropy_reference


# ---- reference ----------------------------------------------------------------------------------


def cross_entropy_reference(
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


# ---- backward formula ---------------------------------------------------------------------------


def cross_entropy_backward(grad, logits, targets, ignore_index):
    """dlogits_i = grad · (softmax(logits_i) - onehot(target_i)) / n_valid for valid rows, else 0."""
    valid = targets != ignore_index
    probs = torch.softmax(wide(logits), dim=-1)
    safe = torch.where(valid, targets, torch.zeros_like(targets))
    probs.scatter_add_(-1, safe[:, None], -torch.ones_like(probs[:, :1]))
    dlogits = probs * valid[:, None] * (wide(grad) / valid.sum())
    return (dlogits.to(logits.dtype),)


# ---- the reference backend's eager path -----------------------------------------------------------


def cross_entropy_eager(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """What the reference backend runs: :func:`cross_entropy_reference`'s loss through PyTorch's
    fused ``F.cross_entropy`` (log_softmax + nll_loss: two kernels forward, two backward, where
    autograd through logsumexp and gather takes about ten passes over the (N, V) logits), on
    the same float32 row chunks (float64 for float64 logits).

    logits (N, V), targets (N,) -> scalar: the sum over non-ignored rows of -log softmax(z_i)[t_i]
    divided by their number (NaN when every row is ignored, as the reference and PyTorch).
    """
    rows = max(1, CROSS_ENTROPY_CHUNK // max(1, logits.shape[-1]))
    if logits.shape[0] <= rows:
        return F.cross_entropy(wide(logits), targets, ignore_index=ignore_index)
    total = sum(F.cross_entropy(wide(chunk), part, ignore_index=ignore_index, reduction="sum")
                for chunk, part in zip(logits.split(rows), targets.split(rows)))
    return total / (targets != ignore_index).sum()


# ---- spec ---------------------------------------------------------------------------------------


define_op(OpSpec(
    "cross_entropy",
    "Tensor logits, Tensor targets, int ignore_index",
    "Tensor",
    lambda logits, targets, ignore_index: logits.new_empty((), dtype=torch.promote_types(logits.dtype, torch.float32)),
    differentiable=(0,),
    reference_fn=cross_entropy_reference,
    reference_backward_fn=cross_entropy_backward,
    reference_eager=cross_entropy_eager,
))


# ---- public function ----------------------------------------------------------------------------


def _inputs_ok(logits, targets) -> bool:
    """Whether :func:`_check_inputs` passes, in one pass of plain comparisons (the per-call path)."""
    return (isinstance(logits, torch.Tensor) and isinstance(targets, torch.Tensor) and logits.dim() == 2
            and targets.dim() == 1 and logits.dtype.is_floating_point and targets.dtype == torch.int64
            and targets.device == logits.device and targets.shape[0] == logits.shape[0])


def _check_inputs(logits, targets) -> None:
    """:func:`cross_entropy`'s logits and targets, each fault named."""
    check_ndim("cross_entropy", logits=(logits, 2), targets=(targets, 1))
    check_floating("cross_entropy", logits=logits)
    check_dtype("cross_entropy", targets, torch.int64, "targets")
    check_same_device("cross_entropy", logits=logits, targets=targets)
    if targets.shape[0] != logits.shape[0]:
        raise ValueError(f"cross_entropy: {logits.shape[0]} rows of logits but {targets.shape[0]} targets")


def cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100, *, validate: bool = True
) -> torch.Tensor:
    """Mean negative log-likelihood, -mean_i log softmax(logits_i)[targets_i], over targets != ignore_index.

    logits (N, V) float, targets (N,) int64 -> scalar float32. ``validate=False`` skips the
    target-range check (a device→host read) for callers that checked their data already.
    """
    if not _inputs_ok(logits, targets):
        _check_inputs(logits, targets)
    vocab = logits.shape[1]
    out_of_range = (targets != ignore_index) & ((targets < 0) | (targets >= vocab)) if validate else None
    if validate and not torch.compiler.is_compiling() and out_of_range.any():
        raise ValueError(f"cross_entropy: targets must be in [0, {vocab}) or equal ignore_index={ignore_index}")
    return run("cross_entropy", logits.device, logits, targets, int(ignore_index))
