"""Model configuration: one validated dataclass for every supported family, plus presets.

A family (``arch``) is only a set of defaults for the feature fields below and the tensor
names of its checkpoints; the model itself reads the features, never the family name. Feature
fields left at None take the family's default from :data:`FAMILY_DEFAULTS`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

_LLAMA_LIKE = dict(norm="rms", norm_placement="pre", positions="rope", mlp="gated", activation="silu",
                   qk_norm="none", scale_embeddings=False, attention_bias=False, mlp_bias=False)
_GEMMA = dict(_LLAMA_LIKE, norm="rms_offset", norm_placement="sandwich", activation="gelu_tanh",
              scale_embeddings=True)
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": dict(_LLAMA_LIKE, qk_norm="head"),
    "phi3": _LLAMA_LIKE,
    "olmo2": dict(_LLAMA_LIKE, norm_placement="post", qk_norm="proj"),
    "gemma2": _GEMMA,
    "gemma3": dict(_GEMMA, qk_norm="head"),
    "gpt2": dict(norm="layer", norm_placement="pre", positions="learned", mlp="plain", activation="gelu_tanh",
                 qk_norm="none", scale_embeddings=False, attention_bias=True, mlp_bias=True),
}
ARCHITECTURES = tuple(FAMILY_DEFAULTS)
_CHOICES = {
    "norm": ("rms", "rms_offset", "layer"),
    "norm_placement": ("pre", "sandwich", "post"),
    "positions": ("rope", "learned"),
    "mlp": ("gated", "plain"),
    "activation": ("silu", "gelu_tanh", "gelu", "gelu_fast", "relu"),
    "qk_norm": ("none", "head", "proj"),
}
LAYER_TYPES = ("full_attention", "sliding_attention")
# Keys each rope_scaling type needs beyond rope_type (transformers' modeling_rope_utils).
ROPE_TYPES = {
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor",),
    "yarn": ("factor", "original_max_position_embeddings"),
    "longrope": ("short_factor", "long_factor", "original_max_position_embeddings"),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


@dataclass
class ModelConfig:
    """Shape and conventions of a decoder-only transformer.

    Features (None: the family default):
      norm: "rms" (x/rms·w), "rms_offset" (Gemma: x/rms·(1 + w)) or "layer" (LayerNorm + bias).
      norm_placement: "pre" (x += f(norm(x))), "sandwich" (Gemma 2/3: x += post_norm(f(norm(x))))
        or "post" (OLMo 2: x += post_norm(f(x))).
      positions: "rope" (rotary; rope_theta, rope_scaling, partial_rotary_factor) or "learned".
      mlp: "gated" (down(act(gate(x))·up(x))) or "plain" (down(act(up(x)))); activation: silu,
        gelu_tanh, gelu (erf), gelu_fast, relu.
      qk_norm: "none", "head" (RMSNorm over each head's D: Qwen3, Gemma 3) or "proj" (over the
        whole q/k projection: OLMo 2), before RoPE.
      attention_bias: q/k/v/o biases; qkv_bias: q/k/v biases only (Qwen2); mlp_bias.
      sliding_window W with layer_types (per layer "full_attention"/"sliding_attention"; None:
        every layer slides when W is set): query i sees keys j with i - W < j <= i.
      attn_softcap c: scores s -> c·tanh(s/c); final_softcap: the same on the logits (Gemma 2).
      query_pre_attn_scalar q: scores scaled by q^-0.5 (None: head_dim^-0.5);
      scale_attn_by_inverse_layer_idx (GPT-2): also by 1/(layer + 1).
      scale_embeddings: embeddings times sqrt(hidden_size) (Gemma).
      rope_scaling: transformers' rope_parameters without rope_theta, e.g. {"rope_type":
        "llama3", "factor": 8.0, ...}; None or type "default" is plain RoPE. local_rope_theta:
        the base of the sliding layers when it differs (Gemma 3).
    """

    arch: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int | None = None  # None: same as num_heads (no GQA)
    head_dim: int | None = None  # None: hidden_size // num_heads
    intermediate_size: int | None = None  # None: 4·hidden (plain MLP), or 8/3·hidden rounded to 256 (gated)
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    attention_bias: bool | None = None  # q/k/v/o biases (None: the family's, on for gpt2 only)
    mlp_bias: bool | None = None  # MLP biases (None: the family's, on for gpt2 only)
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    initializer_range: float = 0.02
    # features (None: the family default)
    norm: str | None = None
    norm_placement: str | None = None
    positions: str | None = None
    mlp: str | None = None
    activation: str | None = None
    qk_norm: str | None = None
    scale_embeddings: bool | None = None
    qkv_bias: bool = False
    rope_scaling: dict[str, Any] | None = None
    partial_rotary_factor: float = 1.0
    local_rope_theta: float | None = None
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None
    attn_softcap: float | None = None
    final_softcap: float | None = None
    query_pre_attn_scalar: float | None = None
    scale_attn_by_inverse_layer_idx: bool = False

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"ModelConfig.arch must be one of {ARCHITECTURES}, got {self.arch!r}")
        for name, value in FAMILY_DEFAULTS[self.arch].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        for name, allowed in _CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"ModelConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("tie_word_embeddings", "attention_bias", "mlp_bias", "qkv_bias", "scale_embeddings",
                     "scale_attn_by_inverse_layer_idx"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"ModelConfig.{name} must be True or False, got {getattr(self, name)!r}")
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "max_position_embeddings"):
            _check_positive_int(name, getattr(self, name))
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        _check_positive_int("num_kv_heads", self.num_kv_heads)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"ModelConfig.num_kv_heads ({self.num_kv_heads}) must divide num_heads ({self.num_heads})"
            )
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError(
                    f"ModelConfig.hidden_size ({self.hidden_size}) must be divisible by num_heads "
                    f"({self.num_heads}), or head_dim must be given"
                )
            self.head_dim = self.hidden_size // self.num_heads
        _check_positive_int("head_dim", self.head_dim)
        if self.arch == "gpt2":
            if self.num_kv_heads != self.num_heads:
                raise ValueError("ModelConfig.num_kv_heads must equal num_heads for arch='gpt2' (no GQA)")
            if self.head_dim * self.num_heads != self.hidden_size:
                raise ValueError("ModelConfig.head_dim · num_heads must equal hidden_size for arch='gpt2'")
            for name in ("attention_bias", "mlp_bias"):
                if not getattr(self, name):
                    raise ValueError(f"ModelConfig.{name} must be True for arch='gpt2' (its checkpoints have biases)")
        if self.intermediate_size is None:
            if self.mlp == "plain":
                self.intermediate_size = 4 * self.hidden_size
            else:
                self.intermediate_size = 256 * -(-(8 * self.hidden_size // 3) // 256)
        _check_positive_int("intermediate_size", self.intermediate_size)
        for name in ("rope_theta", "local_rope_theta", "attn_softcap", "final_softcap", "query_pre_attn_scalar"):
            value = getattr(self, name)
            if value is not None and not (_is_number(value) and value > 0):
                raise ValueError(f"ModelConfig.{name} must be > 0{'' if name == 'rope_theta' else ' or None'}, "
                                 f"got {value!r}")
        if not (_is_number(self.norm_eps) and 0 < self.norm_eps < 1):
            raise ValueError(f"ModelConfig.norm_eps must be in (0, 1), got {self.norm_eps!r}")
        if not (_is_number(self.partial_rotary_factor) and 0 < self.partial_rotary_factor <= 1):
            raise ValueError(f"ModelConfig.partial_rotary_factor must be in (0, 1], got {self.partial_rotary_factor!r}")
        if self.positions == "rope" and self.rotary_dim % 2:
            raise ValueError(f"ModelConfig.head_dim must give an even rotary dimension for rotary embeddings, got "
                             f"head_dim={self.head_dim}, partial_rotary_factor={self.partial_rotary_factor}")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int) and 0 <= value < self.vocab_size):
                raise ValueError(f"ModelConfig.{name} must be None or in [0, {self.vocab_size}), got {value!r}")
        if self.sliding_window is not None:
            _check_positive_int("sliding_window", self.sliding_window)
        if self.layer_types is not None:
            self.layer_types = tuple(self.layer_types)
            if len(self.layer_types) != self.num_layers or any(t not in LAYER_TYPES for t in self.layer_types):
                raise ValueError(f"ModelConfig.layer_types must list one of {LAYER_TYPES} for each of the "
                                 f"{self.num_layers} layers, got {self.layer_types!r}")
        self._check_rope_scaling()

    def _check_rope_scaling(self) -> None:
        spec = self.rope_scaling
        if spec is None:
            return
        if not isinstance(spec, dict):
            raise ValueError(f"ModelConfig.rope_scaling must be a dict or None, got {type(spec).__name__}")
        kind = spec.get("rope_type")
        if kind not in ROPE_TYPES:
            raise ValueError(f"ModelConfig.rope_scaling['rope_type'] must be one of {tuple(ROPE_TYPES)}, got {kind!r}")
        missing = [key for key in ROPE_TYPES[kind] if spec.get(key) is None]
        if missing:
            raise ValueError(f"ModelConfig.rope_scaling of type {kind!r} needs {', '.join(missing)}")
        for key in ("factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor",
                    "attention_factor", "beta_fast", "beta_slow"):
            value = spec.get(key)
            if value is not None and not (_is_number(value) and value > 0):
                raise ValueError(f"ModelConfig.rope_scaling['{key}'] must be > 0, got {value!r}")
        if kind == "llama3" and spec["high_freq_factor"] <= spec["low_freq_factor"]:
            raise ValueError("ModelConfig.rope_scaling['high_freq_factor'] must exceed low_freq_factor")
        if kind == "longrope":
            for key in ("short_factor", "long_factor"):
                value = spec[key]
                if not (isinstance(value, (list, tuple)) and len(value) == self.rotary_dim // 2
                        and all(_is_number(v) and v > 0 for v in value)):
                    raise ValueError(f"ModelConfig.rope_scaling['{key}'] must be {self.rotary_dim // 2} positive "
                                     f"numbers (rotary dim / 2), got {value!r}")

    # ---- derived values the model reads ---------------------------------------------------

    @property
    def rotary_dim(self) -> int:
        """Dimensions of each head that RoPE rotates (the first ones; the rest pass through)."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def context_length(self) -> int:
        """Longest sequence the model takes: max_position_embeddings, or the length its RoPE
        scaling extends to (dynamic: factor·max_position_embeddings; yarn, llama3, longrope
        with a factor: factor·original_max_position_embeddings when that is longer)."""
        spec, m = self.rope_scaling or {}, self.max_position_embeddings
        kind, factor = spec.get("rope_type"), spec.get("factor")
        if self.positions != "rope" or not factor:
            return m
        if kind == "dynamic":
            return int(m * factor)
        if kind in ("yarn", "llama3", "longrope"):
            return max(m, int(factor * spec["original_max_position_embeddings"]))
        return m

    def layer_type(self, layer: int) -> str:
        if self.sliding_window is None:
            return "full_attention"
        return "sliding_attention" if self.layer_types is None else self.layer_types[layer]

    def window(self, layer: int) -> int | None:
        """The sliding window of ``layer`` (None: it attends to every earlier token)."""
        return self.sliding_window if self.layer_type(layer) == "sliding_attention" else None

    def attention_scale(self, layer: int) -> float:
        scale = (self.head_dim if self.query_pre_attn_scalar is None else self.query_pre_attn_scalar) ** -0.5
        return scale / (layer + 1) if self.scale_attn_by_inverse_layer_idx else scale

    def rope_theta_of(self, layer: int) -> float:
        if self.local_rope_theta is not None and self.layer_type(layer) == "sliding_attention":
            return self.local_rope_theta
        return self.rope_theta

    def rope_scaling_of(self, layer: int) -> dict[str, Any] | None:
        """Scaling of ``layer``'s RoPE: Gemma 3 scales only its global (full-attention) layers."""
        if self.local_rope_theta is not None and self.layer_type(layer) == "sliding_attention":
            return None
        return self.rope_scaling

    @property
    def num_parameters(self) -> int:
        """Parameter count of the model this config builds (tied embeddings counted once)."""
        h, i, d = self.hidden_size, self.intermediate_size, self.head_dim
        q_out, kv_out = self.num_heads * d, self.num_kv_heads * d
        attn = h * (q_out + 2 * kv_out) + q_out * h
        if self.attention_bias:
            attn += q_out + 2 * kv_out + h
        elif self.qkv_bias:
            attn += q_out + 2 * kv_out
        attn += {"none": 0, "head": 2 * d, "proj": q_out + kv_out}[self.qk_norm]
        mlp = (3 if self.mlp == "gated" else 2) * h * i
        if self.mlp_bias:
            mlp += (2 * i if self.mlp == "gated" else i) + h
        norm = 2 * h if self.norm == "layer" else h
        norms = norm * (4 if self.norm_placement == "sandwich" else 2)
        embed = self.vocab_size * h + (self.max_position_embeddings * h if self.positions == "learned" else 0)
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return embed + self.num_layers * (attn + mlp + norms) + norm + head

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}")


