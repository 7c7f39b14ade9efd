"""Adapter configurations, validated, and their translation to and from PEFT's adapter_config.json.

:class:`LoraConfig` and :class:`PromptTuningConfig` use PEFT's field names and meanings, so a
config read from a PEFT adapter directory maps one to one. Features of PEFT that fastlm does
not implement (DoRA, LoRA biases, modules_to_save, ...) are refused with an error naming the
field, never silently ignored.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

TASK_TYPE = "CAUSAL_LM"
BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" in a mixed batch
# fastlm's LoRA target names (PEFT's names for Llama); GPT-2 also accepts c_attn, c_proj, c_fc.
LINEAR_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# PEFT LoraConfig fields that change the math and that fastlm does not implement: (field, value that is fine).
_UNSUPPORTED_LORA = (
    ("use_dora", False), ("lora_bias", False), ("bias", "none"), ("modules_to_save", None),
    ("layer_replication", None), ("target_parameters", None), ("trainable_token_indices", None),
    ("use_qalora", False), ("alora_invocation_tokens", None), ("exclude_modules", None), ("layers_pattern", None),
)


def check_adapter_name(name: Any) -> str:
    if not isinstance(name, str) or not name or name == BASE_ADAPTER or "." in name:
        raise ValueError(f"adapter names must be non-empty strings without '.', other than {BASE_ADAPTER!r}; "
                         f"got {name!r}")
    return name


def rows_for_batch(names: list[str], batch: int) -> list[str]:
    """Per-row adapter names set with ``use_adapters`` for a batch of ``batch`` rows: as given, or
    each repeated batch / len(names) times in a row, as beam and contrastive search expand each
    sequence into consecutive rows."""
    if names and batch != len(names) and batch % len(names) == 0:
        return [name for name in names for _ in range(batch // len(names))]
    return names


def _positive_int(owner: str, name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{owner}.{name} must be a positive integer, got {value!r}")
    return value


def pattern_value(patterns: dict[str, Any], names: tuple[str, ...], default: Any) -> Any:
    """PEFT's rank_pattern/alpha_pattern lookup: the first key k with re.match(r"(.*\\.)?(k)$", name)
    for one of the module's names (its Hugging Face name, then its fastlm name)."""
    for key, value in patterns.items():
        if any(re.match(rf"(.*\.)?({key})$", name) for name in names):
            return value
    return default


@dataclass
class LoraConfig:
    """LoRA hyper-parameters (PEFT's names): y = x·Wᵀ + s·(dropout(x)·Aᵀ)·Bᵀ with A (r, in),
    B (out, r) and s = lora_alpha / r (lora_alpha / sqrt(r) with use_rslora).

    target_modules: module names matched as PEFT does (a name equal to, or ending in "." + an
    entry; a string is a regex matched in full), against both the Hugging Face name of a module
    (``model.layers.0.self_attn.q_proj``, ``transformer.h.0.attn.c_attn``) and fastlm's
    (``layers.0.attn.q_proj``); "all-linear" means every projection of every block (not lm_head).
    Every entry of a list must match some module. rank_pattern / alpha_pattern override r /
    lora_alpha for matching modules. layers_to_transform restricts to those block indices.
    init_lora_weights: True is PEFT's init (A Kaiming-uniform, B zero: the adapter starts as a
    no-op); False makes B random too (tests).
    """

    r: int = 8
    lora_alpha: float = 8.0
    lora_dropout: float = 0.0
    target_modules: list[str] | str = field(default_factory=lambda: ["q_proj", "v_proj"])
    use_rslora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    layers_to_transform: list[int] | int | None = None
    init_lora_weights: bool = True
    base_model_name_or_path: str | None = None

    def __post_init__(self) -> None:
        _positive_int("LoraConfig", "r", self.r)
        alpha = self.lora_alpha
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
            raise ValueError(f"LoraConfig.lora_alpha must be a number > 0, got {self.lora_alpha!r}")
        if not (isinstance(self.lora_dropout, (int, float)) and 0.0 <= self.lora_dropout < 1.0):
            raise ValueError(f"LoraConfig.lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if isinstance(self.target_modules, (tuple, set)):
            self.target_modules = sorted(self.target_modules) if isinstance(self.target_modules, set) \
                else list(self.target_modules)
        if isinstance(self.target_modules, str):
            try:
                re.compile(self.target_modules)
            except re.error as err:
                raise ValueError(f"LoraConfig.target_modules: invalid regex {self.target_modules!r} ({err})") from None
        elif not (isinstance(self.target_modules, list) and self.target_modules
                  and all(isinstance(t, str) and t for t in self.target_modules)):
            raise ValueError(f"LoraConfig.target_modules must be a non-empty list of module names or a regex "
                             f"string, got {self.target_modules!r}")
        for key, value in self.rank_pattern.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"LoraConfig.rank_pattern[{key!r}] must be a positive integer (the rank of the "
                                 f"matching modules), got {value!r}")
        for key, value in self.alpha_pattern.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"LoraConfig.alpha_pattern[{key!r}] must be a number > 0, got {value!r}")
        layers = self.layers_to_transform
        if layers is not None:
            items = [layers] if isinstance(layers, int) else layers
            if not (isinstance(items, list) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                                    for i in items)):
                raise ValueError(f"LoraConfig.layers_to_transform must be None, a layer index or a list of them, "
                                 f"got {layers!r}")

    def rank_and_alpha(self, names: tuple[str, ...]) -> tuple[int, float]:
        """(r, lora_alpha) of the module called ``names`` (Hugging Face name, fastlm name)."""
        r = pattern_value(self.rank_pattern, names, self.r)
        return r, pattern_value(self.alpha_pattern, names, self.lora_alpha)

    def scaling(self, r: int, alpha: float) -> float:
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def to_peft(self, **overrides: Any) -> dict[str, Any]:
        """PEFT's adapter_config.json content (``overrides`` replace fields, e.g. the saved targets)."""
        layers = self.layers_to_transform
        out = {
            "peft_type": "LORA", "task_type": TASK_TYPE, "r": self.r, "lora_alpha": _number(self.lora_alpha),
            "lora_dropout": self.lora_dropout, "target_modules": self.target_modules, "use_rslora": self.use_rslora,
            "rank_pattern": dict(self.rank_pattern), "alpha_pattern": dict(self.alpha_pattern),
            "layers_to_transform": layers, "init_lora_weights": self.init_lora_weights, "bias": "none",
            "fan_in_fan_out": False, "use_dora": False, "modules_to_save": None, "inference_mode": True,
            "base_model_name_or_path": self.base_model_name_or_path, "revision": None,
        }
        out.update(overrides)
        return out

    @classmethod
    def from_peft(cls, config: dict[str, Any]) -> LoraConfig:
        """A LoraConfig from adapter_config.json; unsupported PEFT features raise ValueError."""
        if config.get("peft_type") != "LORA":
            raise ValueError(f"expected a LoRA adapter (peft_type 'LORA'), got peft_type {config.get('peft_type')!r}")
        for name, fine in _UNSUPPORTED_LORA:
            value = config.get(name)
            empty = isinstance(value, (list, dict, str)) and len(value) == 0
            if not (value is None or value == fine or empty):
                raise ValueError(f"adapter_config.json: {name}={value!r} is not supported by fastlm's LoRA")
        task = config.get("task_type")
        if task not in (None, TASK_TYPE):
            raise ValueError(f"adapter_config.json: task_type {task!r} is not supported "
                             "(fastlm loads CAUSAL_LM adapters)")
        init = config.get("init_lora_weights", True)
        return cls(
            r=config.get("r", 8), lora_alpha=config.get("lora_alpha", 8), lora_dropout=config.get("lora_dropout", 0.0),
            target_modules=config.get("target_modules") or [], use_rslora=bool(config.get("use_rslora", False)),
            rank_pattern=dict(config.get("rank_pattern") or {}), alpha_pattern=dict(config.get("alpha_pattern") or {}),
            layers_to_transform=config.get("layers_to_transform"), init_lora_weights=init is not False,
            base_model_name_or_path=config.get("base_model_name_or_path"),
        )


