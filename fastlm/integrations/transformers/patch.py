"""Put fastlm's kernels into one transformers model instance, and take them out again.

:func:`apply` replaces, on the given model only, the ``forward`` of its RMSNorm, attention (for
the rotary embedding), MLP, causal-LM head and PEFT LoRA modules by fastlm versions, stored as
*instance* attributes: the classes are never touched, so other models of the same class in the
process are unaffected, and :func:`remove` deletes the instance attributes and restores the
attention implementation, which gives back transformers' own computation bit for bit.

What each switch replaces (``x`` the input of the module):

- ``rms_norm``: ``*RMSNorm`` modules -> ``fastlm.ops.rms_norm(x, w, eps)``; Gemma's (1 + w)
  norms -> ``rms_norm(x.float(), 1 + w.float(), eps).type_as(x)`` (Gemma multiplies in float32);
- ``rope``: the attention module's rotary step -> ``fastlm.ops.rope(q | k, position_ids, theta)``
  where the model's rotary embedding is plain RoPE (rope_type "default", attention scaling 1:
  checked against the module's ``inv_freq``); scaled RoPE variants keep transformers' rotation;
- ``swiglu``: SiLU-gated MLPs -> ``down(fastlm.ops.swiglu(gate(x), up(x)))``; Gemma's GELU-tanh
  gated MLP -> ``down(fastlm.ops.gelu(gate(x)) · up(x))``;
- ``fused_linear_cross_entropy``: ``forward(labels=...)`` in training mode computes the loss
  with ``fastlm.ops.fused_linear_cross_entropy`` on the last hidden states, never materialising
  the (N, V) logits, and returns ``logits=None`` (as Liger-Kernel does). Not for Gemma 2/3 with
  ``final_logit_softcapping`` (the cap needs the logits): those use ``cross_entropy``;
- ``cross_entropy``: other ``forward(labels=...)`` calls compute the loss on the logits with
  ``fastlm.ops.cross_entropy`` (float32 logits, as transformers' ``ForCausalLMLoss``);
- ``attention``: ``model.set_attn_implementation("fastlm")`` (see :mod:`.attention`);
- PEFT LoRA (always, when the model carries PEFT ``lora.Linear`` layers):
  ``fastlm.ops.lora_linear(x, W, A, B, scaling, bias)`` for a layer with one active plain LoRA
  adapter, dropout 0, an ``nn.Linear`` base and no LoRA bias; merged, disabled, DoRA/variant,
  dropout > 0 or mixed-adapter calls run PEFT's own forward (listed by :func:`patched_summary`).
  Merge/unmerge and saving are PEFT's, unchanged.

Losses follow transformers: shifted labels (or ``shift_labels``), ignore index -100, the mean
over the kept tokens, or the sum divided by ``num_items_in_batch`` when the Trainer passes it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

import fastlm.ops as ops

logger = logging.getLogger(__name__)

__all__ = ["SUPPORTED_ARCHITECTURES", "apply", "remove", "patched", "patched_summary", "is_patched"]

# Causal-LM classes handled, and how their attention calls the attention interface.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3",
}
_GEMMA = ("gemma2", "gemma3")
_STATE = "_fastlm_patch"


@dataclass
class _PatchState:
    """What apply() changed on a model: instance forwards set and the previous attention."""

    modules: list[nn.Module] = field(default_factory=list)
    old_attn: str | None = None
    counts: dict[str, int] = field(default_factory=dict)
    kept: list[str] = field(default_factory=list)  # what stays transformers' and why


def _hf_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _arch(hf: nn.Module) -> str:
    name = type(hf).__name__
    if name not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"fastlm.integrations.transformers.apply: unsupported model class {name}; supported: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)} (or a PEFT model wrapping one)")
    return SUPPORTED_ARCHITECTURES[name]


def _set_forward(state: _PatchState, module: nn.Module, fn, kind: str) -> None:
    if "forward" in module.__dict__:
        raise RuntimeError(
            f"fastlm.integrations.transformers.apply: {type(module).__name__} already has an instance-level "
            f"forward (patched by another tool?); refusing to stack patches")
    module.forward = types.MethodType(fn, module)
    state.modules.append(module)
    state.counts[kind] = state.counts.get(kind, 0) + 1


def _class_forward(module: nn.Module):
    return types.MethodType(type(module).forward, module)


# ------------------------------------------------------------------ norms, MLP


def _rms_norm_forward(self, x):
    return ops.rms_norm(x, self.weight, self.variance_epsilon)


def _gemma_rms_norm_forward(self, x):
    return ops.rms_norm(x.float(), 1.0 + self.weight.float(), self.eps).type_as(x)


def _swiglu_mlp_forward(self, x):
    return self.down_proj(ops.swiglu(self.gate_proj(x), self.up_proj(x)))


def _geglu_mlp_forward(self, x):
    return self.down_proj(ops.gelu(self.gate_proj(x)) * self.up_proj(x))


def _mlp_kind(hf: nn.Module) -> str | None:
    cfg = hf.config
    act = getattr(cfg, "hidden_activation", None) or getattr(cfg, "hidden_act", None)
    if act in ("silu", "swish"):
        return "silu"
    if act in ("gelu_pytorch_tanh", "gelu_new", "gelu_fast"):
        return "gelu_tanh"
    return None


# ------------------------------------------------------------------ rotary embedding


def _plain_rope_theta(inv_freq: torch.Tensor, head_dim: int) -> float | None:
    """theta if ``inv_freq`` is plain RoPE's theta^(-2i/D) for D = head_dim (to the rounding of
    the buffer's dtype: ``model.to(bfloat16)`` rounds it), else None."""
    if inv_freq.numel() != head_dim // 2 or inv_freq.numel() < 2:
        return None
    freq = inv_freq.detach().double().cpu()
    theta = float(freq[1]) ** (-head_dim / 2.0)
    expected = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    rtol = max(1e-5, 4 * torch.finfo(inv_freq.dtype).eps)
    return theta if torch.allclose(freq, expected, rtol=rtol, atol=0.0) else None


