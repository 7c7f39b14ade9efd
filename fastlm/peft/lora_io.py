"""LoRA adapters in PEFT's file format: adapter_config.json + adapter_model.safetensors.

Tensor names are PEFT's: ``base_model.model.<Hugging Face module>.lora_A.weight`` (r, in) and
``...lora_B.weight`` (out, r), e.g. ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``.
GPT-2's fused c_attn (see :mod:`fastlm.peft.names`) is split on load — its lora_A shared by q,
k and v, its lora_B cut into three row blocks — and joined on save, which needs q, k and v to
carry the adapter with one shared lora_A (as adapters created or loaded by fastlm do).
Per-module ranks and alphas are written as PEFT's rank_pattern / alpha_pattern.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fastlm._files import atomic_write, atomic_write_text
from fastlm.config import ModelConfig
from fastlm.peft import names
from fastlm.peft.config import LoraConfig, _number

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight$")

# fastlm module name -> (lora_A (r, in), lora_B (out, r), scaling); modules sharing one lora_A
# (GPT-2's q/k/v) hold the same tensor object.
Entries = dict[str, tuple[torch.Tensor, torch.Tensor, float]]


def read_config(path: str | Path) -> dict:
    path = Path(path)
    file = path / CONFIG_NAME
    if not file.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {path}; expected a PEFT adapter directory")
    with open(file, encoding="utf-8") as f:
        return json.load(f)


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    file = path / WEIGHTS_NAME
    if not file.is_file():
        if (path / "adapter_model.bin").is_file():
            raise ValueError(f"{path} holds adapter_model.bin (pickle); fastlm reads safetensors only. "
                             "Re-save it with PEFT: model.save_pretrained(dir, safe_serialization=True)")
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {path}")
    with safe_open(str(file), framework="pt", device="cpu") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


def read_lora(path: str | Path, model_config: ModelConfig) -> tuple[LoraConfig, Entries]:
    """(config, entries) of the PEFT LoRA adapter in ``path`` for a model with ``model_config``.
    Raises ValueError for unsupported features, unknown modules or missing tensors."""
    config = LoraConfig.from_peft(read_config(path))
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in read_tensors(path).items():
        match = _KEY.match(key)
        if match is None:
            raise ValueError(f"{path}: tensor {key!r} is not a LoRA A/B weight (DoRA magnitudes, embedding "
                             "adapters and modules_to_save are not supported)")
        pairs.setdefault(match["module"], {})[match["which"]] = tensor
    entries: Entries = {}
    for hf_name, pair in sorted(pairs.items()):
        if set(pair) != {"A", "B"}:
            raise ValueError(f"{path}: module {hf_name} has lora_{''.join(pair)} but not both lora_A and lora_B")
        ours = names.fastlm_names(model_config, hf_name)
        if not ours:
            raise ValueError(f"{path}: the adapter targets module {hf_name!r}, which this {model_config.arch} "
                             "model does not have (or fastlm cannot put LoRA on); was it made for another base?")
        lora_a, lora_b = pair["A"], pair["B"]
        if lora_a.dim() != 2 or lora_b.dim() != 2 or lora_b.shape[1] != lora_a.shape[0]:
            raise ValueError(f"{path}: module {hf_name}: lora_A {tuple(lora_a.shape)} and lora_B "
                             f"{tuple(lora_b.shape)} are not (r, in) and (out, r)")
        r = lora_a.shape[0]
        expected_r, alpha = config.rank_and_alpha((hf_name,))
        if r != expected_r:
            raise ValueError(f"{path}: module {hf_name} has rank {r} but adapter_config.json gives it rank "
                             f"{expected_r}")
        if r < 1:
            raise ValueError(f"{path}: module {hf_name} has rank {r}; ranks must be >= 1")
        scaling = config.scaling(r, alpha)
        if len(ours) == 1:
            entries[ours[0]] = (lora_a, lora_b, scaling)
            continue
        if lora_b.shape[0] % len(ours):  # GPT-2 c_attn: B's rows are q's, then k's, then v's
            raise ValueError(f"{path}: module {hf_name}: lora_B has {lora_b.shape[0]} rows, not divisible into "
                             f"{len(ours)} equal blocks for {', '.join(ours)}")
        for name, block in zip(ours, lora_b.chunk(len(ours), dim=0)):
            entries[name] = (lora_a, block, scaling)
    if not entries:
        raise ValueError(f"{path}: the adapter has no LoRA tensors")
    return config, entries


def _alpha(config: LoraConfig, r: int, scaling: float) -> float | int:
    alpha = scaling * (math.sqrt(r) if config.use_rslora else r)
    rounded = round(alpha, 6)
    return _number(rounded) if math.isclose(rounded, alpha, rel_tol=1e-12, abs_tol=1e-12) else alpha


def write_lora(path: str | Path, model_config: ModelConfig, config: LoraConfig, entries: Entries) -> None:
    """Write ``entries`` (fastlm names) as a PEFT adapter directory that PEFT loads on the
    transformers model of ``model_config``. ValueError if GPT-2's q/k/v cannot form one c_attn."""
    by_hf: dict[str, list[str]] = {}
    hf_of = {c.name: c.hf_name for c in names.candidates(model_config)}
    for name in entries:
        by_hf.setdefault(hf_of[name], []).append(name)
    tensors: dict[str, torch.Tensor] = {}
    rank_alpha: dict[str, tuple[int, float]] = {}
    for hf_name, ours in sorted(by_hf.items()):
        expected = names.fastlm_names(model_config, hf_name)
        if len(expected) == 1:
            lora_a, lora_b, scaling = entries[ours[0]]
        else:
            lora_a, lora_b, scaling = _fuse(hf_name, expected, entries)
        tensors[f"{_PREFIX}{hf_name}.lora_A.weight"] = lora_a.detach().cpu().contiguous()
        tensors[f"{_PREFIX}{hf_name}.lora_B.weight"] = lora_b.detach().cpu().contiguous()
        r = lora_a.shape[0]
        rank_alpha[hf_name] = (r, _alpha(config, r, scaling))
    (r, alpha), _ = Counter(rank_alpha.values()).most_common(1)[0]
    rank_pattern = {n: ra[0] for n, ra in rank_alpha.items() if ra[0] != r}
    alpha_pattern = {n: ra[1] for n, ra in rank_alpha.items() if ra[1] != alpha}
    peft = config.to_peft(
        r=r, lora_alpha=alpha, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern, layers_to_transform=None,
        target_modules=names.peft_target_modules(model_config, set(rank_alpha)),
        fan_in_fan_out=model_config.arch == "gpt2",  # GPT-2's Conv1D stores W as (in, out): PEFT's merge needs it
    )
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    atomic_write(path / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    atomic_write_text(path / CONFIG_NAME, json.dumps(peft, indent=2, sort_keys=True) + "\n")


def _fuse(hf_name: str, expected: list[str], entries: Entries) -> tuple[torch.Tensor, torch.Tensor, float]:
    """GPT-2's c_attn from q/k/v: their shared lora_A and their lora_B stacked (q, k, v)."""
    missing = [n for n in expected if n not in entries]
    if missing:
        raise ValueError(f"cannot save as PEFT's {hf_name}: GPT-2 fuses {', '.join(expected)} into one module, "
                         f"but {', '.join(missing)} has no adapter; target q_proj, k_proj and v_proj together "
                         "(or 'c_attn')")
    first_a, _, scaling = entries[expected[0]]
    for name in expected[1:]:
        lora_a, _, s = entries[name]
        if (lora_a is not first_a and not torch.equal(lora_a, first_a)) or s != scaling:
            raise ValueError(f"cannot save as PEFT's {hf_name}: {', '.join(expected)} must share one lora_A and "
                             f"scaling (PEFT's fused c_attn), but {name} differs from {expected[0]}")
    return first_a, torch.cat([entries[n][1] for n in expected], dim=0), scaling