PROMPT_INITS = ("random", "sample_vocab", "token_ids")


@dataclass
class PromptTuningConfig:
    """Soft prompt: num_virtual_tokens trainable embeddings prepended to every input.

    init: "random" (normal with the embedding table's std), "sample_vocab" (copies of random
    token embeddings, PEFT's SAMPLE_VOCAB) or "token_ids" (the embeddings of init_token_ids,
    repeated to length: PEFT's TEXT init on already-tokenized text).
    """

    num_virtual_tokens: int = 20
    init: str = "sample_vocab"
    init_token_ids: list[int] | None = None
    base_model_name_or_path: str | None = None

    def __post_init__(self) -> None:
        _positive_int("PromptTuningConfig", "num_virtual_tokens", self.num_virtual_tokens)
        if self.init not in PROMPT_INITS:
            raise ValueError(f"PromptTuningConfig.init must be one of {PROMPT_INITS}, got {self.init!r}")
        if self.init == "token_ids" and not self.init_token_ids:
            raise ValueError("PromptTuningConfig.init='token_ids' needs a non-empty init_token_ids list")

    def to_peft(self, token_dim: int, num_layers: int, num_heads: int) -> dict[str, Any]:
        """adapter_config.json content. The init is saved as RANDOM: the saved embeddings replace it."""
        return {
            "peft_type": "PROMPT_TUNING", "task_type": TASK_TYPE, "num_virtual_tokens": self.num_virtual_tokens,
            "token_dim": token_dim, "num_transformer_submodules": 1, "num_attention_heads": num_heads,
            "num_layers": num_layers, "prompt_tuning_init": "RANDOM", "prompt_tuning_init_text": None,
            "tokenizer_name_or_path": None, "inference_mode": True, "modules_to_save": None,
            "base_model_name_or_path": self.base_model_name_or_path, "revision": None,
        }

    @classmethod
    def from_peft(cls, config: dict[str, Any]) -> PromptTuningConfig:
        if config.get("peft_type") != "PROMPT_TUNING":
            raise ValueError(f"expected a prompt-tuning adapter (peft_type 'PROMPT_TUNING'), "
                             f"got {config.get('peft_type')!r}")
        if config.get("num_transformer_submodules", 1) not in (1, None):
            raise ValueError("adapter_config.json: num_transformer_submodules != 1 (encoder-decoder prompts) "
                             "is not supported")
        return cls(num_virtual_tokens=config.get("num_virtual_tokens", 20), init="random",
                   base_model_name_or_path=config.get("base_model_name_or_path"))


def _number(value: float) -> float | int:
    return int(value) if float(value).is_integer() else float(value)
