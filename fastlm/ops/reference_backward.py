"""Plain-PyTorch backward formulas of the differentiable reference ops.

Each ``<op>_backward(grad, *op_args[, *forward_outputs])`` returns the gradients of the op's differentiable
arguments (in the order listed in ``fastlm.ops.registry.SPECS``; None for an absent optional
argument), computed in float32 (float64 for float64 inputs) and cast to each argument's dtype. They serve as the backward of
the ``fastlm::<op>`` custom ops on the reference backend and as the oracle for kernel backwards;
the tests check them against autograd through the forward references.
"""

from __future__ import annotations

import math

import torch

from fastlm.ops import reference
from fastlm.ops.reference import wide


def _sum_to(grad: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Sum a (..., D) gradient over its leading dims to the (D,) shape of a parameter."""
    return grad.reshape(-1, grad.shape[-1]).sum(dim=0).to(like.dtype)


def attention_backward(grad, q, k, v, causal, scale, key_lens, window, softcap, out, lse):
    """FlashAttention-2's backward from the saved output and logsumexp: with raw scores
    r = q·kᵀ·scale and s = r (or s = c·tanh(r / c) with softcap c),
    P = exp(s - lse) on visible keys (0 on rows with lse = -inf), dV = Pᵀ·dO,
    dS = P ∘ (dO·Vᵀ - rowsum(dO ∘ O)), dR = dS ∘ ds/dr with ds/dr = 1 - tanh²(r / c) = 1 - (s / c)²
    (1 without softcap), dQ = dR·K·scale, dK = dRᵀ·Q·scale; GQA gradients summed over the query
    heads of each group."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    b, h, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    group = h // hkv
    visible = reference.attention_mask(tq, tk, causal=causal, key_lens=key_lens, device=q.device, window=window)
    qf, do, of = wide(q), wide(grad), wide(out)
    kf = wide(k).repeat_interleave(group, dim=1)
    vf = wide(v).repeat_interleave(group, dim=1)
    lse = wide(lse)[..., None]
    scores = reference.softcap_scores(torch.matmul(qf, kf.transpose(-1, -2)) * scale, softcap)
    p = torch.exp(scores - torch.where(torch.isinf(lse), torch.zeros_like(lse), lse))
    p = p.masked_fill(~visible | torch.isinf(lse), 0.0)
    dv = torch.matmul(p.transpose(-1, -2), do)
    dp = torch.matmul(do, vf.transpose(-1, -2))
    ds = p * (dp - (do * of).sum(dim=-1, keepdim=True))
    if softcap is not None:
        ds = ds * (1.0 - (scores / softcap).square())
    dq = torch.matmul(ds, kf) * scale
    dk = torch.matmul(ds.transpose(-1, -2), qf) * scale

    def fold(g):  # (B, H, Tk, D) -> (B, Hkv, Tk, D)
        return g.view(b, hkv, group, tk, d).sum(dim=2)

    return dq.to(q.dtype), fold(dk).to(k.dtype), fold(dv).to(v.dtype)


def rms_norm_backward(grad, x, weight, eps):
    """With r = 1/sqrt(mean(x²) + eps), n = x·r, y = w·n:
    dw = Σ dy·n, dx = r·(g - n·mean(g·n)) where g = dy·w."""
    xf, dy = wide(x), wide(grad)
    r = torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    n = xf * r
    g = dy * wide(weight)
    dx = r * (g - n * (g * n).mean(dim=-1, keepdim=True))
    return dx.to(x.dtype), _sum_to(dy * n, weight)


def layer_norm_backward(grad, x, weight, bias, eps):
    """With n = (x - mean)·r, g = dy·w: dx = r·(g - mean(g) - n·mean(g·n)), dw = Σ dy·n, db = Σ dy."""
    xf, dy = wide(x), wide(grad)
    mean = xf.mean(dim=-1, keepdim=True)
    r = torch.rsqrt((xf - mean).pow(2).mean(dim=-1, keepdim=True) + eps)
    n = (xf - mean) * r
    g = dy * wide(weight)
    dx = r * (g - g.mean(dim=-1, keepdim=True) - n * (g * n).mean(dim=-1, keepdim=True))
    return dx.to(x.dtype), _sum_to(dy * n, weight), _sum_to(dy, bias)


def rope_backward(grad, x, positions, theta):
    """y = x·cos + R(x)·sin with R([x1, x2]) = [-x2, x1], so dx = dy·cos + Rᵀ(dy·sin), Rᵀ([a, b]) = [b, -a]."""
    cos, sin = reference.rope_cos_sin(positions, x.shape[-1], theta, x)
    if positions.dim() == 2:
        cos, sin = cos[:, None], sin[:, None]
    dy = wide(grad)
    a, b = (dy * sin).chunk(2, dim=-1)
    return ((dy * cos + torch.cat((b, -a), dim=-1)).to(x.dtype),)


def swiglu_backward(grad, gate, up):
    """y = g·σ(g)·u: dg = dy·u·σ(g)·(1 + g·(1 - σ(g))), du = dy·g·σ(g)."""
    g, u, dy = wide(gate), wide(up), wide(grad)
    s = torch.sigmoid(g)
    return (dy * u * s * (1 + g * (1 - s))).to(gate.dtype), (dy * g * s).to(up.dtype)


def gelu_backward(grad, x):
    """d/dx of 0.5·x·(1 + tanh(c·(x + a·x³))) = 0.5·(1 + t) + 0.5·x·(1 - t²)·c·(1 + 3a·x²)."""
    c, a = math.sqrt(2.0 / math.pi), 0.044715
    xf = wide(x)
    t = torch.tanh(c * (xf + a * xf**3))
    dydx = 0.5 * (1 + t) + 0.5 * xf * (1 - t * t) * c * (1 + 3 * a * xf * xf)
    return ((wide(grad) * dydx).to(x.dtype),)


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


def int8_linear_backward(grad, x, qweight, scales, bias):
    """dx = dy·(qweight·scales)ᵀᵀ = dy·W_dequant, dbias = Σ dy (the int8 weight takes no gradient)."""
    weight = reference.dequantize_int8(qweight, scales)  # per-channel (out,) or group-wise (out, G) scales
    dy = wide(grad)
    dx = (dy @ weight).to(x.dtype)
    dbias = None if bias is None else dy.reshape(-1, dy.shape[-1]).sum(dim=0).to(bias.dtype)
    return dx, dbias


def cross_entropy_backward(grad, logits, targets, ignore_index):
    """dlogits_i = grad · (softmax(logits_i) - onehot(target_i)) / n_valid for valid rows, else 0."""
    valid = targets != ignore_index
    probs = torch.softmax(wide(logits), dim=-1)
    safe = torch.where(valid, targets, torch.zeros_like(targets))
    probs.scatter_add_(-1, safe[:, None], -torch.ones_like(probs[:, :1]))
    dlogits = probs * valid[:, None] * (wide(grad) / valid.sum())
    return (dlogits.to(logits.dtype),)
