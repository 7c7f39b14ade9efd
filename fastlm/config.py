"""Model configuration: one validated dataclass for the Llama and GPT-2 families, plus presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

ARCHITECTURES = ("llama", "gpt2")


@dataclass
class ModelConfig:
    """Shape and conventions of a decoder-only transformer.

    ``arch="llama"``: RMSNorm, rotary positions (rope_theta), SwiGLU MLP, GQA, no biases by
    default. ``arch="gpt2"``: LayerNorm, learned positions, GELU (tanh) MLP, biases, tied
    embeddings.
    """

    arch: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int | None = None  # None: same as num_heads (no GQA)
    head_dim: int | None = None  # None: hidden_size // num_heads
    intermediate_size: int | None = None  # None: 4·hidden (gpt2), or Llama's 8/3·hidden rounded to 256
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Llama's q/k/v/o biases (always on for gpt2)
    mlp_bias: bool = False  # Llama's MLP biases (always on for gpt2)
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"ModelConfig.arch must be one of {ARCHITECTURES}, got {self.arch!r}")
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
        if self.arch == "llama" and self.head_dim % 2:
            raise ValueError(f"ModelConfig.head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.arch == "gpt2":
            if self.num_kv_heads != self.num_heads:
                raise ValueError("ModelConfig.num_kv_heads must equal num_heads for arch='gpt2' (no GQA)")
            if self.head_dim * self.num_heads != self.hidden_size:
                raise ValueError("ModelConfig.head_dim · num_heads must equal hidden_size for arch='gpt2'")
        if self.intermediate_size is None:
            if self.arch == "gpt2":
                self.intermediate_size = 4 * self.hidden_size
            else:
                self.intermediate_size = 256 * -(-(8 * self.hidden_size // 3) // 256)
        _check_positive_int("intermediate_size", self.intermediate_size)
        if not (isinstance(self.rope_theta, (int, float)) and self.rope_theta > 0):
            raise ValueError(f"ModelConfig.rope_theta must be > 0, got {self.rope_theta!r}")
        if not (isinstance(self.norm_eps, (int, float)) and 0 < self.norm_eps < 1):
            raise ValueError(f"ModelConfig.norm_eps must be in (0, 1), got {self.norm_eps!r}")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int) and 0 <= value < self.vocab_size):
                raise ValueError(f"ModelConfig.{name} must be None or in [0, {self.vocab_size}), got {value!r}")

    @property
    def num_parameters(self) -> int:
        """Parameter count of the model this config builds (tied embeddings counted once)."""
        h, i, d = self.hidden_size, self.intermediate_size, self.head_dim
        q_out, kv_out = self.num_heads * d, self.num_kv_heads * d
        gpt2 = self.arch == "gpt2"
        attn = h * (q_out + 2 * kv_out) + q_out * h
        mlp = (2 if gpt2 else 3) * h * i
        if gpt2:
            attn += q_out + 2 * kv_out + h
            mlp += i + h
            norms = 2 * 2 * h
        else:
            attn += (q_out + 2 * kv_out + h) if self.attention_bias else 0
            mlp += (2 * i + h) if self.mlp_bias else 0
            norms = 2 * h
        embed = self.vocab_size * h + (self.max_position_embeddings * h if gpt2 else 0)
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        final_norm = 2 * h if gpt2 else h
        return embed + self.num_layers * (attn + mlp + norms) + final_norm + head

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}")


PRESETS: dict[str, dict[str, Any]] = {
    # A few million parameters: for tests and the CPU demo.
    "tiny": dict(
        arch="llama", vocab_size=4096, hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=4,
        intermediate_size=688, max_position_embeddings=512, tie_word_embeddings=True, norm_eps=1e-5,
    ),
    "tiny-gpt2": dict(
        arch="gpt2", vocab_size=4096, hidden_size=256, num_layers=4, num_heads=8,
        max_position_embeddings=512, tie_word_embeddings=True,
    ),
    "gpt2": dict(
        arch="gpt2", vocab_size=50257, hidden_size=768, num_layers=12, num_heads=12,
        max_position_embeddings=1024, tie_word_embeddings=True,
    ),
    "llama-1b": dict(  # Llama-3.2-1B's shape
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
