"""Fused, chunked linear log-probabilities and distillation loss: the LM head and the loss
without the (N, V) logits.

Two ops, each a ``fastlm::<name>`` custom op (:mod:`fastlm.ops.registry`) whose kernels are a
chunk driver (here) around a per-row step: the plain-PyTorch step below (the ``reference``
backend, the oracle and CPU fallback) or the Triton kernels in kernels/logprobs.py (adapter:
fastlm/ops/triton/logprobs.py). The driver processes C rows at a time:

    z   = h_c · Wᵀ                 (C, V) logits in the input dtype (one reused buffer)
    row step on z                  per-row results; in the gradient passes z ← dL/dz in place
    dh_c = dz · W                  (C, H)
    dW  += dzᵀ · h_c               (V, H), accumulated in float32

so the extra memory is one or two (C, V) chunks plus the gradients, never (N, V). A logit
soft-cap c > 0 (Gemma 2: z ← c·tanh(z / c)) is applied to each chunk before its row step, and
its derivative 1 − tanh²(z / c) multiplies the chunk's dL/dz after it (one more (C, V) buffer).

**linear_logprobs** (per-token outputs, so the backward recomputes each chunk's logits from the
saved hidden, weight and per-row logsumexp): with s = z / T,

    logp_i = s_i[t_i] − lse(s_i)                   (0 where t_i = ignore_index)
    H_i    = lse(s_i) − Σ_j p_ij s_ij              p_i = softmax(s_i) (0 where ignored)
    dL/ds_ij = g_i·([j = t_i] − p_ij) − e_i·p_ij·(log p_ij + H_i)      (g = dL/dlogp, e = dL/dH)
    dL/dz = dL/ds / T

**linear_distillation_loss** (a scalar, so the forward computes the student's gradients for an
incoming grad of 1 and the backward only scales them, as fused_linear_cross_entropy does): with
s = zs / T, t = zt / T, p_s = softmax(s), p_t = softmax(t),

    row_i = α·T²·D(p_t, p_s) + (1 − α)·(lse(zs_i) − zs_i[y_i])      loss = mean over valid rows
    forward_kl  D = Σ p_t (log p_t − log p_s)            dD/ds = p_s − p_t
    reverse_kl  D = Σ p_s (log p_s − log p_t)            dD/ds = p_s ⊙ (log p_s − log p_t − D)
    jsd (β)     m = β p_t + (1 − β) p_s,  D = β KL(p_t‖m) + (1 − β) KL(p_s‖m)
                g = (1 − β)(log p_s − log m),            dD/ds = p_s ⊙ (g − Σ p_s g)
    dL/dzs = [α·T·dD/ds + (1 − α)(softmax(zs) − onehot(y))] / n_valid

Outputs are float32 (float64 for float64 inputs, for gradcheck).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from fastlm.ops.backend import register_kernel, select
from fastlm.ops.checks import check_dtype, check_floating, check_same_device, check_same_dtype
from fastlm.ops.fused_loss import _accumulate_dw, _acc_dtype, _mean_in_forward, _scaled, default_chunk_size
from fastlm.ops.reference import wide
from fastlm.ops.registry import OpSpec, define_op

LOGPROBS = "linear_logprobs"
DISTILL = "linear_distillation_loss"
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


@dataclass(frozen=True)
class RowSteps:
    """The per-chunk row steps of a backend (see the module docstring for the math).

    logprobs(z (C, V), tokens (C,), out (K, C), lse (C,), temperature, ignore_index): out[0] ←
        logp, out[1] ← entropy when K = 2, lse ← lse(z / T); z may be overwritten (a scratch chunk).
    logprobs_grad_(z, tokens, lse, entropy (C,) or None, g (C,), e (C,) or None, temperature,
        ignore_index): z ← dL/dz in place.
    distill_(zs (C, V), zt (C, V), labels (C,) or None, loss_rows (C,), scale (1,), temperature,
        divergence, jsd_beta, alpha, ignore_index, compute_grad): loss_rows ← row_i (0 where
        ignored); with compute_grad zs ← dL/dzs · scale in place.
    """

    logprobs: Callable
    logprobs_grad_: Callable
    distill_: Callable


# ---- reference row steps (plain PyTorch, float32/float64 math) ----------------------------------


def _safe(tokens: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    valid = tokens != ignore_index
    return valid, torch.where(valid, tokens, torch.zeros_like(tokens))[:, None]


def _scaled_logits(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """s = z / T in the accumulation dtype, written over z when z already has that dtype (z is
    the driver's chunk buffer: the row steps may overwrite it)."""
    s = wide(z)
    if temperature != 1.0:
        s = s.mul_(1.0 / temperature) if s is z else s.mul(1.0 / temperature)
    return s


def _ref_logprobs(z, tokens, out, lse_out, temperature, ignore_index):
    s = _scaled_logits(z, temperature)  # (C, V)
    valid, safe = _safe(tokens, ignore_index)
    lse = torch.logsumexp(s, dim=-1)  # (C,)
    logp = s.gather(-1, safe).squeeze(-1) - lse
    out[0].copy_(torch.where(valid, logp, torch.zeros_like(logp)))
    if out.shape[0] == 2:
        log_p = s.sub_(lse[:, None])  # log p, in place
        ent = -(log_p.exp().mul_(log_p)).sum(-1)  # one (C, V) temporary
        out[1].copy_(torch.where(valid, ent, torch.zeros_like(ent)))
    lse_out.copy_(lse)


def _ref_logprobs_grad_(z, tokens, lse, entropy, g, e, temperature, ignore_index):
    log_p = _scaled_logits(z, temperature).sub_(lse[:, None].to(wide(z).dtype))  # (C, V) log p
    acc = log_p.dtype
    valid, safe = _safe(tokens, ignore_index)
    g = g.to(acc)[:, None]
    if e is None:  # (g/T)·(onehot − p) on valid rows, p written over z when z has the accumulation dtype
        row = g * (valid.to(acc)[:, None] / temperature)  # (C, 1)
        ds = log_p.exp_().mul_(-row)
        ds.scatter_add_(-1, safe, row)
        if ds is not z:
            z.copy_(ds)
        return
    ds = log_p.exp()  # p: the one (C, V) temporary
    # e·p·(log p + H), accumulated over log p
    log_p.add_(entropy.to(acc)[:, None]).mul_(ds).mul_(e.to(acc)[:, None])
    ds.mul_(g).add_(log_p).neg_()
    ds.scatter_add_(-1, safe, g)  # g·(onehot − p) − e·p·(log p + H)
    ds.mul_(valid.to(acc)[:, None] / temperature)
    z.copy_(ds)


def _ref_distill_(zs, zt, labels, loss_rows, scale, temperature, divergence, jsd_beta, alpha, ignore_index,
                  compute_grad):
    z = wide(zs)
    inv_t = 1.0 / temperature
    ls = torch.log_softmax(z * inv_t, -1)  # (C, V) log p_s
    lt = torch.log_softmax(wide(zt).to(z.dtype) * inv_t, -1)  # (C, V) log p_t
    # In place where possible: at most ~4 (C, V) temporaries alive.
    if divergence == "forward_kl":
        pt = lt.exp()
        d = (pt * lt.sub_(ls)).sum(-1)
        dd = ls.exp_().sub_(pt)  # p_s − p_t
    elif divergence == "reverse_kl":
        ps = ls.exp()
        diff = ls.sub_(lt)  # log p_s − log p_t
        d = (ps * diff).sum(-1)
        dd = diff.sub_(d[:, None]).mul_(ps)  # p_s ⊙ (log p_s − log p_t − D)
    else:
        lm = torch.logaddexp(lt + math.log(jsd_beta), ls + math.log1p(-jsd_beta))  # log m
        d = jsd_beta * (lt.exp() * (lt - lm)).sum(-1)
        ps = ls.exp()
        gs = ls.sub_(lm).mul_(1 - jsd_beta)  # (1 − β)(log p_s − log m)
        kl_sm = (ps * gs).sum(-1, keepdim=True)
        d = d + kl_sm.squeeze(-1)
        dd = gs.sub_(kl_sm).mul_(ps)
    row = alpha * temperature * temperature * d
    if labels is None:
        valid = torch.ones(z.shape[0], dtype=torch.bool, device=z.device)
    else:
        valid, safe = _safe(labels, ignore_index)
    if compute_grad:
        dd.mul_(alpha * temperature)
    if labels is not None and alpha < 1:
        lz = torch.log_softmax(z, -1)
        row = row - (1 - alpha) * lz.gather(-1, safe).squeeze(-1)
        if compute_grad:
            grad_ce = lz.exp_()
            grad_ce.scatter_add_(-1, safe, -torch.ones_like(grad_ce[:, :1]))
            dd.add_(grad_ce, alpha=1 - alpha)
    loss_rows.copy_(torch.where(valid, row, torch.zeros_like(row)))
    if compute_grad:
        zs.copy_(dd.mul_(valid.to(z.dtype)[:, None] * scale.to(z.dtype)))


REFERENCE_STEPS = RowSteps(_ref_logprobs, _ref_logprobs_grad_, _ref_distill_)


# ---- chunk drivers (shared by every backend) ----------------------------------------------------


def _soft_cap_(z: torch.Tensor, cap: float) -> torch.Tensor | None:
    """z ← cap·tanh(z / cap) in place (a no-op for cap = 0); returns tanh(z / cap) in the
    accumulation dtype, for the chain rule's 1 − tanh² (None without a cap)."""
    if not cap:
        return None
    t = torch.tanh(wide(z) / cap)
    z.copy_(t * cap)
    return t


def _soft_cap_grad_(dz: torch.Tensor, t: torch.Tensor | None) -> None:
    """dL/dz_raw = dL/dz_capped · (1 − tanh²) in place (nothing without a cap)."""
    if t is not None:
        dz.copy_(wide(dz) * (1 - t * t))


def logprobs_forward(hidden, weight, tokens, temperature, ignore_index, with_entropy, chunk_size, softcap, steps):
    """-> out (K, N) (K = 2 with entropy), lse (N,), both float32 (float64 for float64 inputs)."""
    n, vocab = hidden.shape[0], weight.shape[0]
    acc = _acc_dtype(hidden.dtype)
    out = torch.zeros((2 if with_entropy else 1, n), dtype=acc, device=hidden.device)
    lse = torch.zeros(n, dtype=acc, device=hidden.device)
    buffer = hidden.new_empty((min(chunk_size, n), vocab))  # one (C, V) logits chunk for all chunks
    with torch.no_grad(), torch.autocast(device_type=hidden.device.type, enabled=False):
        for start in range(0, n, chunk_size):
            end = min(start + chunk_size, n)
            z = torch.mm(hidden[start:end], weight.t(), out=buffer[: end - start])
            _soft_cap_(z, softcap)
            steps.logprobs(z, tokens[start:end], out[:, start:end], lse[start:end], temperature, ignore_index)
    return out, lse


def logprobs_backward(grad, hidden, weight, tokens, temperature, ignore_index, with_entropy, chunk_size, softcap, out,
                      lse, needs, steps):
    """grad (K, N) of out -> [d hidden (N, H) or (0,), d weight (V, H) or (0,)]: recomputes each
    chunk's logits, turns them into dL/dz in place, then two matmuls."""
    need_dh, need_dw = needs
    n, vocab = hidden.shape[0], weight.shape[0]
    dh = torch.empty_like(hidden, memory_format=torch.contiguous_format) if need_dh else hidden.new_empty((0,))
    dw = torch.zeros(weight.shape, dtype=_acc_dtype(weight.dtype), device=weight.device) if need_dw else None
    if need_dh or need_dw:
        buffer = hidden.new_empty((min(chunk_size, n), vocab))
        with torch.no_grad(), torch.autocast(device_type=hidden.device.type, enabled=False):
            for start in range(0, n, chunk_size):
                end = min(start + chunk_size, n)
                h = hidden[start:end]
                z = torch.mm(h, weight.t(), out=buffer[: end - start])
                tanh = _soft_cap_(z, softcap)
                entropy = out[1, start:end] if with_entropy else None
                e = grad[1, start:end] if with_entropy else None
                steps.logprobs_grad_(z, tokens[start:end], lse[start:end], entropy, grad[0, start:end], e,
                                     temperature, ignore_index)
                _soft_cap_grad_(z, tanh)
                if need_dh:
                    torch.mm(z, weight, out=dh[start:end])
                if need_dw:
                    _accumulate_dw(dw, z, h)
    return [dh, dw.to(weight.dtype) if need_dw else weight.new_empty((0,))]


def distill_forward(student_hidden, student_weight, teacher_hidden, teacher_weight, labels, temperature, divergence,
                    jsd_beta, alpha, ignore_index, chunk_size, need_dh, need_dw, student_softcap, teacher_softcap,
                    steps):
    """-> (loss (), dh (N, Hs) or (0,), dW (V, Hs) float32 or (0,)) for an incoming grad of 1
    (float16: of the summed loss; backward divides by n_valid)."""
    hs, ws, ht, wt = student_hidden, student_weight, teacher_hidden, teacher_weight
    n, vocab = hs.shape[0], ws.shape[0]
    acc = _acc_dtype(hs.dtype)
    if labels is None:
        n_valid = torch.full((), max(n, 1), dtype=acc, device=hs.device)
        count = torch.full((), n, dtype=acc, device=hs.device)
    else:
        count = (labels != ignore_index).sum().to(acc)
        n_valid = count.clamp(min=1)
    scale = (1.0 / n_valid if _mean_in_forward(hs.dtype) else torch.ones_like(n_valid)).reshape(1)
    loss_rows = torch.zeros(n, dtype=acc, device=hs.device)
    dh = torch.empty_like(hs, memory_format=torch.contiguous_format) if need_dh else hs.new_empty((0,))
    dw = torch.zeros(ws.shape, dtype=_acc_dtype(ws.dtype), device=ws.device) if need_dw \
        else ws.new_empty((0,), dtype=_acc_dtype(ws.dtype))
    compute_grad = need_dh or need_dw
    rows = min(chunk_size, n)
    s_buffer, t_buffer = hs.new_empty((rows, vocab)), ht.new_empty((rows, vocab))
    with torch.no_grad(), torch.autocast(device_type=hs.device.type, enabled=False):
        for start in range(0, n, chunk_size):
            end = min(start + chunk_size, n)
            h = hs[start:end]
            zs = torch.mm(h, ws.t(), out=s_buffer[: end - start])
            zt = torch.mm(ht[start:end], wt.t(), out=t_buffer[: end - start])
            tanh = _soft_cap_(zs, student_softcap)
            _soft_cap_(zt, teacher_softcap)
            steps.distill_(zs, zt, None if labels is None else labels[start:end], loss_rows[start:end], scale,
                           temperature, divergence, jsd_beta, alpha, ignore_index, compute_grad)
            if compute_grad:
                _soft_cap_grad_(zs, tanh)
            if need_dh:
                torch.mm(zs, ws, out=dh[start:end])
            if need_dw:
                _accumulate_dw(dw, zs, h)
    return loss_rows.sum() / count, dh, dw  # NaN when every label is ignored (0/0), zero gradients


def distill_backward(grad, student_hidden, student_weight, teacher_hidden, teacher_weight, labels, temperature,
                     divergence, jsd_beta, alpha, ignore_index, chunk_size, need_dh, need_dw, student_softcap,
                     teacher_softcap, loss, dh, dw, needs=(True, True)):
    """[d student_hidden, d student_weight] = grad · saved (float16: grad / n_valid)."""
    for needed, computed, name in zip(needs, (need_dh, need_dw), ("student_hidden", "student_weight")):
        if needed and not computed:
            raise RuntimeError(f"{DISTILL}: a gradient for {name} is needed but the forward did not compute it")
    scale = wide(grad)
    if not _mean_in_forward(student_hidden.dtype):
        n = student_hidden.shape[0] if labels is None else (labels != ignore_index).sum()
        scale = scale / torch.as_tensor(n, device=scale.device).clamp(min=1).to(scale.dtype)
    return [
        _scaled(dh, scale, student_hidden) if needs[0] else student_hidden.new_empty((0,)),
        _scaled(dw, scale, student_weight) if needs[1] else student_weight.new_empty((0,)),
    ]


# ---- op declarations ------------------------------------------------------------------------


def _logprobs_fake(hidden, weight, tokens, temperature, ignore_index, with_entropy, chunk_size, softcap):
    acc = _acc_dtype(hidden.dtype)
    n = hidden.shape[0]
    return hidden.new_empty((2 if with_entropy else 1, n), dtype=acc), hidden.new_empty((n,), dtype=acc)


def _distill_fake(hs, ws, ht, wt, labels, temperature, divergence, jsd_beta, alpha, ignore_index, chunk_size,
                  need_dh, need_dw, student_softcap, teacher_softcap):
    acc = _acc_dtype(ws.dtype)
    return (
        hs.new_empty((), dtype=_acc_dtype(hs.dtype)),
        hs.new_empty(hs.shape) if need_dh else hs.new_empty((0,)),
        ws.new_empty(ws.shape, dtype=acc) if need_dw else ws.new_empty((0,), dtype=acc),
    )


def logprobs_kernels(steps: RowSteps) -> tuple[Callable, Callable]:
    """(forward, backward) kernels of ``fastlm::linear_logprobs`` for a backend's row steps, in the
    registry's calling convention."""

    def forward(hidden, weight, tokens, temperature, ignore_index, with_entropy, chunk_size, softcap):
        return logprobs_forward(hidden, weight, tokens, temperature, ignore_index, with_entropy, chunk_size, softcap,
                                steps)

    def backward(grad, hidden, weight, tokens, temperature, ignore_index, with_entropy, chunk_size, softcap, out, lse,
                 needs):
        return logprobs_backward(grad, hidden, weight, tokens, temperature, ignore_index, with_entropy, chunk_size,
                                 softcap, out, lse, needs, steps)

    return forward, backward


def grads_in_forward_kernels(forward_fn: Callable, backward_fn: Callable, steps) -> tuple[Callable, Callable]:
    """(forward, backward) kernels, in the registry's calling convention, of a loss whose forward
    computes its gradients (``forward_fn(*args, steps)``) and whose backward scales them
    (``backward_fn(grad, *args, *outputs, needs=needs)``)."""

    def forward(*args):
        return forward_fn(*args, steps)

    def backward(grad, *args_outputs_needs):
        *args_outputs, needs = args_outputs_needs
        return backward_fn(grad, *args_outputs, needs=needs)

    return forward, backward


def distill_kernels(steps: RowSteps) -> tuple[Callable, Callable]:
    """(forward, backward) kernels of ``fastlm::linear_distillation_loss`` for a backend."""
    return grads_in_forward_kernels(distill_forward, distill_backward, steps)


_ref_lp_fwd, _ref_lp_bwd = logprobs_kernels(REFERENCE_STEPS)
_ref_kd_fwd, _ref_kd_bwd = distill_kernels(REFERENCE_STEPS)

LOGPROBS_SPEC = OpSpec(
    LOGPROBS,
    "Tensor hidden, Tensor weight, Tensor tokens, float temperature, int ignore_index, bool with_entropy, "
    "int chunk_size, float softcap",
    "(Tensor, Tensor)",  # out (K, N) [logp; entropy], lse (N,) of the scaled logits
    _logprobs_fake,
    differentiable=(0, 1),
    outputs_to_backward="Tensor out, Tensor lse",
    auxiliary_outputs=True,
    reference_fn=_ref_lp_fwd,
    reference_backward_fn=lambda grad, *a: _ref_lp_bwd(grad, *a, (True, True)),
)
DISTILL_SPEC = OpSpec(
    DISTILL,
    "Tensor student_hidden, Tensor student_weight, Tensor teacher_hidden, Tensor teacher_weight, Tensor? labels, "
    "float temperature, str divergence, float jsd_beta, float alpha, int ignore_index, int chunk_size, "
    "bool need_dh, bool need_dw, float student_softcap, float teacher_softcap",
    "(Tensor, Tensor, Tensor)",  # loss (), dh (N, Hs) or (0,), dW (V, Hs) float32 or (0,)
    _distill_fake,
    differentiable=(0, 1),
    outputs_to_backward="Tensor loss, Tensor grad_hidden, Tensor grad_weight",
    auxiliary_outputs=True,
    reference_fn=_ref_kd_fwd,
    reference_backward_fn=lambda grad, *a: _ref_kd_bwd(grad, *a, (True, True)),
)
define_op(LOGPROBS_SPEC)
define_op(DISTILL_SPEC)
# The backward kernels take ``needs`` (the registry's generic reference backward computes every
# gradient): register the needs-aware ones in place of the defaults.
register_kernel(f"{LOGPROBS}_backward", "reference")(_ref_lp_bwd)
register_kernel(f"{DISTILL}_backward", "reference")(_ref_kd_bwd)


# ---- public functions -----------------------------------------------------------------------


def _check_int(op: str, name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{op}: {name} must be an int, got {value!r}")


def _check_temperature(op: str, temperature) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
        math.isfinite(temperature) and temperature > 0
    ):
        raise ValueError(f"{op}: temperature must be a finite number > 0, got {temperature!r}")
    return float(temperature)


def _check_softcap(op: str, name: str, value) -> float:
    """None (no cap) -> 0.0; else a finite number > 0."""
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"{op}: {name} must be None (no cap) or a finite number > 0, got {value!r}")
    return float(value)


