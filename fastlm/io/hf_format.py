"""Translation between fastlm's and Hugging Face's configs and tensor names.

Supported families: see :data:`fastlm.io.families.ARCH_BY_HF_NAME`. The Llama-like families
(Llama, Mistral, Qwen2/3, Gemma 2/3, Phi-3, OLMo 2) store ``model.layers.{i}.self_attn.*`` and
``model.layers.{i}.mlp.*``; their norms are named by where they sit (input_layernorm,
post_attention_layernorm, pre_/post_feedforward_layernorm). Phi-3 stores q/k/v as one fused
``qkv_proj`` (rows q, k, v) and gate/up as one ``gate_up_proj`` (rows gate, up); they are split
on load and fused on save. GPT-2 stores its projections as Conv1D weights (in, out) and a fused
c_attn; they are transposed and split into fastlm's q/k/v Linear weights (out, in), and back.
Legacy buffers (``rotary_emb.inv_freq``, GPT-2's ``attn.bias``/``attn.masked_bias`` masks) are
not weights and are ignored on load.
"""

from __future__ import annotations

import logging

import torch

from fastlm.config import ModelConfig
from fastlm.io.families import (  # noqa: F401  (re-exported: the public names of this module)
    ARCH_BY_HF_NAME,
    HF_NAME_BY_ARCH,
    arch_of,
    config_from_hf,
    config_to_hf,
)

logger = logging.getLogger(__name__)