PRESETS: dict[str, dict[str, Any]] = {
    # A few million parameters: for tests and the CPU demo.
    "tiny": dict(
        arch="llama", vocab_size=4096, hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=4,
        intermediate_size=688, max_position_embeddings=512, tie_word_embeddings=True, norm_eps=1e-5,
    ),
    # ~27M parameters, a small Llama: the second model of the CPU decode benchmarks.
    "small": dict(
        arch="llama", vocab_size=8192, hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=4,
        intermediate_size=1376, max_position_embeddings=1024, tie_word_embeddings=True, norm_eps=1e-5,
    ),
    "tiny-gpt2": dict(
        arch="gpt2", vocab_size=4096, hidden_size=256, num_layers=4, num_heads=8,
        max_position_embeddings=512, tie_word_embeddings=True,
    ),
    "gpt2": dict(
        arch="gpt2", vocab_size=50257, hidden_size=768, num_layers=12, num_heads=12,
        max_position_embeddings=1024, tie_word_embeddings=True,
    ),
    "llama-1b": dict(  # Llama-3.2-1B's shape (plain RoPE: its llama3 scaling comes with its config.json)
        arch="llama", vocab_size=128256, hidden_size=2048, num_layers=16, num_heads=32, num_kv_heads=8,
        intermediate_size=8192, max_position_embeddings=8192, rope_theta=500000.0, norm_eps=1e-5,
        tie_word_embeddings=True,
    ),
    "llama-7b": dict(  # Llama-2-7B's shape
        arch="llama", vocab_size=32000, hidden_size=4096, num_layers=32, num_heads=32,
        intermediate_size=11008, max_position_embeddings=4096, norm_eps=1e-5,
    ),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """A named configuration, e.g. ``preset("tiny", vocab_size=1024)``."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; available: {', '.join(sorted(PRESETS))}")
    return ModelConfig(**{**PRESETS[name], **overrides})
