"""Activations of the MLP: ``swiglu`` (Llama's gated SiLU) and ``gelu`` (GPT-2's tanh GELU).

    swiglu(g, u) = silu(g)·u = g·σ(g)·u
    gelu(x)      = 0.5·x·(1 + tanh(sqrt(2/π)·(x + 0.044715·x³)))

Kernels: kernels/swiglu.py (forward and backward), adapted in fastlm/ops/triton/activations.py;
gelu has the reference only.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fastlm.ops.checks import check_floating, check_same_device, check_same_dtype
from fastlm.ops.common import wide
from fastlm.ops.registry import OpSpec, define_op, run

__all__ = ['swiglu', 'gelu']


# ---- references ---------------------------------------------------------------------------------


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """y = silu(gate) · up, silu(g) = g · sigmoid(g)."""
    return F.silu(gate) * up


def gelu_reference(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's tanh approximation: 0.5·x·(1 + tanh(sqrt(2/π)·(x + 0.044715·x³)))."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


# ---- backward formulas --------------------------------------------------------------------------


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


# ---- the reference backend's eager path -----------------------------------------------------------


def gelu_eager(x: torch.Tensor) -> torch.Tensor:
    """What the reference backend runs: :func:`gelu_reference`'s tanh approximation through
    PyTorch's fused ``F.gelu(approximate="tanh")`` (one kernel forward, one backward, instead of
    ~8 and ~15 passes) for float32/float64 x; the reference itself for other dtypes (it computes
    in x's dtype)."""
    if x.dtype in (torch.float32, torch.float64):
        return F.gelu(x, approximate="tanh")
    return gelu_reference(x)


# ---- specs --------------------------------------------------------------------------------------


define_op(OpSpec(
    "swiglu",
    "Tensor gate, Tensor up",
    "Tensor",
    lambda gate, up: torch.empty_like(gate, dtype=torch.promote_types(gate.dtype, up.dtype)),
    differentiable=(0, 1),
    reference_fn=swiglu_reference,
    reference_backward_fn=swiglu_backward,
))
define_op(OpSpec(
    "gelu",
    "Tensor x",
    "Tensor",
    lambda x: torch.empty_like(x),
    differentiable=(0,),
    reference_fn=gelu_reference,
    reference_backward_fn=gelu_backward,
    reference_eager=gelu_eager,
))


# ---- public functions ---------------------------------------------------------------------------


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """y = silu(gate) · up = gate · sigmoid(gate) · up.  gate, up (..., F) -> (..., F)."""
    check_floating("swiglu", gate=gate, up=up)
    check_same_dtype("swiglu", gate=gate, up=up)
    check_same_device("swiglu", gate=gate, up=up)
    if gate.shape != up.shape:
        raise ValueError(f"swiglu: gate and up shapes differ: {tuple(gate.shape)} vs {tuple(up.shape)}")
    return run("swiglu", gate.device, gate, up)


def gelu(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's GELU (tanh approximation): 0.5·x·(1 + tanh(sqrt(2/π)·(x + 0.044715·x³)))."""
    check_floating("gelu", x=x)
    return run("gelu", x.device, x)
