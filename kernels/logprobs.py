"""Row kernels of the fused linear log-probabilities and distillation loss (Triton).

The chunk drivers in fastlm/ops/logprobs.py compute a (C, V) logits chunk z = h·Wᵀ with a
matmul and call these on it; one program per row, BLOCK_V vocabulary tiles per pass, math in
float32 (float64 for float64 logits), per-row scalars from device tensors (no host sync).

_logprobs_fwd_rows (read only), with s = z / T and online max m / sums over tiles:
    S = Σ exp(s − m),  A = Σ exp(s − m)·(s − m)     (rescaled by exp(m_old − m_new) per tile,
                                                    A also shifted by (m_old − m_new)·S)
    lse = m + log S,  logp = s[t] − lse,  H = log S − A / S       (0 where t = ignore_index)

_logprobs_bwd_rows (in place, z ← dL/dz) with p = exp(s − lse), g = dL/dlogp, e = dL/dH:
    dz_j = (g·([j = t] − p_j) − e·p_j·(s_j − lse + H)) / T

_distill_rows (in place on the student chunk), s = zs/T, t = zt/T, y the label:
    pass 1: online lse of s, t (and of zs for the cross-entropy), plus
            forward_kl A = Σ e^{t−m_t}(t − s) → D = A/S_t − lse_t + lse_s
            reverse_kl B = Σ e^{s−m_s}(s − t) → D = B/S_s − lse_s + lse_t
    pass 2 (jsd only): log m = logaddexp(log β + log p_t, log(1−β) + log p_s),
            D = Σ β p_t (log p_t − log m) + (1−β) p_s (log p_s − log m), K = Σ p_s (log p_s − log m)
    loss = α·T²·D + (1 − α)·(lse_z − zs[y])
    last pass: zs ← scale·(α·T·dD/ds + (1 − α)(softmax(zs) − onehot(y))), with dD/ds =
            p_s − p_t | p_s (log p_s − log p_t − D) | (1−β) p_s (log p_s − log m − K)
Imports nothing of fastlm.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import cast_rne as _cast

FORWARD_KL, REVERSE_KL, JSD = 0, 1, 2
DIVERGENCE_CODES = {"forward_kl": FORWARD_KL, "reverse_kl": REVERSE_KL, "jsd": JSD}
# Largest vocabulary tile: 8192 × 16 warps compiles without spills on sm_90 for the one-tensor
# log-prob kernels; the distillation kernel keeps two tiles (student and teacher) live: 4096.
# (Module attributes: tests lower them to run several tiles under the interpreter.)
LOGPROBS_MAX_BLOCK = 8192
DISTILL_MAX_BLOCK = 4096


@triton.jit
def _logprobs_fwd_rows(
    Z, TOKENS, LOGP, ENT, LSE,
    stride_row, V, inv_temp, ignore_index,
    BLOCK_V: tl.constexpr, ACC: tl.constexpr, WITH_ENTROPY: tl.constexpr,
):
    """LOGP[row] = s[t] − lse, ENT[row] = H (0 when ignored), LSE[row] = lse(s) (every row)."""
    row = tl.program_id(0).to(tl.int64)
    z_ptr = Z + row * stride_row
    token = tl.load(TOKENS + row)
    offs = tl.arange(0, BLOCK_V)
    m = tl.full((), float("-inf"), dtype=ACC)
    s_sum = tl.zeros((), dtype=ACC)
    a_sum = tl.zeros((), dtype=ACC)
    for start in tl.range(0, V, BLOCK_V):
        mask = start + offs < V
        s = tl.load(z_ptr + start + offs, mask=mask, other=float("-inf")).to(ACC) * inv_temp
        m_new = tl.maximum(m, tl.max(s, axis=0))
        alpha = tl.exp(m - m_new)
        e = tl.exp(s - m_new)
        if WITH_ENTROPY:
            shift = tl.where(s_sum > 0, (m - m_new) * s_sum, 0.0)  # (−inf)·0 on the first tile
            a_sum = alpha * (a_sum + shift) + tl.sum(tl.where(mask, e * (s - m_new), 0.0), axis=0)
        s_sum = s_sum * alpha + tl.sum(e, axis=0)
        m = m_new
    log_s = tl.log(s_sum)
    lse = m + log_s
    tl.store(LSE + row, lse)
    valid = token != ignore_index
    safe = tl.where(valid, token, 0)
    s_t = tl.load(z_ptr + safe).to(ACC) * inv_temp
    tl.store(LOGP + row, tl.where(valid, s_t - lse, 0.0))
    if WITH_ENTROPY:
        tl.store(ENT + row, tl.where(valid, log_s - a_sum / s_sum, 0.0))


@triton.jit
def _logprobs_bwd_rows(
    Z, TOKENS, LSE, ENT, G, E,
    stride_row, V, inv_temp, ignore_index,
    BLOCK_V: tl.constexpr, ACC: tl.constexpr, WITH_ENTROPY: tl.constexpr,
):
    """z ← dL/dz = (g·(onehot(t) − p) − e·p·(log p + H)) / T (zeros where ignored)."""
    row = tl.program_id(0).to(tl.int64)
    z_ptr = Z + row * stride_row
    token = tl.load(TOKENS + row)
    offs = tl.arange(0, BLOCK_V)
    if token == ignore_index:
        zeros = tl.zeros((BLOCK_V,), dtype=Z.dtype.element_ty)
        for start in tl.range(0, V, BLOCK_V):
            tl.store(z_ptr + start + offs, zeros, mask=start + offs < V)
    else:
        lse = tl.load(LSE + row).to(ACC)
        g = tl.load(G + row).to(ACC)
        if WITH_ENTROPY:
            ent = tl.load(ENT + row).to(ACC)
            e = tl.load(E + row).to(ACC)
        for start in tl.range(0, V, BLOCK_V):
            cols = start + offs
            mask = cols < V
            logp = tl.load(z_ptr + cols, mask=mask, other=0.0).to(ACC) * inv_temp - lse
            p = tl.exp(logp)
            ds = g * (tl.where(cols == token, 1.0, 0.0) - p)
            if WITH_ENTROPY:
                ds -= e * p * (logp + ent)
            tl.store(z_ptr + cols, _cast(ds * inv_temp, Z.dtype.element_ty), mask=mask)


@triton.jit
def _distill_rows(
    ZS, ZT, LABELS, LOSS, SCALE,
    stride_s, stride_t, V, temperature, inv_temp, ignore_index, alpha, beta, log_beta, log_1m_beta,
    BLOCK_V: tl.constexpr, ACC: tl.constexpr, DIVERGENCE: tl.constexpr, HAS_LABELS: tl.constexpr,
    WITH_CE: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
):
    """LOSS[row] = α·T²·D + (1 − α)·CE; with COMPUTE_GRAD, zs ← dL/dzs · scale (module docstring)."""
    row = tl.program_id(0).to(tl.int64)
    zs_ptr = ZS + row * stride_s
    zt_ptr = ZT + row * stride_t
    offs = tl.arange(0, BLOCK_V)
    label = ignore_index + 1
    if HAS_LABELS:
        label = tl.load(LABELS + row)
    if label == ignore_index:
        tl.store(LOSS + row, 0.0)
        if COMPUTE_GRAD:
            zeros = tl.zeros((BLOCK_V,), dtype=ZS.dtype.element_ty)
            for start in tl.range(0, V, BLOCK_V):
                tl.store(zs_ptr + start + offs, zeros, mask=start + offs < V)
    else:
        m_s = tl.full((), float("-inf"), dtype=ACC)
        m_t = tl.full((), float("-inf"), dtype=ACC)
        m_z = tl.full((), float("-inf"), dtype=ACC)
        sum_s = tl.zeros((), dtype=ACC)
        sum_t = tl.zeros((), dtype=ACC)
        sum_z = tl.zeros((), dtype=ACC)
        acc_kl = tl.zeros((), dtype=ACC)
        for start in tl.range(0, V, BLOCK_V):
            mask = start + offs < V
            zs = tl.load(zs_ptr + start + offs, mask=mask, other=float("-inf")).to(ACC)
            t = tl.load(zt_ptr + start + offs, mask=mask, other=float("-inf")).to(ACC) * inv_temp
            s = zs * inv_temp
            new_s = tl.maximum(m_s, tl.max(s, axis=0))
            new_t = tl.maximum(m_t, tl.max(t, axis=0))
            e_s = tl.exp(s - new_s)
            e_t = tl.exp(t - new_t)
            if DIVERGENCE == 0:
                acc_kl = acc_kl * tl.exp(m_t - new_t) + tl.sum(tl.where(mask, e_t * (t - s), 0.0), axis=0)
            if DIVERGENCE == 1:
                acc_kl = acc_kl * tl.exp(m_s - new_s) + tl.sum(tl.where(mask, e_s * (s - t), 0.0), axis=0)
            sum_s = sum_s * tl.exp(m_s - new_s) + tl.sum(e_s, axis=0)
            sum_t = sum_t * tl.exp(m_t - new_t) + tl.sum(e_t, axis=0)
            m_s = new_s
            m_t = new_t
            if WITH_CE:
                new_z = tl.maximum(m_z, tl.max(zs, axis=0))
                sum_z = sum_z * tl.exp(m_z - new_z) + tl.sum(tl.exp(zs - new_z), axis=0)
                m_z = new_z
        lse_s = m_s + tl.log(sum_s)
        lse_t = m_t + tl.log(sum_t)
        kl_sm = tl.zeros((), dtype=ACC)
        if DIVERGENCE == 0:
            d = acc_kl / sum_t - lse_t + lse_s
        elif DIVERGENCE == 1:
            d = acc_kl / sum_s - lse_s + lse_t
        else:
            d = tl.zeros((), dtype=ACC)
            for start in tl.range(0, V, BLOCK_V):
                mask = start + offs < V
                ls = tl.load(zs_ptr + start + offs, mask=mask, other=0.0).to(ACC) * inv_temp - lse_s
                lt = tl.load(zt_ptr + start + offs, mask=mask, other=0.0).to(ACC) * inv_temp - lse_t
                a = lt + log_beta
                b = ls + log_1m_beta
                mx = tl.maximum(a, b)
                lm = mx + tl.log(tl.exp(a - mx) + tl.exp(b - mx))
                ps = tl.exp(ls)
                term_s = tl.where(mask, ps * (ls - lm), 0.0)
                d += tl.sum(tl.where(mask, beta * tl.exp(lt) * (lt - lm), 0.0), axis=0) \
                    + (1.0 - beta) * tl.sum(term_s, axis=0)
                kl_sm += tl.sum(term_s, axis=0)
        loss = alpha * temperature * temperature * d
        lse_z = tl.zeros((), dtype=ACC)
        if WITH_CE:
            lse_z = m_z + tl.log(sum_z)
            loss += (1.0 - alpha) * (lse_z - tl.load(zs_ptr + label).to(ACC))
        tl.store(LOSS + row, loss)
        if COMPUTE_GRAD:
            scale = tl.load(SCALE).to(ACC)
            for start in tl.range(0, V, BLOCK_V):
                cols = start + offs
                mask = cols < V
                zs = tl.load(zs_ptr + cols, mask=mask, other=0.0).to(ACC)
                ls = zs * inv_temp - lse_s
                lt = tl.load(zt_ptr + cols, mask=mask, other=0.0).to(ACC) * inv_temp - lse_t
                ps = tl.exp(ls)
                if DIVERGENCE == 0:
                    dd = ps - tl.exp(lt)
                elif DIVERGENCE == 1:
                    dd = ps * (ls - lt - d)
                else:
                    a = lt + log_beta
                    b = ls + log_1m_beta
                    mx = tl.maximum(a, b)
                    lm = mx + tl.log(tl.exp(a - mx) + tl.exp(b - mx))
                    dd = (1.0 - beta) * ps * (ls - lm - kl_sm)
                dz = alpha * temperature * dd
                if WITH_CE:
                    dz += (1.0 - alpha) * (tl.exp(zs - lse_z) - tl.where(cols == label, 1.0, 0.0))
                tl.store(zs_ptr + cols, _cast(dz * scale, ZS.dtype.element_ty), mask=mask)


def _launch_config(vocab: int, max_block: int) -> tuple[int, int]:
    block_v = min(triton.next_power_of_2(vocab), max_block)
    return block_v, 4 if block_v <= 1024 else 8 if block_v <= 4096 else 16


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _check_rows(name: str, z: torch.Tensor) -> None:
    if z.stride(1) != 1:
        raise ValueError(f"{name}: logits must have a unit stride along the vocabulary")


def logprobs_rows(z: torch.Tensor, tokens: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, temperature: float,
                  ignore_index: int) -> None:
    """z (C, V) logits (read only), tokens (C,) int64 -> out (K, C) [logp; entropy if K = 2], lse (C,)."""
    rows, vocab = z.shape
    if rows == 0:
        return
    _check_rows("logprobs_rows", z)
    block_v, warps = _launch_config(vocab, LOGPROBS_MAX_BLOCK)
    ent = out[1] if out.shape[0] == 2 else out[0]
    _logprobs_fwd_rows[(rows,)](
        z, tokens, out[0], ent, lse, z.stride(0), vocab, 1.0 / temperature, ignore_index,
        BLOCK_V=block_v, ACC=_acc(z.dtype), WITH_ENTROPY=out.shape[0] == 2, num_warps=warps,
    )


def logprobs_grad_rows_(z: torch.Tensor, tokens: torch.Tensor, lse: torch.Tensor, entropy: torch.Tensor | None,
                        g: torch.Tensor, e: torch.Tensor | None, temperature: float, ignore_index: int) -> None:
    """In place: z (C, V) ← dL/dz for incoming grads g (C,) of the log-probs and e (C,) of the
    entropies (None: no entropy term)."""
    rows, vocab = z.shape
    if rows == 0:
        return
    _check_rows("logprobs_grad_rows_", z)
    block_v, warps = _launch_config(vocab, LOGPROBS_MAX_BLOCK)
    with_entropy = e is not None
    _logprobs_bwd_rows[(rows,)](
        z, tokens, lse, entropy if with_entropy else lse, g, e if with_entropy else g,
        z.stride(0), vocab, 1.0 / temperature, ignore_index,
        BLOCK_V=block_v, ACC=_acc(z.dtype), WITH_ENTROPY=with_entropy, num_warps=warps,
    )


def distill_rows_(zs: torch.Tensor, zt: torch.Tensor, labels: torch.Tensor | None, loss_rows: torch.Tensor,
                  scale: torch.Tensor, temperature: float, divergence: str, jsd_beta: float, alpha: float,
                  ignore_index: int, compute_grad: bool) -> None:
    """loss_rows (C,) ← per-row distillation loss; with compute_grad, zs (C, V) ← dL/dzs · scale."""
    rows, vocab = zs.shape
    if rows == 0:
        return
    _check_rows("distill_rows_", zs)
    _check_rows("distill_rows_", zt)
    block_v, warps = _launch_config(vocab, DISTILL_MAX_BLOCK)
    has_labels = labels is not None
    beta = min(max(jsd_beta, 1e-300), 1 - 1e-16)
    _distill_rows[(rows,)](
        zs, zt, labels if has_labels else loss_rows, loss_rows, scale,
        zs.stride(0), zt.stride(0), vocab, float(temperature), 1.0 / temperature, ignore_index, float(alpha), float(jsd_beta),
        math.log(beta), math.log1p(-beta),
        BLOCK_V=block_v, ACC=_acc(zs.dtype), DIVERGENCE=DIVERGENCE_CODES[divergence], HAS_LABELS=has_labels,
        WITH_CE=has_labels and alpha < 1, COMPUTE_GRAD=compute_grad, num_warps=warps,
    )