_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)
_GPT2_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")
_NORM_NAMES = {  # fastlm block norm -> HF name, by ModelConfig.norm_placement
    "pre": {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"},
    "sandwich": {"attn_norm": "input_layernorm", "post_attn_norm": "post_attention_layernorm",
                 "mlp_norm": "pre_feedforward_layernorm", "post_mlp_norm": "post_feedforward_layernorm"},
    "post": {"post_attn_norm": "post_attention_layernorm", "post_mlp_norm": "post_feedforward_layernorm"},
}
_FUSED = {"attn": ("qkv_proj", ("q_proj", "k_proj", "v_proj")), "mlp": ("gate_up_proj", ("gate_proj", "up_proj"))}


class CheckpointError(ValueError):
    """A checkpoint that does not match the architecture: missing, extra or mis-shaped tensors."""


def _fastlm_names(config: ModelConfig) -> list[str]:
    """The tensor names of a fastlm model with this config (the tied head left out)."""
    from fastlm.model import Model  # the model sits below io; imported here to keep this module light

    with torch.device("meta"):
        names = list(Model(config).state_dict())
    return [n for n in names if not (config.tie_word_embeddings and n == "lm_head.weight")]


def _llama_like_name(config: ModelConfig, name: str) -> str:
    """fastlm name -> Hugging Face name for the Llama-like families."""
    top = {"embed.weight": "model.embed_tokens.weight", "final_norm.weight": "model.norm.weight",
           "lm_head.weight": "lm_head.weight"}
    if name in top:
        return top[name]
    _, i, rest = name.split(".", 2)  # layers.{i}.{rest}
    module, _, tail = rest.partition(".")
    if module == "attn":
        return f"model.layers.{i}.self_attn.{tail}"
    if module == "mlp":
        return f"model.layers.{i}.mlp.{tail}"
    return f"model.layers.{i}.{_NORM_NAMES[config.norm_placement][module]}.{tail}"


def _gpt2_plain_names(config: ModelConfig) -> dict[str, str]:
    """fastlm name -> HF name for GPT-2 tensors stored as they are (no transpose or split)."""
    names = {
        "embed.weight": "transformer.wte.weight",
        "pos_embed.weight": "transformer.wpe.weight",
        "final_norm.weight": "transformer.ln_f.weight",
        "final_norm.bias": "transformer.ln_f.bias",
    }
    if not config.tie_word_embeddings:
        names["lm_head.weight"] = "lm_head.weight"
    for i in range(config.num_layers):
        for ours, theirs in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
            for p in ("weight", "bias"):
                names[f"layers.{i}.{ours}.{p}"] = f"transformer.h.{i}.{theirs}.{p}"
        for ours, theirs in (("mlp.up_proj", "mlp.c_fc"), ("mlp.down_proj", "mlp.c_proj"), ("attn.o_proj", "attn.c_proj")):
            names[f"layers.{i}.{ours}.bias"] = f"transformer.h.{i}.{theirs}.bias"
    return names


def _gpt2_conv_names(config: ModelConfig) -> dict[str, str]:
    """fastlm Linear weight -> HF Conv1D weight (stored transposed)."""
    names = {}
    for i in range(config.num_layers):
        for ours, theirs in (("mlp.up_proj", "mlp.c_fc"), ("mlp.down_proj", "mlp.c_proj"), ("attn.o_proj", "attn.c_proj")):
            names[f"layers.{i}.{ours}.weight"] = f"transformer.h.{i}.{theirs}.weight"
    return names


def _fused_parts(config: ModelConfig, name: str) -> tuple[str, list[str]] | None:
    """Phi-3: (fused HF name, fastlm names of its row blocks in order) when ``name`` is part
    of a fused tensor, else None."""
    if config.arch != "phi3" or not name.startswith("layers."):
        return None
    parts = name.split(".")
    if len(parts) != 5 or parts[2] not in _FUSED or parts[3] not in _FUSED[parts[2]][1] or parts[4] != "weight":
        return None
    i, module = parts[1], parts[2]
    fused, parts = _FUSED[module]
    hf_module = "self_attn" if module == "attn" else "mlp"
    return f"model.layers.{i}.{hf_module}.{fused}.weight", [f"layers.{i}.{module}.{p}.weight" for p in parts]


def _canonical_hf_names(config: ModelConfig, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Add the base-model prefix where a checkpoint omits it (e.g. GPT-2's GPT2Model files) and
    drop buffers that are not weights."""
    prefix = "transformer." if config.arch == "gpt2" else "model."
    ignored = _IGNORED_SUFFIXES + (_GPT2_IGNORED_SUFFIXES if config.arch == "gpt2" else ())
    out = {}
    for name, tensor in tensors.items():
        if name != "lm_head.weight" and not name.startswith(prefix):
            name = prefix + name
        if not name.endswith(ignored):
            out[name] = tensor
    return out


def resolve_tied_head(config: ModelConfig, tensors: dict[str, torch.Tensor]) -> ModelConfig:
    """transformers' rule for a config with tie_word_embeddings whose file also stores an
    lm_head: the same values -> tied; different values -> not tied, the file's head is used
    (with a warning). Returns the config to build (tie_word_embeddings possibly turned off)."""
    if not config.tie_word_embeddings:
        return config
    tensors = _canonical_hf_names(config, tensors)
    head = tensors.get("lm_head.weight")
    embed = tensors.get("transformer.wte.weight" if config.arch == "gpt2" else "model.embed_tokens.weight")
    if head is None or embed is None or (head.shape == embed.shape and torch.equal(head, embed.to(head.dtype))):
        return config
    logger.warning("config.json sets tie_word_embeddings=true but the checkpoint stores an lm_head.weight that "
                   "differs from the embeddings: the head is NOT tied and the stored lm_head is used (as "
                   "transformers does); set tie_word_embeddings=false in config.json to silence this warning")
    return config.replace(tie_word_embeddings=False)


def state_dict_from_hf(config: ModelConfig, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face tensors -> fastlm state dict. Raises CheckpointError naming any missing or
    unexpected tensor. Shapes are checked by the caller against the model (fused Phi-3 and
    GPT-2 tensors here, where they are split)."""
    tensors = _canonical_hf_names(config, tensors)
    if config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)  # tied (resolve_tied_head checked it equals the embedding)
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def take(name: str) -> torch.Tensor:
        if name not in tensors:
            raise CheckpointError(f"checkpoint is missing tensor {name!r}")
        used.add(name)
        return tensors[name]

    if config.arch == "gpt2":
        _gpt2_from_hf(config, take, out)
    else:
        for ours in _fastlm_names(config):
            if ours in out:
                continue
            fused = _fused_parts(config, ours)
            if fused is None:
                out[ours] = take(_llama_like_name(config, ours))
                continue
            hf_name, parts = fused
            weight = take(hf_name)
            sizes = _part_rows(config, parts)
            if weight.dim() != 2 or weight.shape[0] != sum(sizes):
                raise CheckpointError(f"tensor {hf_name!r} has shape {tuple(weight.shape)}, expected "
                                      f"({sum(sizes)}, {config.hidden_size if 'qkv' in hf_name else '...'}) "
                                      "from config.json")
            out.update(zip(parts, weight.split(sizes, dim=0)))
    extra = sorted(set(tensors) - used)
    if extra:
        shown = ", ".join(repr(n) for n in extra[:5]) + (" ..." if len(extra) > 5 else "")
        raise CheckpointError(f"checkpoint has {len(extra)} unexpected tensor(s) for this config: {shown}")
    if config.tie_word_embeddings:
        out["lm_head.weight"] = out["embed.weight"]
    return out


def _part_rows(config: ModelConfig, parts: list[str]) -> list[int]:
    q_out, kv_out = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    if len(parts) == 3:
        return [q_out, kv_out, kv_out]
    return [config.intermediate_size] * 2


def _gpt2_from_hf(config: ModelConfig, take, out: dict[str, torch.Tensor]) -> None:
    for ours, theirs in _gpt2_plain_names(config).items():
        out[ours] = take(theirs)
    for ours, theirs in _gpt2_conv_names(config).items():
        out[ours] = take(theirs).t()
    h = config.hidden_size
    for i in range(config.num_layers):
        weight = take(f"transformer.h.{i}.attn.c_attn.weight")
        bias = take(f"transformer.h.{i}.attn.c_attn.bias")
        if weight.shape != (h, 3 * h) or bias.shape != (3 * h,):
            raise CheckpointError(
                f"tensor 'transformer.h.{i}.attn.c_attn.weight/bias' has shape {tuple(weight.shape)}/"
                f"{tuple(bias.shape)}, expected ({h}, {3 * h})/({3 * h},)"
            )
        for j, proj in enumerate(("q_proj", "k_proj", "v_proj")):
            out[f"layers.{i}.attn.{proj}.weight"] = weight[:, j * h : (j + 1) * h].t()
            out[f"layers.{i}.attn.{proj}.bias"] = bias[j * h : (j + 1) * h]


def state_dict_to_hf(config: ModelConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """fastlm state dict -> Hugging Face tensors (contiguous, tied head omitted)."""
    out: dict[str, torch.Tensor] = {}
    if config.arch == "gpt2":
        for ours, theirs in _gpt2_plain_names(config).items():
            out[theirs] = state[ours]
        for ours, theirs in _gpt2_conv_names(config).items():
            out[theirs] = state[ours].t()
        for i in range(config.num_layers):
            prefix = f"layers.{i}.attn."
            qkv = [state[f"{prefix}{p}.weight"].t() for p in ("q_proj", "k_proj", "v_proj")]
            out[f"transformer.h.{i}.attn.c_attn.weight"] = torch.cat(qkv, dim=1)
            out[f"transformer.h.{i}.attn.c_attn.bias"] = torch.cat(
                [state[f"{prefix}{p}.bias"] for p in ("q_proj", "k_proj", "v_proj")]
            )
    else:
        for ours in _fastlm_names(config):
            fused = _fused_parts(config, ours)
            if fused is None:
                out[_llama_like_name(config, ours)] = state[ours]
            elif fused[0] not in out:
                out[fused[0]] = torch.cat([state[p] for p in fused[1]], dim=0)
    return {name: t.detach().contiguous() for name, t in out.items()}
