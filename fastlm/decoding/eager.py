"""The eager decode step of a plain pre-norm decoder, lean: :class:`EagerStep`.

On the CPU an eager decode step of a small model is host overhead around its GEMVs: every aten
call costs ~1-3 µs whatever its size, an op taking a Python float wraps it in a tensor first
(+1.5 µs), and each nn.Module call and ``fastlm.ops`` dispatch adds Python. The model's
general forward through the cache pays all of that per layer and per step (~258 aten calls a
step for a 4-layer Llama). This step computes the same thing — bit for bit the model's forward
of one token per sequence through a static :class:`fastlm.KVCache` (tests/model/test_eager_step.py)
— with what is constant over a decode loop prepared once, in ~150 aten calls:

- hidden states are (B, hidden), not (B, 1, hidden): a linear is one ``mm`` (``addmm`` with a
  bias) on the transposed weight view taken once per loop — the very call ``F.linear`` makes —
  instead of linear → matmul → t → mm → view; a linear replaced by a wrapper (LoRA,
  quantization) is called as a module;
- RMSNorm is its reference formula written out, x·rsqrt(Σx²/D + eps)·w, with D and eps as
  0-dim tensors (the same float32 arithmetic as ``F.rms_norm``'s mean and eps);
- RoPE: cos and sin once per step and base, the rotate-half as ``x·cos + roll(x, D/2)·s`` with
  s = sin with its first half negated (each product is the same IEEE product: (−a)·b = a·(−b));
  q and k, adjacent in the fused projection, rotate as one tensor;
- the k/v write is the reference's scatter, its index a view of ``cache.lens`` made once
  (lens advances in place, so the index follows it); attention is the reference's SDPA over
  the cache's first ``filled + 1`` positions, masked only where lengths differ or a sliding
  window bites.

The step is taken where it is exact: a plain ``Model`` in float32 with pre-norm RMSNorm, plain
RoPE over whole heads, q/k norms per head or none (Qwen3, or Llama, Mistral, Qwen2, Phi-3), no
attention soft-cap, a gated SiLU MLP and no learned positions, and where the ops it writes out
(rms_norm, swiglu, rope_append_kv, decode_attention) would run their references
(:func:`reason_not_lean`); anything else decodes through :class:`fastlm.decoding.step.DecodeStep`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fastlm.cache import KVCache, step_mask
from fastlm.decoding.common import hits_eos
from fastlm.model import Embedding, Model
from fastlm.ops.backend import select
from fastlm.ops.rotary import rope_cos_sin

_WRITTEN_OUT = ("rms_norm", "swiglu", "rope_append_kv", "decode_attention")


def reason_not_lean(model, cache) -> str | None:
    """Why :class:`EagerStep` cannot run ``model`` over ``cache`` (None: it can)."""
    if not isinstance(model, Model):
        return f"not a plain fastlm.Model ({type(model).__name__})"
    if not isinstance(cache, KVCache):
        return f"not a static KVCache ({type(cache).__name__})"
    c = model.config
    if model.dtype != torch.float32 or cache.k.dtype != torch.float32:
        return f"dtype {model.dtype} (the lean step is float32)"
    if c.norm != "rms" or c.norm_placement != "pre":
        return f"norm {c.norm!r} placed {c.norm_placement!r} (needs pre-norm RMSNorm)"
    if c.qk_norm not in ("none", "head") or c.attn_softcap is not None or model.pos_embed is not None:
        return "q/k norm over the whole projection, attention soft-cap or learned positions"
    if type(model.embed) is not Embedding:  # its output is a fresh tensor, added to in place
        return f"a replaced embedding ({type(model.embed).__name__})"
    if c.mlp != "gated" or c.activation != "silu":
        return f"{c.mlp} MLP with {c.activation} (needs gated SiLU)"
    if any(layer.attn.rotary is None or layer.attn.rotary.fused_theta is None for layer in model.layers):
        return "scaled, partial or no RoPE"
    device = cache.k.device
    for op in _WRITTEN_OUT:
        if select(op, device) != "reference":
            return f"ops.{op} runs its {select(op, device)} kernel on {device.type}"
    return None


def _linear(module: nn.Module, packed: dict):
    """h (B, in) -> (B, out): the module's packed call where ``packed`` has one
    (:func:`fastlm.decoding.packed.packed_linears`), else for a plain nn.Linear the call F.linear
    makes on 2-D input (mm / addmm on the weight's transposed view, taken once); any other
    module is called."""
    if module in packed:
        return packed[module]
    if type(module) is not nn.Linear:
        return module
    wt, bias = module.weight.t(), module.bias
    if bias is None:
        return lambda h: torch.mm(h, wt)
    return lambda h: torch.addmm(bias, h, wt)


class EagerStep:
    """``step(tokens)`` -> float32 logits (B, V); ``step.greedy(tokens, finished, eos, pad)``
    -> (next tokens, finished, best scores). One decode step of ``model`` over ``cache``, which
    must hold each sequence's prompt; cache.lens advances by one and cache.filled with it.
    Build it once per decode loop (it keeps views of the weights and of cache.lens); check
    :func:`reason_not_lean` first. ``linears``: calls to use for some of the model's linears
    ({module: h -> out}, e.g. prepacked weights from :func:`fastlm.decoding.packed.packed_linears`);
    without them every step is bit for bit the model's forward."""

    def __init__(self, model: Model, cache: KVCache, linears: dict | None = None) -> None:
        why = reason_not_lean(model, cache)
        if why is not None:
            raise ValueError(f"EagerStep: cannot run this model: {why}")
        c = model.config
        self.cache = cache
        packed = {} if linears is None else linears
        self.h, self.hkv, self.d = c.num_heads, c.num_kv_heads, c.head_dim
        self.qk_rows = self.h + self.hkv
        device = cache.k.device
        # 0-dim operands: an op taking a Python number wraps it in a tensor on every call
        self.eps = torch.tensor(c.norm_eps, dtype=torch.float32, device=device)
        self.width = torch.tensor(float(c.hidden_size), dtype=torch.float32, device=device)
        self.head_width = torch.tensor(float(c.head_dim), dtype=torch.float32, device=device)
        self.one = torch.ones((), dtype=cache.lens.dtype, device=device)
        half = c.head_dim // 2  # the rotate-half sign: [-1] * D/2 + [1] * D/2
        self.sign = torch.cat((torch.full((half,), -1.0), torch.ones(half))).to(device)
        self.embed = model.embed if model.embed.scale is not None else (lambda ids, w=model.embed.weight:
                                                                         F.embedding(ids, w))
        self.layers = []
        for i, block in enumerate(model.layers):
            a = block.attn
            qk_norm = None  # per-head RMSNorm of q and k (Qwen3): their weights stacked (H + Hkv, 1, D)
            if c.qk_norm == "head":
                qk_norm = torch.cat((a.q_norm.weight.expand(self.h, -1), a.k_norm.weight.expand(self.hkv, -1)))[:, None]
            self.layers.append((
                block.attn_norm.weight, _linear(a.qkv_proj, packed), qk_norm, a.rotary.fused_theta,
                cache.k[i], cache.v[i], a.options.get("scale", 1.0 / math.sqrt(c.head_dim)),
                a.options.get("window"), _linear(a.o_proj, packed),
                block.mlp_norm.weight, _linear(block.mlp.gate_up_proj, packed), block.mlp.intermediate_size,
                _linear(block.mlp.down_proj, packed),
            ))
        self.final_norm = model.final_norm.weight
        self.head = _linear(model.lm_head, packed)
        self.softcap = c.final_softcap
        # views of cache.lens (updated in place): the new tokens' positions and their scatter index
        self.positions = cache.lens[:, None, None]  # (B, 1, 1)
        self.index = self.positions[..., None].expand(-1, self.hkv, -1, self.d)  # (B, Hkv, 1, D)

    def _norm(self, x: torch.Tensor, weight: torch.Tensor, width: torch.Tensor | None = None) -> torch.Tensor:
        """RMSNorm over the last dim (``width`` wide: the hidden size unless given), as
        ops.rms_norm's reference: x·rsqrt(Σx²/width + eps)·w."""
        r = torch.addcdiv(self.eps, (x * x).sum(-1, keepdim=True), self.width if width is None else width)
        return torch.mul(x, r.rsqrt_()).mul_(weight)

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B,) int64 at positions cache.lens -> float32 logits (B, V)."""
        cache = self.cache
        if cache.filled == 0:
            raise RuntimeError("EagerStep: the cache is empty; run the prompt through the model (prefill) first")
        n = cache.filled + 1  # host bound on every length after the step: attention reads [0, n)
        if n > cache.max_len:
            raise ValueError(f"EagerStep: the cache is full ({cache.max_len} positions)")
        b, h, hkv, d, rows = tokens.shape[0], self.h, self.hkv, self.d, self.qk_rows
        rope, masks = {}, {}
        x = self.embed(tokens)  # (B, hidden)
        for (norm1, qkv_proj, qk_norm, theta, k_cache, v_cache, scale, window, o_proj,
             norm2, gate_up_proj, inter, down_proj) in self.layers:
            qk, v = qkv_proj(self._norm(x, norm1)).reshape(b, rows + hkv, 1, d).split((rows, hkv), 1)
            if qk_norm is not None:
                qk = self._norm(qk, qk_norm, self.head_width)
            tables = rope.get(theta)
            if tables is None:  # cos, sin (B, 1, 1, D) of this base at the step's positions
                cos, sin = rope_cos_sin(self.positions, d, theta, qk)
                tables = rope[theta] = (cos, sin * self.sign)
            cos, signed_sin = tables
            rotated = torch.mul(qk, cos).add_(qk.roll(d // 2, -1).mul_(signed_sin))
            q, k = rotated.split((h, hkv), 1)  # (B, H|Hkv, 1, D)
            k_cache.scatter_(2, self.index, k)
            v_cache.scatter_(2, self.index, v)
            if window not in masks:  # (B, 1, 1, n) bool or None
                masks[window] = None if cache.uniform and (window is None or window >= n) else \
                    step_mask(self.positions[:, 0], n, window, cache.uniform)
            o = F.scaled_dot_product_attention(q, k_cache.narrow(2, 0, n), v_cache.narrow(2, 0, n),
                                               attn_mask=masks[window], scale=scale, enable_gqa=h != hkv)
            x = x.add_(o_proj(o.reshape(b, h * d)))  # x: this step's own tensor (the embedding's output)
            gate, up = gate_up_proj(self._norm(x, norm2)).split(inter, -1)
            x = x.add_(down_proj(F.silu(gate).mul_(up)))
        logits = self.head(self._norm(x, self.final_norm))
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        cache.lens.add_(self.one)
        cache.filled = n
        return logits

    def greedy(self, tokens: torch.Tensor, finished: torch.Tensor, eos: torch.Tensor | None,
               pad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Feed ``tokens`` (B,) and pick the next ones: see :func:`pick_greedy`."""
        return pick_greedy(self(tokens), finished, eos, pad)


def pick_greedy(scores: torch.Tensor, finished: torch.Tensor, eos: torch.Tensor | None, pad: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """scores (B, V) -> (tokens (B,): the first argmax, ``pad`` (a 0-dim tensor) where already
    finished; finished (B,) updated with the eos ids ``eos`` (1-D tensor or None); the row
    maxima (B,), NaN or +inf where a score is). Without eos ids no sequence finishes, so the
    tokens are the argmax as they are (finished stays all False)."""
    best, index = scores.max(dim=-1)  # the first maximum; NaN if any score is NaN (as argmax)
    if eos is None:
        return index, finished, best
    tokens = torch.where(finished, pad, index)
    return tokens, finished | hits_eos(tokens, eos), best


def any_bad(bests: list[torch.Tensor]) -> torch.Tensor:
    """(B,) bool: rows whose maximum was NaN or +inf at some step (``bests``: each step's (B,))."""
    return ~(torch.stack(bests) < float("inf")).all(0)
