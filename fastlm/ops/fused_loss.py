"""Fused linear + cross-entropy: the LM-head loss without the (tokens × vocabulary) logits.

    loss = (1 / n_valid) · Σ_{i : t_i ≠ ignore_index} [ logsumexp(h_i · Wᵀ) − h_i · W_{t_i} ]

for hidden h (N, H), output weight W (V, H) and targets t (N,). The tokens are processed in
chunks of C rows (Liger-Kernel's approach): per chunk

    z  = h_c · Wᵀ                          (C, V) logits, in the input dtype
    z ← (softmax(z) − onehot(t_c)) · s     in place, per-row loss kept (the backend's step:
                                           plain PyTorch, or a Triton kernel); s = 1/n_valid
    dh_c = z · W                           (C, H)  -> gradient of the hidden states
    dW  += zᵀ · h_c                        (V, H)  accumulated in float32

so the peak extra memory is one (C, V) chunk plus the gradients, never (N, V), and the forward
computes the loss and both gradients in the same pass. The gradients are saved; backward only
scales them by the incoming grad. float16 is the exception for s: there the chunk keeps the O(1)
values softmax − onehot (scaled by 1/n_valid they would underflow, as PyTorch's would without a
loss scale) and backward scales by grad / n_valid. Gradients are computed only for inputs that
need them (grad mode on and requires_grad): an eval call does the matmul and the loss only.

Precision: the logits and dh come from matmuls in the input dtype with float32 accumulation, as
in the unfused PyTorch; dW is accumulated across chunks in float32 (a bfloat16 accumulator
would round once per chunk, several times PyTorch's error) and rounded once at the end.
Memory beyond the inputs: the float32 dW (V·H·4 bytes; during backward also the final dW in W's
dtype), dh, and one (C, V) logits chunk (the default keeps C·V ≈ 2^28 elements) — independent of
the number of tokens, where the unfused loss holds several (N, V) float32 tensors.

All targets ignored: the loss is NaN (0/0, as PyTorch's cross_entropy) and the gradients are
zero. A tied weight (the embedding's) works: autograd adds this op's dW to the embedding's.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import torch

from fastlm.ops.backend import select
from fastlm.ops.checks import check_dtype, check_floating, check_same_device, check_same_dtype
from fastlm.ops.reference import wide
from fastlm.ops.registry import OpSpec, define_op

logger = logging.getLogger(__name__)

NAME = "fused_linear_cross_entropy"
LOGITS_CHUNK_ELEMENTS = 1 << 28  # default chunk: C·V ≈ 2^28 logits (512 MiB in bfloat16)

# (logits (C, V), targets (C,), loss_rows (C,), scale (), ignore_index, compute_grad) -> None, in
# place: loss_rows <- lse - z[target] (0 where ignored); with compute_grad, logits <-
# (softmax - onehot) * scale.
RowStep = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int, bool], None]


def default_chunk_size(num_tokens: int, vocab: int) -> int:
    """Rows per chunk: C·V ≈ LOGITS_CHUNK_ELEMENTS, a multiple of 256 when that large."""
    chunk = max(1, LOGITS_CHUNK_ELEMENTS // max(vocab, 1))
    if chunk >= 256:
        chunk -= chunk % 256
    return max(1, min(chunk, num_tokens))


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _valid_count(targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """n_valid, clamped to 1: with every target ignored the gradients are zero, not 0·inf."""
    return (targets != ignore_index).sum().clamp(min=1)


def _mean_in_forward(dtype: torch.dtype) -> bool:
    """Whether the chunk gradients carry the mean's 1/n_valid (all dtypes but float16)."""
    return dtype != torch.float16


SLAB_ROWS = 16384  # vocabulary rows per float32 temporary of the "mm" dW strategy