def _check_chunk(op: str, chunk_size) -> None:
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"{op}: chunk_size must be an integer >= 1 or None, got {chunk_size!r}")


def _check_linear(op: str, hidden_name: str, hidden, weight_name: str, weight) -> None:
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 2:
        shape = tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden).__name__
        raise ValueError(f"{op}: expected {hidden_name} of shape (N, H), got {shape}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[0] == 0:
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"{op}: expected {weight_name} of shape (V, H) with V >= 1, got {shape}")
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"{op}: {hidden_name} (N, H={hidden.shape[1]}) and {weight_name} "
                         f"(V, H={weight.shape[1]}) must share H")


def _check_ids(op: str, name: str, ids, n: int, vocab: int, ignore_index: int, validate: bool) -> None:
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a tensor, got {type(ids).__name__}")
    check_dtype(op, ids, torch.int64, name)
    if ids.shape != (n,):
        raise ValueError(f"{op}: expected {name} of shape ({n},) (one per row of hidden), got {tuple(ids.shape)}")
    if validate and not torch.compiler.is_compiling():  # a data-dependent check (a host read): eager only
        bad = (ids != ignore_index) & ((ids < 0) | (ids >= vocab))
        if bad.any():
            raise ValueError(f"{op}: {name} must be in [0, {vocab}) or equal ignore_index={ignore_index}")


