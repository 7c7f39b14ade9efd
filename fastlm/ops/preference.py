"""Fused linear preference loss (DPO, IPO, SimPO): the LM head, the sequence log-probs, the
per-pair loss and its gradients, without the (N, V) logits and without a second softmax.

One ``fastlm::linear_preference_loss`` custom op (:mod:`fastlm.ops.registry`). Inputs: hidden
(2P·T, H) — P pairs of sequences of T scored positions, ordered [chosen 0..P−1, rejected
0..P−1] as fastlm.align.dpo.DPOTrainer batches them — the head weight W (V, H), target tokens
(2P, T) and a completion mask (2P, T). The chunk driver (here) takes K pairs at a time, i.e. the
2K·T rows of their chosen and rejected sequences:

    h_c   = [chosen rows; rejected rows]    (2K·T, H), gathered (a small copy) so each GEMM is one call
    z     = h_c · Wᵀ                        (2K·T, V) logits in the input dtype (GEMM 1; one reused buffer)
            (with a soft-cap c: z ← c·tanh(z / c), and the gradient below times 1 − tanh²)
    row step (backend):  logp_i = s_i[t_i] − lse(s_i),  s = z / temperature   (0 where t_i = ignore_index)
    π_q   = Σ_{i ∈ q} w_i·logp_i,  w_i = mask_i·[t_i ≠ ignore_index]          (per sequence q)
    π̄_q  = π_q / max(Σ_{i ∈ q} w_i, 1)                                          (IPO, SimPO)
    loss_p, dL/dπ_c, dL/dπ_r                per pair p (closed form, below)
    grad step (backend): z ← g_i·(onehot(t_i) − softmax(s_i)) / temperature,   g_i = dL/dπ_{q(i)}·w_i (/count)
    dh_c  = z · W                           (2K·T, H)  (GEMM 2)
    dW   += zᵀ · h_c                        (V, H), accumulated in float32    (GEMM 3: one pass over dW per chunk)

so the forward computes the loss and both gradients (for an incoming grad of 1) in 3 GEMMs of
2K·T·V·H each — the unfused path also needs 3, a forward+recompute-backward chunked path 4 —
and the backward only scales the saved gradients by the incoming (scalar) grad. Extra memory:
one (2K·T, V) chunk, the float32 dW (V·H·4 bytes) and dh, never (N, V).

Per-pair losses, as fastlm.align.dpo's ``dpo_loss`` / ``simpo_loss`` (TRL's definitions), with
ρ_c, ρ_r the reference log-probs (``ref_logps``; per-token means for IPO), β = beta, ε =
label_smoothing, γ = gamma:

    sigmoid  h = (π_c − π_r) − (ρ_c − ρ_r),  L = −(1−ε)·log σ(βh) − ε·log σ(−βh)
             dL/dπ_c = −dL/dπ_r = β·(−(1−ε)·σ(−βh) + ε·σ(βh));   rewards β(π_c − ρ_c), β(π_r − ρ_r)
    ipo      h from per-token means,  L = (h − 1/(2β))²,  dL/dπ̄_c = −dL/dπ̄_r = 2(h − 1/(2β))
    simpo    u = β(π̄_c − π̄_r) − γ,  L = −(1−ε)·log σ(u) − ε·log σ(−u),
             dL/dπ̄_c = −dL/dπ̄_r = β·(−(1−ε)·σ(−u) + ε·σ(u));   rewards β·π̄_c, β·π̄_r (no reference)

Backends' row steps (:class:`PairSteps`): the plain-PyTorch one below (the ``reference`` backend:
the CPU path and the oracle; for float32/float64 logits it turns the chunk into softmax
probabilities in place, so the gradient step is one multiply and a scatter) and the Triton one
(fastlm/ops/triton/preference.py: kernels/logprobs.py's row kernels, read-only forward + in-place
gradient). Outputs are float32 (float64 for float64 inputs, for gradcheck).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from fastlm.ops.backend import register_kernel, select
from fastlm.ops.checks import check_floating, check_same_device, check_same_dtype
from fastlm.ops.fused_loss import LOGITS_CHUNK_ELEMENTS, _accumulate_dw, _acc_dtype, _scaled
from fastlm.ops.logprobs import (
    _autocast,
    _check_chunk,
    _check_ids,
    _check_int,
    _check_linear,
    _check_softcap,
    _check_temperature,
    _safe,
    _scaled_logits,
    _soft_cap_,
    _soft_cap_grad_,
    grads_in_forward_kernels,
)
from fastlm.ops.reference import wide
from fastlm.ops.registry import OpSpec, define_op

PREFERENCE = "linear_preference_loss"
PREFERENCE_LOSSES = ("sigmoid", "ipo", "simpo")
AVERAGED = ("ipo", "simpo")  # per-token mean log-probs; sigmoid (DPO) sums


@dataclass(frozen=True)
class PairSteps:
    """The per-chunk row steps of a backend.

    logprobs_(z (C, V), tokens (C,), logp (C,), stat (C,), temperature, ignore_index): logp ←
        log softmax(z/T)[t] (0 where ignored); stat ← a per-row value the backend's grad step
        reads; z may be left in a backend-private form that only its grad step reads.
    grad_(z, tokens, stat, g (C,), temperature, ignore_index): z ← g·(onehot(t) − softmax(z/T))/T
        in place (g is 0 on ignored rows), from what logprobs_ left.
    """

    logprobs_: Callable
    grad_: Callable


# ---- reference row steps ------------------------------------------------------------------------


def _ref_logprobs_(z, tokens, logp, stat, temperature, ignore_index):
    """float32/float64 z: z ← exp(z/T − max) in place and stat ← Σ of that row (so the grad step is
    one multiply by −g/(T·stat) and a scatter: softmax is never normalised in a separate pass);
    lower precision: z is kept (the probabilities are recomputed in float32) and stat ← lse."""
    s = _scaled_logits(z, temperature)  # (C, V); z itself for float32/float64 (scaled in place)
    valid, safe = _safe(tokens, ignore_index)
    m = s.amax(-1, keepdim=True)  # (C, 1)
    picked = s.gather(-1, safe)  # (C, 1) s[t]
    if s is z:  # passes over the chunk: max, shift, exp, sum
        total = s.sub_(m).exp_().sum(-1, keepdim=True)  # (C, 1) Σ exp(s − m)
        lse = m + total.log()
        stat.copy_(total.squeeze(-1))
    else:
        lse = m + (s - m).exp_().sum(-1, keepdim=True).log()
        stat.copy_(lse.squeeze(-1))
    logp.copy_(torch.where(valid, (picked - lse).squeeze(-1), torch.zeros_like(logp)))


def _ref_grad_(z, tokens, stat, g, temperature, ignore_index):
    acc = _acc_dtype(z.dtype)
    _, safe = _safe(tokens, ignore_index)
    row = (g.to(acc) / temperature)[:, None]  # (C, 1) g/T
    if z.dtype == acc:  # z holds exp(s − m), stat its row sums: p = z / stat
        z.mul_(-row / stat[:, None]).scatter_add_(-1, safe, row)
        return
    p = _scaled_logits(z, temperature).sub_(stat.to(acc)[:, None]).exp_()  # (C, V) float32
    z.copy_(p.mul_(-row).scatter_add_(-1, safe, row))


REFERENCE_STEPS = PairSteps(_ref_logprobs_, _ref_grad_)


# ---- per-pair loss (small tensors) --------------------------------------------------------------


def _smoothed_sigmoid(u: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """−(1−ε)·log σ(u) − ε·log σ(−u) and its derivative −(1−ε)·σ(−u) + ε·σ(u)."""
    loss = -(1 - eps) * F.logsigmoid(u) - eps * F.logsigmoid(-u)
    return loss, -(1 - eps) * torch.sigmoid(-u) + eps * torch.sigmoid(u)


def pair_terms(chosen, rejected, ref, loss, beta, gamma, eps):
    """(losses, dL/dchosen, chosen rewards, rejected rewards), all (K,), from the policy's
    chosen/rejected log-probs (K,) (means for ipo/simpo) and ``ref`` (K, 2) or None (module
    docstring); dL/drejected = −dL/dchosen."""
    if loss == "simpo":
        losses, d = _smoothed_sigmoid(beta * (chosen - rejected) - gamma, eps)
        return losses, beta * d, beta * chosen, beta * rejected
    ref = ref.to(chosen.dtype)
    chosen_ratio, rejected_ratio = chosen - ref[:, 0], rejected - ref[:, 1]
    h = chosen_ratio - rejected_ratio
    if loss == "sigmoid":
        losses, d = _smoothed_sigmoid(beta * h, eps)
        d = beta * d
    else:
        losses, d = (h - 1 / (2 * beta)) ** 2, 2 * (h - 1 / (2 * beta))
    return losses, d, beta * chosen_ratio, beta * rejected_ratio


# ---- chunk driver (shared by every backend) -----------------------------------------------------


def preference_forward(hidden, weight, tokens, mask, ref_logps, loss, beta, gamma, label_smoothing, temperature,
                       ignore_index, chunk_size, softcap, need_dh, need_dw, steps):
    """-> loss_sum (), pairs (5, P) [losses; chosen rewards; rejected rewards; chosen logps;
    rejected logps], dh (2P·T, H) or (0,), dW (V, H) float32 or (0,) — the gradients for an
    incoming grad of 1. ``chunk_size`` is in pairs."""
    seqs, t = tokens.shape
    pairs, vocab = seqs // 2, weight.shape[0]
    acc = _acc_dtype(hidden.dtype)
    stats = torch.zeros((5, pairs), dtype=acc, device=hidden.device)
    dh = torch.empty_like(hidden, memory_format=torch.contiguous_format) if need_dh else hidden.new_empty((0,))
    dw = torch.zeros(weight.shape, dtype=_acc_dtype(weight.dtype), device=weight.device) if need_dw \
        else weight.new_empty((0,), dtype=_acc_dtype(weight.dtype))
    compute_grad = need_dh or need_dw
    k_max = max(1, min(chunk_size, pairs))
    buffer = hidden.new_empty((2 * k_max * t, vocab))  # one (2K·T, V) logits chunk for all chunks
    logp = torch.empty(2 * k_max * t, dtype=acc, device=hidden.device)
    stat = torch.empty(2 * k_max * t, dtype=acc, device=hidden.device)
    flat_tokens = tokens.reshape(-1)
    weights = (mask != 0) & (tokens != ignore_index)  # (2P, T) scored positions
    with torch.no_grad(), torch.autocast(device_type=hidden.device.type, enabled=False):
        for a in range(0, pairs, k_max):
            k = min(k_max, pairs - a)
            n = k * t  # rows per half
            rows = (slice(a * t, a * t + n), slice((pairs + a) * t, (pairs + a) * t + n))  # chosen, rejected
            z = buffer[: 2 * n]
            contiguous = k == pairs  # one chunk: the chosen and rejected rows are adjacent
            h = hidden if contiguous else torch.cat((hidden[rows[0]], hidden[rows[1]]))  # (2n, H): one GEMM each
            torch.mm(h, weight.t(), out=z)
            tanh = _soft_cap_(z, softcap)  # None without a cap
            tok = torch.cat((flat_tokens[rows[0]], flat_tokens[rows[1]]))  # (2n,)
            w = torch.cat((weights[a:a + k], weights[pairs + a:pairs + a + k])).to(acc)  # (2K, T)
            steps.logprobs_(z, tok, logp[: 2 * n], stat[: 2 * n], temperature, ignore_index)
            seq = (logp[: 2 * n].view(2 * k, t) * w).sum(1)  # (2K,) π
            if loss in AVERAGED:
                count = w.sum(1).clamp(min=1)
                seq, w = seq / count, w / count[:, None]
            chosen, rejected = seq[:k], seq[k:]
            ref = None if ref_logps is None else ref_logps[a:a + k]
            losses, d, r_c, r_r = pair_terms(chosen, rejected, ref, loss, beta, gamma, label_smoothing)
            stats[:, a:a + k] = torch.stack((losses, r_c, r_r, chosen, rejected))
            if not compute_grad:
                continue
            g = (torch.cat((d, -d))[:, None] * w).reshape(-1)  # (2n,) dL/dlogp_i
            steps.grad_(z, tok, stat[: 2 * n], g, temperature, ignore_index)
            _soft_cap_grad_(z, tanh)
            if need_dh:
                if contiguous:
                    torch.mm(z, weight, out=dh)
                else:
                    dh_c = torch.mm(z, weight)  # (2n, H)
                    dh[rows[0]], dh[rows[1]] = dh_c[:n], dh_c[n:]
            if need_dw:  # one pass over dW per chunk
                _accumulate_dw(dw, z, h)
    return stats[0].sum(), stats, dh, dw


def preference_backward(grad, hidden, weight, tokens, mask, ref_logps, loss, beta, gamma, label_smoothing,
                        temperature, ignore_index, chunk_size, softcap, need_dh, need_dw, loss_sum, pairs, dh, dw,
                        needs=(True, True)):
    """[d hidden, d weight] = grad · (saved dh, saved dW)."""
    for needed, computed, name in zip(needs, (need_dh, need_dw), ("hidden", "weight")):
        if needed and not computed:
            raise RuntimeError(f"{PREFERENCE}: a gradient for {name} is needed but the forward did not compute it")
    scale = wide(grad)
    return [
        _scaled(dh, scale, hidden) if needs[0] else hidden.new_empty((0,)),
        _scaled(dw, scale, weight) if needs[1] else weight.new_empty((0,)),
    ]


def preference_kernels(steps: PairSteps) -> tuple[Callable, Callable]:
    """(forward, backward) kernels of ``fastlm::linear_preference_loss`` for a backend's steps."""
    return grads_in_forward_kernels(preference_forward, preference_backward, steps)