def _rope_thetas(hf: nn.Module, head_dim: int) -> dict[str | None, float | None]:
    """Plain-RoPE theta per layer type (None key: every layer), None where RoPE is scaled."""
    rotary = hf.model.rotary_emb
    rope_type = getattr(rotary, "rope_type", "default")
    thetas: dict[str | None, float | None] = {}
    for name, buf in rotary.named_buffers(recurse=False):
        if not name.endswith("inv_freq") or "original" in name:
            continue
        layer_type = None if name == "inv_freq" else name[: -len("_inv_freq")]
        kind = rope_type.get(layer_type) if isinstance(rope_type, dict) else rope_type
        scaling = getattr(rotary, f"{layer_type}_attention_scaling" if layer_type else "attention_scaling", 1.0)
        plain = kind == "default" and scaling == 1.0
        thetas[layer_type] = _plain_rope_theta(buf, head_dim) if plain else None
    return thetas


def _rope_positions(position_ids: torch.Tensor, batch: int) -> torch.Tensor:
    return position_ids[0] if position_ids.dim() == 2 and position_ids.shape[0] == 1 and batch != 1 else position_ids


def _make_attention_forward(arch: str, theta: float):
    """The attention module's forward with fastlm's RoPE, otherwise transformers' code path."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
        position_ids = kwargs.get("position_ids")
        if position_ids is None or "past_key_values" in kwargs:
            return _class_forward(self)(hidden_states, position_embeddings, attention_mask, cache=cache, **kwargs)
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        q = self.q_proj(hidden_states).view(hidden_shape)
        k = self.k_proj(hidden_states).view(hidden_shape)
        v = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        if hasattr(self, "q_norm"):  # Qwen3, Gemma 3: per-head RMSNorm over the head dim
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, H, T, D), (B, Hkv, T, D)
        positions = _rope_positions(position_ids, q.shape[0])
        q, k = ops.rope(q, positions, theta=theta), ops.rope(k, positions, theta=theta)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx, kwargs=kwargs)
        eager = sys.modules[type(self).__module__].eager_attention_forward
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager)
        extra = {}
        if arch == "mistral":
            extra["sliding_window"] = getattr(self.config, "sliding_window", None)
        elif arch != "llama":
            extra["sliding_window"] = self.sliding_window
        if arch == "gemma2":
            extra["softcap"] = self.attn_logit_softcapping
        out, weights = attention(
            self, q, k, v, attention_mask, dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling, **extra, **kwargs)
        out = out.reshape(*input_shape, -1).contiguous()
        return self.o_proj(out), weights

    return forward


# ------------------------------------------------------------------ loss


def _shifted_labels(labels: torch.Tensor, kwargs: dict) -> torch.Tensor:
    shift = kwargs.get("shift_labels")
    if shift is not None:
        return shift
    return nn.functional.pad(labels, (0, 1), value=-100)[..., 1:]


def _finish_loss(loss: torch.Tensor, targets: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """mean over kept tokens -> sum / num_items_in_batch when the Trainer passes it."""
    num_items = kwargs.get("num_items_in_batch")
    if num_items is None:
        return loss
    if torch.is_tensor(num_items):
        num_items = num_items.to(loss.device)
    return loss * (targets != -100).sum() / num_items


CPU_LOSS_CHUNK_ELEMENTS = 1 << 24  # logits per fused-loss chunk on CPU (64 MiB in float32)


def _loss_chunk_size(device: torch.device, vocab: int) -> int | None:
    """Rows per fused-loss chunk: the op's default on accelerators (C·V ≈ 2^28, sized for GPU
    throughput); on CPU C·V ≈ 2^24, where a 2^28 chunk would already be the whole (N, V) logits
    of a 2k-token batch at a 32k vocabulary and save no memory."""
    if device.type != "cpu":
        return None
    return max(1, CPU_LOSS_CHUNK_ELEMENTS // max(vocab, 1))


def _make_causal_lm_forward(cls: type, fused: bool, plain_ce: bool):
    from transformers.modeling_outputs import CausalLMOutputWithPast

    # The class's signature is kept (Trainer picks dataset columns and loss kwargs from it)
    @functools.wraps(cls.forward)
    def forward(self, *args, **kwargs):
        labels = kwargs.pop("labels", None)
        original = _class_forward(self)
        if labels is None or args:
            return original(*args, labels=labels, **kwargs) if labels is not None else original(*args, **kwargs)
        softcap = getattr(self.config, "final_logit_softcapping", None)
        keep = kwargs.pop("logits_to_keep", 0)
        if fused and self.training and softcap is None and isinstance(keep, int) and keep == 0:
            model_kwargs = {k: v for k, v in kwargs.items() if k not in ("shift_labels",)}
            outputs = self.model(**model_kwargs)
            hidden = outputs.last_hidden_state  # (B, T, H)
            targets = _shifted_labels(labels, kwargs).to(hidden.device).reshape(-1)
            weight = self.lm_head.weight
            loss = ops.fused_linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), weight, targets,
                                                  chunk_size=_loss_chunk_size(weight.device, weight.shape[0]))
            return CausalLMOutputWithPast(
                loss=_finish_loss(loss, targets, kwargs), logits=None, cache=getattr(outputs, "cache", None),
                hidden_states=outputs.hidden_states, attentions=outputs.attentions)
        if not plain_ce:
            return original(labels=labels, logits_to_keep=keep, **kwargs)
        out = original(logits_to_keep=keep, **kwargs)
        logits = out.logits.float()
        targets = _shifted_labels(labels, kwargs).to(logits.device).reshape(-1)
        out.loss = _finish_loss(ops.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets), targets, kwargs)
        return out

    return forward


# ------------------------------------------------------------------ PEFT LoRA


def _lora_fast_path(self, x: torch.Tensor, args, kwargs) -> tuple | None:
    """(W, A, B, scaling, bias) when this call can run as one fastlm lora_linear, else None."""
    if args or kwargs or self.disable_adapters or self.merged or len(self.active_adapters) != 1:
        return None
    name = self.active_adapters[0]
    if name not in self.lora_A or name in getattr(self, "lora_variant", {}):
        return None
    dropout = self.lora_dropout[name]
    if not (isinstance(dropout, nn.Identity) or (isinstance(dropout, nn.Dropout) and dropout.p == 0)):
        return None
    base = self.base_layer
    if type(base) is not nn.Linear or getattr(self, "fan_in_fan_out", False) or self.lora_B[name].bias is not None:
        return None
    return base.weight, self.lora_A[name].weight, self.lora_B[name].weight, float(self.scaling[name]), base.bias


def _lora_forward(self, x, *args, **kwargs):
    fast = _lora_fast_path(self, x, args, kwargs)
    if fast is None:
        return _class_forward(self)(x, *args, **kwargs)
    weight, a, b, scaling, bias = fast
    tensors = [x, weight, a, b] + ([bias] if bias is not None else [])
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
    else:
        dtype = x.dtype
        if any(t.dtype != dtype for t in tensors):  # e.g. float32 adapters on a bfloat16 base: PEFT's casts
            return _class_forward(self)(x, *args, **kwargs)
    x, weight, a, b = (t.to(dtype) for t in (x, weight, a, b))
    bias = None if bias is None else bias.to(dtype)
    return ops.lora_linear(x, weight, a, b, scaling, bias)


# ------------------------------------------------------------------ public


def apply(
    model: nn.Module,
    *,
    rms_norm: bool = True,
    rope: bool = True,
    swiglu: bool = True,
    cross_entropy: bool = True,
    fused_linear_cross_entropy: bool = True,
    attention: bool = True,
) -> nn.Module:
    """Run ``model`` (a supported transformers causal LM, or a PEFT model around one) through
    fastlm's kernels; see the module docstring. Patches this instance only; returns ``model``.
    Raises ValueError for an unsupported class and RuntimeError if ``model`` is already patched."""
    hf = _hf_model(model)
    arch = _arch(hf)
    if hasattr(hf, _STATE):
        raise RuntimeError("fastlm.integrations.transformers.apply: the model is already patched; call remove() first")
    state = _PatchState()
    setattr(hf, _STATE, state)
    try:
        _apply(hf, arch, state, rms_norm, rope, swiglu, cross_entropy, fused_linear_cross_entropy, attention)
    except Exception:
        remove(model)
        raise
    logger.info("fastlm patched %s: %s; kept: %s", type(hf).__name__, state.counts, state.kept or "nothing")
    return model


def _apply(hf, arch, state, rms_norm, rope, swiglu, cross_entropy, fused, attention) -> None:
    from fastlm.integrations.transformers.attention import register

    for module in hf.modules():
        cls = type(module).__name__
        if rms_norm and cls.endswith("RMSNorm"):
            if arch in _GEMMA:
                _set_forward(state, module, _gemma_rms_norm_forward, "rms_norm")
            elif hasattr(module, "variance_epsilon"):
                _set_forward(state, module, _rms_norm_forward, "rms_norm")
    if swiglu:
        kind = _mlp_kind(hf)
        fn = {"silu": _swiglu_mlp_forward, "gelu_tanh": _geglu_mlp_forward}.get(kind)
        if fn is None:
            state.kept.append(f"MLP activation {getattr(hf.config, 'hidden_act', None)!r} (no fastlm op)")
        else:
            for layer in hf.model.layers:
                _set_forward(state, layer.mlp, fn, "swiglu" if kind == "silu" else "geglu")
    if rope:
        _patch_rope(hf, arch, state)
    if (cross_entropy or fused) and "forward" in hf.__dict__:
        # e.g. TRL's trainers put their own fused LM head there (model(..., fused_lm_head=True)):
        # keep it, it computes the training loss without the logits itself
        state.kept.append(f"loss: the model already has an instance-level forward ({hf.forward.__qualname__})")
    elif cross_entropy or fused:
        _set_forward(state, hf, _make_causal_lm_forward(type(hf), fused, cross_entropy), "loss")
    if fused and getattr(hf.config, "final_logit_softcapping", None) is not None:
        state.kept.append("fused linear cross-entropy (final_logit_softcapping needs the logits)")
    lora = _lora_layers(hf)
    for module in lora:
        _set_forward(state, module, _lora_forward, "lora_linear")
    if attention:
        register()
        state.old_attn = hf.config._attn_implementation
        hf.set_attn_implementation("fastlm")


def _patch_rope(hf, arch, state) -> None:
    layers = hf.model.layers
    head_dim = layers[0].self_attn.head_dim
    thetas = _rope_thetas(hf, head_dim)
    layer_types = getattr(hf.config, "layer_types", None)
    for i, layer in enumerate(layers):
        key = layer_types[i] if (layer_types and None not in thetas) else None
        theta = thetas.get(key)
        if theta is None:
            state.kept.append(f"RoPE of layer {i} (scaled or non-default rotary embedding)")
            continue
        _set_forward(state, layer.self_attn, _make_attention_forward(arch, theta), "rope")


def _lora_layers(hf: nn.Module) -> list[nn.Module]:
    if "peft" not in sys.modules:
        return []
    from peft.tuners.lora import Linear as LoraLinear

    return [m for m in hf.modules() if type(m) is LoraLinear]


def remove(model: nn.Module) -> nn.Module:
    """Undo :func:`apply` on ``model``: transformers' (and PEFT's) forwards and the previous
    attention implementation come back, with bit-identical outputs. Returns ``model``."""
    hf = _hf_model(model)
    state = hf.__dict__.get(_STATE)
    if state is None:
        raise RuntimeError("fastlm.integrations.transformers.remove: the model is not patched by fastlm")
    for module in state.modules:
        module.__dict__.pop("forward", None)
    if state.old_attn is not None:
        hf.set_attn_implementation(state.old_attn)
    delattr(hf, _STATE)
    return model


def is_patched(model: nn.Module) -> bool:
    return _STATE in _hf_model(model).__dict__


def patched_summary(model: nn.Module) -> dict:
    """{"patched": {kind: count}, "kept": [what stays transformers' and why], "attention": name}."""
    hf = _hf_model(model)
    state = hf.__dict__.get(_STATE)
    if state is None:
        raise RuntimeError("fastlm.integrations.transformers.patched_summary: the model is not patched")
    return {"patched": dict(state.counts), "kept": list(state.kept), "attention": hf.config._attn_implementation}


@contextlib.contextmanager
def patched(model: nn.Module, **switches) -> Iterator[nn.Module]:
    """``with patched(model): ...`` = apply(model, **switches) on entry, remove(model) on exit."""
    apply(model, **switches)
    try:
        yield model
    finally:
        remove(model)