def _autocast(hidden: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Under autocast, both to the autocast dtype (as F.linear would)."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        return hidden.to(dtype), weight.to(dtype)
    return hidden, weight


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    tokens: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    chunk_size: int | None = None,
    softcap: float | None = None,
    validate: bool = True,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of given tokens (and the entropy) under softmax(hidden·Wᵀ / T), without
    the (N, V) logits.

    hidden (N, H), weight (V, H) (the LM head, possibly tied to the embedding; same floating
    dtype and device), tokens (N,) int64 in [0, V) or ``ignore_index`` -> logps (N,) float32
    (float64 for float64 inputs), or ``(logps, entropy)`` with ``return_entropy``:

        z_i     = hidden_i · weightᵀ          (softcap c: z_i ← c·tanh(z_i / c), as Gemma 2)
        p_i     = softmax(z_i / temperature)
        logps_i = log p_i[tokens_i]          entropy_i = −Σ_j p_ij log p_ij

    both 0 on rows where tokens_i == ignore_index (padding; zero gradients there). Differentiable
    w.r.t. hidden and weight (through both outputs). Rows are processed ``chunk_size`` at a time
    (default C·V ≈ 2^28 logits); the backward recomputes each chunk's logits from the saved
    per-row logsumexp. ``validate=False`` skips the token-range check (a device→host read).
    Under autocast, hidden and weight are cast to the autocast dtype.
    """
    op = LOGPROBS
    _check_linear(op, "hidden", hidden, "weight", weight)
    check_floating(op, hidden=hidden, weight=weight)
    check_same_device(op, hidden=hidden, weight=weight, tokens=tokens)
    _check_int(op, "ignore_index", ignore_index)
    temperature = _check_temperature(op, temperature)
    softcap = _check_softcap(op, "softcap", softcap)
    _check_chunk(op, chunk_size)
    hidden, weight = _autocast(hidden, weight)
    check_same_dtype(op, hidden=hidden, weight=weight)
    n, vocab = hidden.shape[0], weight.shape[0]
    _check_ids(op, "tokens", tokens, n, vocab, ignore_index, validate)
    chunk = chunk_size if chunk_size is not None else default_chunk_size(n, vocab)
    backend = select(op, hidden.device)
    with_entropy = bool(return_entropy)
    out, _ = torch.ops.fastlm.linear_logprobs(hidden, weight, tokens.contiguous(), temperature, int(ignore_index),
                                              with_entropy, max(chunk, 1), softcap, backend)
    return (out[0], out[1]) if with_entropy else out[0]


def linear_distillation_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    divergence: str = "forward_kl",
    jsd_beta: float = 0.5,
    alpha: float = 0.5,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    student_softcap: float | None = None,
    teacher_softcap: float | None = None,
    validate: bool = True,
) -> torch.Tensor:
    """Knowledge-distillation loss from hidden states and head weights, without either (N, V)
    logits tensor.

    student_hidden (N, Hs), student_weight (V, Hs) (same dtype), teacher_hidden (N, Ht),
    teacher_weight (V, Ht) (same dtype, may differ from the student's), labels (N,) int64 or
    None -> scalar float32 (float64 for float64 student inputs):

        loss = mean over rows i with labels_i ≠ ignore_index (all rows when labels is None) of
               alpha·T²·D(p_t,i, p_s,i) + (1 − alpha)·CE(student logits_i, labels_i)
        p^T  = softmax(z / T), z = hidden · Wᵀ;  CE on the unscaled student logits z

    with each model's logit soft-cap c when given (``student_softcap``, ``teacher_softcap``;
    Gemma 2's final_logit_softcapping): z ← c·tanh(z / c) before everything else;
    with ``alpha`` taken as 1 when labels is None. divergence: "forward_kl" KL(p_t‖p_s),
    "reverse_kl" KL(p_s‖p_t), "jsd" β·KL(p_t‖m) + (1 − β)·KL(p_s‖m) with m = β·p_t + (1 − β)·p_s
    and β = jsd_beta in (0, 1) (TRL's generalized JSD; its β = 0 and 1 limits are the two KLs).
    Gradients flow to student_hidden and student_weight only (the teacher is treated as
    constant). The forward computes them chunk by chunk (``chunk_size`` rows; default C·V ≈
    2^28); every label ignored gives NaN with zero gradients, as PyTorch's cross-entropy.
    """
    op = DISTILL
    _check_linear(op, "student_hidden", student_hidden, "student_weight", student_weight)
    _check_linear(op, "teacher_hidden", teacher_hidden, "teacher_weight", teacher_weight)
    tensors = dict(student_hidden=student_hidden, student_weight=student_weight, teacher_hidden=teacher_hidden,
                   teacher_weight=teacher_weight)
    check_floating(op, **tensors)
    check_same_device(op, **tensors, **({} if labels is None else {"labels": labels}))
    if teacher_hidden.shape[0] != student_hidden.shape[0]:
        raise ValueError(f"{op}: teacher_hidden has {teacher_hidden.shape[0]} rows, student_hidden "
                         f"{student_hidden.shape[0]}: one teacher row per student row is expected")
    if teacher_weight.shape[0] != student_weight.shape[0]:
        raise ValueError(f"{op}: teacher vocabulary V={teacher_weight.shape[0]} differs from the student's "
                         f"V={student_weight.shape[0]}: distillation needs a shared tokenizer")
    if divergence not in DIVERGENCES:
        raise ValueError(f"{op}: divergence must be one of {', '.join(DIVERGENCES)}, got {divergence!r}")
    for name, value, closed in (("jsd_beta", jsd_beta, False), ("alpha", alpha, True)):
        ok = not isinstance(value, bool) and isinstance(value, (int, float)) and (
            0 <= value <= 1 if closed else 0 < value < 1)
        if not ok:
            interval = "[0, 1]" if closed else "(0, 1) (use forward_kl / reverse_kl for the limits)"
            raise ValueError(f"{op}: {name} must be a number in {interval}, got {value!r}")
    _check_int(op, "ignore_index", ignore_index)
    temperature = _check_temperature(op, temperature)
    caps = [_check_softcap(op, name, value) for name, value in
            (("student_softcap", student_softcap), ("teacher_softcap", teacher_softcap))]
    _check_chunk(op, chunk_size)
    sh, sw = _autocast(student_hidden, student_weight)
    th, tw = _autocast(teacher_hidden, teacher_weight)
    check_same_dtype(op, student_hidden=sh, student_weight=sw)
    check_same_dtype(op, teacher_hidden=th, teacher_weight=tw)
    n, vocab = sh.shape[0], sw.shape[0]
    if labels is not None:
        _check_ids(op, "labels", labels, n, vocab, ignore_index, validate)
        labels = labels.contiguous()
    grad_mode = torch.is_grad_enabled()
    need_dh, need_dw = grad_mode and sh.requires_grad, grad_mode and sw.requires_grad
    chunk = chunk_size if chunk_size is not None else default_chunk_size(n, vocab)
    backend = select(op, sh.device)
    return torch.ops.fastlm.linear_distillation_loss(
        sh, sw, th.detach(), tw.detach(), labels, temperature, divergence, float(jsd_beta),
        1.0 if labels is None else float(alpha), int(ignore_index), max(chunk, 1), need_dh, need_dw, *caps,
        backend)[0]