def _fake(hidden, weight, tokens, mask, ref_logps, loss, beta, gamma, label_smoothing, temperature, ignore_index,
          chunk_size, softcap, need_dh, need_dw):
    acc = _acc_dtype(hidden.dtype)
    wacc = _acc_dtype(weight.dtype)
    return (
        hidden.new_empty((), dtype=acc),
        hidden.new_empty((5, tokens.shape[0] // 2), dtype=acc),
        hidden.new_empty(hidden.shape) if need_dh else hidden.new_empty((0,)),
        weight.new_empty(weight.shape, dtype=wacc) if need_dw else weight.new_empty((0,), dtype=wacc),
    )


_ref_forward, _ref_backward = preference_kernels(REFERENCE_STEPS)

PREFERENCE_SPEC = OpSpec(
    PREFERENCE,
    "Tensor hidden, Tensor weight, Tensor tokens, Tensor mask, Tensor? ref_logps, str loss, float beta, "
    "float gamma, float label_smoothing, float temperature, int ignore_index, int chunk_size, float softcap, "
    "bool need_dh, bool need_dw",
    "(Tensor, Tensor, Tensor, Tensor)",  # loss_sum (), pairs (5, P), dh (2P·T, H) or (0,), dW (V, H) fp32 or (0,)
    _fake,
    differentiable=(0, 1),
    outputs_to_backward="Tensor loss_sum, Tensor pairs, Tensor grad_hidden, Tensor grad_weight",
    auxiliary_outputs=True,
    reference_fn=_ref_forward,
    reference_backward_fn=lambda grad, *a: _ref_backward(grad, *a, (True, True)),
)
define_op(PREFERENCE_SPEC)
register_kernel(f"{PREFERENCE}_backward", "reference")(_ref_backward)  # the needs-aware backward


# ---- public function ----------------------------------------------------------------------------


class PreferenceLoss(NamedTuple):
    """``loss``: Σ over pairs of the per-pair losses (differentiable w.r.t. hidden and weight);
    the rest (P,), detached: ``losses``, the implicit rewards, and the policy's sequence
    log-probs (sums for sigmoid, per-token means for ipo/simpo)."""

    loss: torch.Tensor
    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor


def default_pair_chunk(pairs: int, t: int, vocab: int) -> int:
    """Pairs per chunk: 2K·T·V ≈ LOGITS_CHUNK_ELEMENTS (at least one pair)."""
    return max(1, min(pairs, LOGITS_CHUNK_ELEMENTS // max(2 * t * vocab, 1)))


def _check_number(name: str, value, ok: Callable[[float], bool], expected: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(value):
        raise ValueError(f"{PREFERENCE}: {name} must be {expected}, got {value!r}")
    return float(value)


def linear_preference_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    tokens: torch.Tensor,
    mask: torch.Tensor,
    ref_logps: torch.Tensor | None = None,
    *,
    loss: str = "sigmoid",
    beta: float = 0.1,
    gamma: float = 0.5,
    label_smoothing: float = 0.0,
    temperature: float = 1.0,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    softcap: float | None = None,
    validate: bool = True,
) -> PreferenceLoss:
    """DPO / IPO / SimPO loss from hidden states and the LM head weight, chunked by pairs, the
    gradients computed in the forward (module docstring for the math and the chunking).

    hidden (2P·T, H) or (2P, T, H): the hidden state that predicts each target, sequences
    [chosen 0..P−1, rejected 0..P−1] (fastlm.align.dpo's batch layout); weight (V, H) (same
    floating dtype and device); tokens (2P, T) int64 targets in [0, V) or ``ignore_index``;
    mask (2P, T) bool/integer 0/1, the completion mask (positions summed); ref_logps (P, 2)
    [chosen, rejected] reference sequence log-probs (sums for "sigmoid", per-token means for
    "ipo"), None for "simpo" (reference-free).

        logp_i = log softmax(z_i / temperature)[tokens_i],   z_i = hidden_i · Wᵀ
                 (z_i ← softcap·tanh(z_i / softcap) with a final logit ``softcap``, Gemma 2's)
        π_q    = Σ_{i ∈ q, mask_i = 1, tokens_i ≠ ignore_index} logp_i   (÷ that count for ipo/simpo)

    then per pair exactly fastlm.align.dpo's ``dpo_loss(loss_type="sigmoid"|"ipo")`` or
    ``simpo_loss`` (beta, ``gamma`` = SimPO's target margin, ``label_smoothing`` ε for sigmoid
    and simpo). Returns :class:`PreferenceLoss` (loss = Σ_p losses_p, float32; float64 for
    float64 inputs). ``chunk_size``: pairs per chunk (default 2K·T·V ≈ 2^28 logits).
    ``validate=False`` skips the value checks of tokens and mask (device→host reads).
    """
    op = PREFERENCE
    if isinstance(hidden, torch.Tensor) and hidden.dim() == 3:
        hidden = hidden.reshape(-1, hidden.shape[-1])
    _check_linear(op, "hidden", hidden, "weight", weight)
    check_floating(op, hidden=hidden, weight=weight)
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2:
        shape = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        raise ValueError(f"{op}: expected tokens of shape (2P, T) (chosen sequences, then rejected), got {shape}")
    seqs, t = tokens.shape
    if seqs % 2 or seqs == 0:
        raise ValueError(f"{op}: tokens must hold an even, nonzero number of sequences (P chosen then P rejected), "
                         f"got {seqs}")
    if hidden.shape[0] != seqs * t:
        raise ValueError(f"{op}: hidden has {hidden.shape[0]} rows; tokens (2P={seqs}, T={t}) needs 2P·T = {seqs * t}")
    if not isinstance(mask, torch.Tensor) or mask.shape != tokens.shape:
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"{op}: expected mask of tokens' shape {tuple(tokens.shape)}, got {shape}")
    if mask.dtype.is_floating_point or mask.dtype.is_complex:
        raise TypeError(f"{op}: mask must be bool or integer 0/1, got {mask.dtype}")
    if loss not in PREFERENCE_LOSSES:
        raise ValueError(f"{op}: loss must be one of {', '.join(PREFERENCE_LOSSES)}, got {loss!r}")
    if loss == "simpo":
        if ref_logps is not None:
            raise ValueError(f"{op}: loss 'simpo' is reference-free; ref_logps must be None")
    elif not isinstance(ref_logps, torch.Tensor) or ref_logps.shape != (seqs // 2, 2):
        shape = tuple(ref_logps.shape) if isinstance(ref_logps, torch.Tensor) else ref_logps
        raise ValueError(f"{op}: loss {loss!r} needs ref_logps of shape (P={seqs // 2}, 2) [chosen, rejected], "
                         f"got {shape}")
    elif not ref_logps.dtype.is_floating_point:
        raise TypeError(f"{op}: ref_logps must be floating point, got {ref_logps.dtype}")
    beta = _check_number("beta", beta, lambda v: v > 0, "a finite number > 0")
    gamma = _check_number("gamma", gamma, lambda v: True, "a finite number")
    eps = _check_number("label_smoothing", label_smoothing, lambda v: 0 <= v < 0.5, "in [0, 0.5)")
    if loss == "ipo" and eps:
        raise ValueError(f"{op}: label_smoothing applies to the sigmoid and simpo losses, not ipo")
    others = dict(tokens=tokens, mask=mask) | ({} if ref_logps is None else dict(ref_logps=ref_logps))
    check_same_device(op, hidden=hidden, weight=weight, **others)
    _check_int(op, "ignore_index", ignore_index)
    temperature = _check_temperature(op, temperature)
    softcap = _check_softcap(op, "softcap", softcap)
    _check_chunk(op, chunk_size)
    hidden, weight = _autocast(hidden, weight)
    check_same_dtype(op, hidden=hidden, weight=weight)
    vocab = weight.shape[0]
    _check_ids(op, "tokens", tokens.reshape(-1), seqs * t, vocab, ignore_index, validate)
    if validate and not torch.compiler.is_compiling() and ((mask != 0) & (mask != 1)).any():
        raise ValueError(f"{op}: mask must hold only 0 and 1")
    grad_mode = torch.is_grad_enabled()
    need_dh, need_dw = grad_mode and hidden.requires_grad, grad_mode and weight.requires_grad
    chunk = chunk_size if chunk_size is not None else default_pair_chunk(seqs // 2, t, vocab)
    backend = select(op, hidden.device)
    ref = None if ref_logps is None else ref_logps.detach().contiguous()
    loss_sum, pairs, _, _ = torch.ops.fastlm.linear_preference_loss(
        hidden, weight, tokens.contiguous(), mask.contiguous(), ref, loss, beta, gamma, eps, temperature,
        int(ignore_index), max(chunk, 1), softcap, need_dh, need_dw, backend)
    return PreferenceLoss(loss_sum, *pairs.unbind(0))
