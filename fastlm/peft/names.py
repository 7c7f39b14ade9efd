"""Which linear layers of a fastlm Model can take LoRA, and their names on the Hugging Face side.

Llama: fastlm ``layers.{i}.attn.{q,k,v,o}_proj`` / ``layers.{i}.mlp.{gate,up,down}_proj`` are
transformers' ``model.layers.{i}.self_attn.*`` / ``model.layers.{i}.mlp.*``.
GPT-2: transformers fuses q, k and v into one Conv1D ``transformer.h.{i}.attn.c_attn`` (out =
3·hidden, in that order); fastlm splits it. A PEFT adapter on c_attn is one lora_A (r, hidden)
shared by q, k and v and one lora_B (3·hidden, r) whose row blocks are q's, k's and v's B.
``attn.c_proj`` is o_proj, ``mlp.c_fc`` is up_proj and ``mlp.c_proj`` is down_proj.
``lm_head`` is ``lm_head`` in both families.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from fastlm.config import ModelConfig
from fastlm.peft.config import LoraConfig

_LLAMA = (("attn", "self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
          ("mlp", "mlp", ("gate_proj", "up_proj", "down_proj")))
_GPT2 = {"attn.q_proj": "attn.c_attn", "attn.k_proj": "attn.c_attn", "attn.v_proj": "attn.c_attn",
         "attn.o_proj": "attn.c_proj", "mlp.up_proj": "mlp.c_fc", "mlp.down_proj": "mlp.c_proj"}
FUSED_QKV = ("attn.q_proj", "attn.k_proj", "attn.v_proj")  # GPT-2's c_attn, in its row order


@dataclass(frozen=True)
class Candidate:
    """A linear layer that can take LoRA: its fastlm name, Hugging Face name and block index."""

    name: str
    hf_name: str
    layer: int | None  # None for lm_head

    @property
    def names(self) -> tuple[str, str]:
        return self.hf_name, self.name


def candidates(config: ModelConfig) -> list[Candidate]:
    """Every LoRA-able linear layer of a model with this config, in module order."""
    if config.arch == "phi3":
        raise NotImplementedError("LoRA on Phi-3 is not supported yet: its checkpoints fuse q/k/v (qkv_proj) and "
                                  "gate/up (gate_up_proj), which PEFT adapters target as one module")
    out = []
    for i in range(config.num_layers):
        if config.arch != "gpt2":  # the Llama-like families share transformers' module names
            for ours, theirs, projs in _LLAMA:
                out += [Candidate(f"layers.{i}.{ours}.{p}", f"model.layers.{i}.{theirs}.{p}", i) for p in projs]
        else:
            out += [Candidate(f"layers.{i}.{ours}", f"transformer.h.{i}.{theirs}", i) for ours, theirs in _GPT2.items()]
    out.append(Candidate("lm_head", "lm_head", None))
    return out


def fastlm_names(config: ModelConfig, hf_name: str) -> list[str]:
    """fastlm module names of a Hugging Face module name (three for GPT-2's c_attn); [] if none."""
    return [c.name for c in candidates(config) if c.hf_name == hf_name]


def _matches(entry: str, cand: Candidate) -> bool:
    return any(n == entry or n.endswith("." + entry) for n in cand.names)


def select(config: ModelConfig, lora: LoraConfig) -> list[Candidate]:
    """The modules LoRA targets under ``lora`` (PEFT's matching); ValueError for a target that
    matches no module of this model, naming it and the names available."""
    cands = candidates(config)
    targets = lora.target_modules
    if targets == "all-linear" or targets == ["all-linear"]:
        chosen = [c for c in cands if c.layer is not None]
    elif isinstance(targets, str):
        chosen = [c for c in cands if any(re.fullmatch(targets, n) for n in c.names)]
        if not chosen:
            raise ValueError(f"LoraConfig.target_modules regex {targets!r} matches no module of this "
                             f"{config.arch} model; module names look like {cands[0].hf_name!r} or {cands[0].name!r}")
    else:
        for entry in targets:
            if not any(_matches(entry, c) for c in cands):
                leaves = sorted({n.rsplit(".", 1)[-1] for c in cands for n in c.names})
                raise ValueError(f"LoraConfig.target_modules: {entry!r} matches no module of this {config.arch} "
                                 f"model; available: {', '.join(leaves)}")
        chosen = [c for c in cands if any(_matches(entry, c) for entry in targets)]
    layers = lora.layers_to_transform
    if layers is not None:
        wanted = {layers} if isinstance(layers, int) else set(layers)
        bad = sorted(i for i in wanted if i >= config.num_layers)
        if bad:
            raise ValueError(f"LoraConfig.layers_to_transform: layer(s) {bad} do not exist (the model has "
                             f"{config.num_layers} blocks)")
        chosen = [c for c in chosen if c.layer in wanted]
    return chosen


def peft_target_modules(config: ModelConfig, hf_names: set[str]) -> list[str]:
    """target_modules for adapter_config.json that make PEFT wrap exactly ``hf_names``: their
    leaf names when those select exactly that set (the usual case), else the full names."""
    leaves = sorted({n.rsplit(".", 1)[-1] for n in hf_names})
    all_hf = {c.hf_name for c in candidates(config)}
    if {n for n in all_hf if any(n == leaf or n.endswith("." + leaf) for leaf in leaves)} == hf_names:
        return leaves
    return sorted(hf_names)