def _addmm_fp32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a·b in place, bf16/fp16 products accumulated by cuBLAS into the float32 acc."""
    torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)


def _mm_fp32(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
    torch.mm(a, b, out_dtype=out.dtype, out=out)


def accumulate_by_slabs(acc: torch.Tensor, dlogits: torch.Tensor, h_chunk: torch.Tensor, mm: Callable,
                        slab_rows: int = SLAB_ROWS) -> None:
    """acc (V, H) += dlogitsᵀ·h_chunk, SLAB_ROWS vocabulary rows at a time through one float32
    temporary (slab_rows, H): ``mm(a, b, out)`` writes the float32 product a·b into out."""
    vocab = acc.shape[0]
    tmp = acc.new_empty((min(slab_rows, vocab), acc.shape[1]))
    for start in range(0, vocab, slab_rows):
        end = min(start + slab_rows, vocab)
        mm(dlogits[:, start:end].t(), h_chunk, tmp[: end - start])
        acc[start:end].add_(tmp[: end - start])


@functools.lru_cache(maxsize=None)
def _dw_strategy(device: str) -> str:
    """How a CUDA device accumulates low-precision products into the float32 dW, probed once:
    "addmm" (in place, torch versions that accept a float32 ``self`` with ``out_dtype``), "mm"
    (float32 products into a slab temporary, then added; torch >= 2.8), else "upcast" (float32
    GEMMs on upcast chunks: correct but slow)."""
    acc = torch.ones(8, 16, device=device)
    a = torch.randn(8, 32, device=device, dtype=torch.bfloat16)
    b = torch.randn(32, 16, device=device, dtype=torch.bfloat16)
    expected = 1.0 + a.float() @ b.float()
    failures = []
    strategies = (("addmm", _addmm_fp32_), ("mm", lambda acc, a, b: accumulate_by_slabs(acc, a.t(), b, _mm_fp32)))
    for name, accumulate in strategies:
        trial = acc.clone()
        try:
            accumulate(trial, a, b)
        except (RuntimeError, NotImplementedError, TypeError) as err:
            failures.append(f"{name}: {err}")
            continue
        if torch.allclose(trial, expected, rtol=1e-3, atol=1e-3):
            return name
        failures.append(f"{name}: wrong result")
    logger.warning("fused_linear_cross_entropy: no float32-output GEMM for bfloat16 on %s (%s); dW "
                   "accumulates through float32 upcasts of each chunk (slower)", device, "; ".join(failures))
    return "upcast"


def _accumulate_dw(acc: torch.Tensor, dlogits: torch.Tensor, h_chunk: torch.Tensor) -> None:
    """acc (V, H) += dlogitsᵀ (V, C) · h_chunk (C, H), products accumulated in acc's dtype."""
    if acc.dtype == dlogits.dtype:
        acc.addmm_(dlogits.t(), h_chunk)
        return
    strategy = _dw_strategy(str(acc.device)) if acc.is_cuda else "upcast"
    if strategy == "addmm":
        _addmm_fp32_(acc, dlogits.t(), h_chunk)
    elif strategy == "mm":
        accumulate_by_slabs(acc, dlogits, h_chunk, _mm_fp32)
    else:  # exact products of the low-precision values, float32 sums (CPU, or torch < 2.8)
        acc.addmm_(dlogits.t().to(acc.dtype), h_chunk.to(acc.dtype))


