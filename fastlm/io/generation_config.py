"""``generation_config.json``: a checkpoint's default decoding settings, read and written the
Hugging Face way, and the rule that merges them with what a ``generate`` caller passes.

A checkpoint's ``generation_config.json`` holds, e.g. for Llama 3.1 Instruct::

    {"bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009],
     "do_sample": true, "temperature": 0.6, "top_p": 0.9}

``fastlm.from_pretrained`` attaches it as ``model.generation_config`` (None when the file is
absent) and ``save_pretrained`` writes it back. ``generate`` then takes, for each of
``do_sample``, ``temperature``, ``top_k``, ``top_p``, ``repetition_penalty``,
``max_new_tokens``, ``eos_token_id`` and ``pad_token_id``: the caller's value when the caller
passes one, else the file's, else the default — ``transformers``' global defaults when the
model has a generation config (notably ``top_k=50`` when sampling), fastlm's otherwise (no top-k filter).
As in ``transformers``, a value passed explicitly wins even when it is None (``eos_token_id=None``
means no eos, ``top_k=None`` no top-k filter), and ``top_k=0`` / ``top_p=1.0`` switch those
filters off; None for ``do_sample``/``temperature``/``repetition_penalty``/``max_new_tokens``
means their default (greedy, 1.0, 1.0, 32).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastlm._files import atomic_write_text

logger = logging.getLogger(__name__)

__all__ = ["GENERATION_CONFIG_FILE", "UNSET", "GenerationConfig", "read_generation_config", "resolve_generation_args",
           "write_generation_config"]

GENERATION_CONFIG_FILE = "generation_config.json"

class _Unset:
    """The default of ``generate``'s settings: "not passed" (None passed means None, as in transformers)."""

    def __repr__(self) -> str:
        return "UNSET"


UNSET: Any = _Unset()

# transformers' GenerationConfig._get_default_generation_params() for the fields fastlm uses.
TRANSFORMERS_DEFAULTS = {"do_sample": False, "temperature": 1.0, "top_k": 50, "top_p": 1.0, "repetition_penalty": 1.0}
FASTLM_DEFAULTS = {"do_sample": False, "temperature": 1.0, "top_k": None, "top_p": None, "repetition_penalty": 1.0,
                   "max_new_tokens": 32}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class GenerationConfig:
    """The decoding defaults of a checkpoint (unset fields are None); ``extra`` keeps every other
    entry of the file so that saving writes it back unchanged."""

    do_sample: bool | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    max_new_tokens: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        def bad(name: str, expected: str) -> ValueError:
            return ValueError(f"GenerationConfig.{name} must be {expected}, got {getattr(self, name)!r}")

        if self.do_sample is not None and not isinstance(self.do_sample, bool):
            raise bad("do_sample", "true or false")
        for name in ("temperature", "repetition_penalty"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
                raise bad(name, "a number >= 0")
        if self.top_p is not None and (isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float))
                                       or not 0 <= self.top_p <= 1):
            raise bad("top_p", "a number in [0, 1]")
        for name in ("top_k", "max_new_tokens", "bos_token_id", "pad_token_id"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 0):
                raise bad(name, "an integer >= 0")
        eos = self.eos_token_id
        if eos is not None and not (_is_int(eos) and eos >= 0) and not (
                isinstance(eos, list) and all(_is_int(i) and i >= 0 for i in eos)):
            raise bad("eos_token_id", "an id or a list of ids")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GenerationConfig:
        known = {k: data[k] for k in cls.__dataclass_fields__ if k != "extra" and k in data}
        return cls(**known, extra={k: v for k, v in data.items() if k not in known})

    def to_dict(self) -> dict[str, Any]:
        out = dict(self.extra)
        out.update({k: getattr(self, k) for k in self.__dataclass_fields__
                    if k != "extra" and getattr(self, k) is not None})
        return out


def read_generation_config(directory: str | Path) -> GenerationConfig | None:
    """The ``generation_config.json`` of a checkpoint directory, or None when it has none.

    Raises ValueError naming the file for invalid JSON or an invalid field.
    """
    path = Path(directory) / GENERATION_CONFIG_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object")
    try:
        return GenerationConfig.from_dict(data)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e


def write_generation_config(config: GenerationConfig | None, directory: str | Path) -> None:
    """Write ``config`` as ``directory/generation_config.json`` (nothing when None)."""
    if config is None:
        return
    if not isinstance(config, GenerationConfig):
        raise TypeError(f"model.generation_config must be a fastlm GenerationConfig, got {type(config).__name__}")
    atomic_write_text(Path(directory) / GENERATION_CONFIG_FILE, json.dumps(config.to_dict(), indent=2) + "\n")


def resolve_generation_args(model: Any, **given: Any) -> dict[str, Any]:
    """Fill each argument the caller left :data:`UNSET` from ``model.generation_config``, then the
    defaults (see the module docstring). Returns the same keys."""
    config: GenerationConfig | None = getattr(model, "generation_config", None)
    if config is None:  # an adapter wrapper (fastlm.peft) holds the base model as .model
        config = getattr(getattr(model, "model", None), "generation_config", None)
    defaults = dict(FASTLM_DEFAULTS)
    if config is not None:
        defaults.update(TRANSFORMERS_DEFAULTS)
    out = {}
    sampling = given.get("do_sample", UNSET)
    if sampling is UNSET:
        sampling = getattr(config, "do_sample", None) if config is not None else None
    if not sampling:  # transformers' top_k=50 filters sampling; contrastive search still needs an explicit top_k
        defaults["top_k"] = None
    for name, value in given.items():
        if value is UNSET:
            value = getattr(config, name, None) if config is not None else None
            if value is None:
                value = defaults.get(name)
        elif value is None and name in ("do_sample", "temperature", "repetition_penalty", "max_new_tokens"):
            value = FASTLM_DEFAULTS[name]
        out[name] = value
    if out.get("top_k") == 0:
        out["top_k"] = None
    if out.get("top_p") == 1.0:
        out["top_p"] = None
    return out