def chunked_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int,
    chunk_size: int,
    need_dh: bool,
    need_dw: bool,
    row_step: RowStep,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, dh, dW): the loss and its gradients for an incoming grad of 1 (for float16: of the
    summed loss, see the module docstring), dh (N, H) in hidden's dtype and dW (V, H) float32
    (float64 for float64 weights), or empty (0,) tensors where not needed. ``row_step`` is the
    per-chunk loss/gradient step."""
    n, _ = hidden.shape
    acc = _acc_dtype(hidden.dtype)
    targets = targets.contiguous()
    loss_rows = torch.empty(n, dtype=acc, device=hidden.device)
    dh = torch.empty_like(hidden, memory_format=torch.contiguous_format) if need_dh else hidden.new_empty((0,))
    dw = torch.zeros(weight.shape, dtype=_acc_dtype(weight.dtype), device=weight.device) if need_dw \
        else weight.new_empty((0,), dtype=_acc_dtype(weight.dtype))
    compute_grad = need_dh or need_dw
    n_valid = _valid_count(targets, ignore_index)
    n_valid = n_valid.to(acc)
    scale = 1.0 / n_valid if _mean_in_forward(hidden.dtype) else torch.ones_like(n_valid)
    # One (C, V) logits buffer for all chunks: rebinding a fresh product per chunk would hold two.
    buffer = hidden.new_empty((min(chunk_size, n), weight.shape[0]))
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        for start in range(0, n, chunk_size):
            end = min(start + chunk_size, n)
            h_chunk = hidden[start:end]  # (C, H)
            logits = torch.mm(h_chunk, weight.t(), out=buffer[: end - start])  # (C, V), input dtype
            row_step(logits, targets[start:end], loss_rows[start:end], scale, ignore_index, compute_grad)
            if need_dh:
                torch.mm(logits, weight, out=dh[start:end])  # (C, V) · (V, H)
            if need_dw:
                _accumulate_dw(dw, logits, h_chunk)
    loss = loss_rows.sum() / (targets != ignore_index).sum()  # NaN if every target is ignored, as PyTorch
    return loss, dh, dw


def reference_row_step(
    logits: torch.Tensor,
    targets: torch.Tensor,
    loss_rows: torch.Tensor,
    scale: torch.Tensor,
    ignore_index: int,
    compute_grad: bool,
) -> None:
    """Plain PyTorch: loss_i = logsumexp(z_i) − z_i[t_i]; z ← (softmax(z) − onehot(t))·scale (0 if ignored).

    With m_i = max_j z_ij and s_i = Σ_j exp(z_ij − m_i): lse_i = m_i + log s_i and
    softmax(z_i) = exp(z_i − m_i) / s_i. For float32/float64 chunks the exponentials are written
    over the logits in place (no (C, V) temporary: about 5x faster on CPU than building them anew).
    """
    valid = targets != ignore_index
    safe = torch.where(valid, targets, torch.zeros_like(targets))[:, None]
    z = wide(logits)
    picked = z.gather(-1, safe)  # (C, 1), read before z is overwritten
    peak = z.amax(dim=-1, keepdim=True)  # (C, 1)
    e = z.sub_(peak).exp_() if compute_grad and z is logits else torch.exp(z - peak)  # exp(z − m)
    total = e.sum(dim=-1, keepdim=True)  # s
    lse = peak + total.log()
    loss_rows.copy_(torch.where(valid, (lse - picked).squeeze(-1), torch.zeros_like(lse).squeeze(-1)))
    if compute_grad:
        weight = valid[:, None] * scale  # (C, 1): 0 on ignored rows
        e.mul_(weight / total)  # softmax · scale
        e.scatter_add_(-1, safe, -weight.to(e.dtype))
        if e is not logits:
            logits.copy_(e)


def reference(hidden, weight, targets, ignore_index, chunk_size, need_dh, need_dw):
    """The reference kernel of ``fastlm::fused_linear_cross_entropy``: chunked plain PyTorch."""
    return chunked_forward(hidden, weight, targets, ignore_index, chunk_size, need_dh, need_dw, reference_row_step)


def _scaled(saved: torch.Tensor, scale: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """saved · scale computed in scale's dtype (float32: an incoming grad of 1/3 is not rounded
    to bfloat16), written into a tensor of ``like``'s dtype. The (V, H) float32 dW needs no
    temporary; a low-precision dh (N, H) is upcast first."""
    out = torch.empty_like(like)
    torch.mul(saved.to(scale.dtype), scale, out=out)
    return out


def reference_backward(grad, hidden, weight, targets, ignore_index, chunk_size, need_dh, need_dw, loss, dh, dw):
    """(d hidden, d weight) = grad · (saved dh, saved dW) (float16: grad / n_valid); None where
    not computed."""
    scale = wide(grad)
    if not _mean_in_forward(hidden.dtype):
        scale = scale / _valid_count(targets, ignore_index).to(scale.dtype)
    return (
        _scaled(dh, scale, hidden) if need_dh else None,
        _scaled(dw, scale, weight) if need_dw else None,
    )


def _fake(hidden, weight, targets, ignore_index, chunk_size, need_dh, need_dw):
    acc = _acc_dtype(weight.dtype)
    return (
        hidden.new_empty((), dtype=_acc_dtype(hidden.dtype)),
        hidden.new_empty(hidden.shape) if need_dh else hidden.new_empty((0,)),
        weight.new_empty(weight.shape, dtype=acc) if need_dw else weight.new_empty((0,), dtype=acc),
    )


SPEC = OpSpec(
    NAME,
    "Tensor hidden, Tensor weight, Tensor targets, int ignore_index, int chunk_size, bool need_dh, bool need_dw",
    "(Tensor, Tensor, Tensor)",  # loss () float32, dh (N, H) or (0,), dW (V, H) float32 or (0,)
    _fake,
    differentiable=(0, 1),
    outputs_to_backward="Tensor loss, Tensor grad_hidden, Tensor grad_weight",
    auxiliary_outputs=True,
    reference_fn=reference,
    reference_backward_fn=reference_backward,
)
define_op(SPEC)


def _check_args(hidden, weight, targets, ignore_index, chunk_size) -> None:
    op = NAME
    check_floating(op, hidden=hidden, weight=weight)
    check_dtype(op, targets, torch.int64, "targets")
    check_same_device(op, hidden=hidden, weight=weight, targets=targets)
    if weight.dim() != 2 or weight.shape[0] == 0:
        raise ValueError(f"{op}: expected weight of shape (V, H) with V >= 1, got {tuple(weight.shape)}")
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"{op}: hidden (..., H) must end in the weight's H={weight.shape[1]}, got {tuple(hidden.shape)}"
        )
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(
            f"{op}: targets must have hidden's leading shape {tuple(hidden.shape[:-1])}, got {tuple(targets.shape)}"
        )
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"{op}: ignore_index must be an int, got {ignore_index!r}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"{op}: chunk_size must be an integer >= 1 or None, got {chunk_size!r}")


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    validate: bool = True,
) -> torch.Tensor:
    """cross_entropy(hidden · weightᵀ, targets) without materializing the logits.

    hidden (N, H) (or (..., H)), weight (V, H) — the LM head, possibly tied to the embedding —,
    targets (N,) (or hidden's leading shape) int64 in [0, V) or ``ignore_index`` -> scalar
    float32 (float64 for float64 inputs):

        loss = mean over i with t_i ≠ ignore_index of  logsumexp(h_i·Wᵀ) − h_i·W_{t_i}

    Tokens are processed ``chunk_size`` rows at a time (default: C·V ≈ 2^28 logits); the loss and
    the gradients of hidden and weight are computed in the same pass and only for inputs that
    require grad under grad mode. Under autocast, hidden and weight are cast to the autocast dtype
    (as F.linear would). All targets ignored gives NaN, with zero gradients. ``validate=False``
    skips the target-range check (a device→host read) for callers that checked their data.

    Every backend runs through the ``fastlm::fused_linear_cross_entropy`` custom op, the
    reference included: differentiating the plain-PyTorch reference with autograd would save
    every chunk's logits — the full (N, V) this op exists to avoid.
    """
    _check_args(hidden, weight, targets, ignore_index, chunk_size)
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    check_same_dtype(NAME, hidden=hidden, weight=weight)
    vocab, size = weight.shape
    if validate and not torch.compiler.is_compiling():  # a data-dependent check (a host read): eager only
        bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
        if bad.any():
            raise ValueError(f"{NAME}: targets must be in [0, {vocab}) or equal ignore_index={ignore_index}")
    hidden2 = hidden.reshape(-1, size)
    targets2 = targets.reshape(-1)
    grad_mode = torch.is_grad_enabled()
    need_dh = grad_mode and hidden2.requires_grad
    need_dw = grad_mode and weight.requires_grad
    chunk = chunk_size if chunk_size is not None else default_chunk_size(hidden2.shape[0], vocab)
    backend = select(NAME, hidden.device)
    op = getattr(torch.ops.fastlm, NAME)
    return op(hidden2, weight, targets2, int(ignore_index), chunk, need_dh, need_dw, backend)[0]
