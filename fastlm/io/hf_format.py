"""Translation between fastlm's and Hugging Face's configs and tensor names.

Supported families: see :data:`fastlm.io.families.ARCH_BY_HF_NAME`. The Llama-like families
(Llama, Mistral, Qwen2/3, Gemma 2/3, Phi-3, OLMo 2) store ``model.layers.{i}.self_attn.*`` and
``model.layers.{i}.mlp.*``; their norms are named by where they sit (input_layernorm,
post_attention_layernorm, pre_/post_feedforward_layernorm). fastlm fuses q/k/v into one
``attn.qkv_proj`` (rows q, k, v) and gate/up into one ``mlp.gate_up_proj`` (rows gate, up):
Hugging Face's separate q_proj, k_proj, v_proj (gate_proj, up_proj) are concatenated on load
and split on save; Phi-3 stores them fused as fastlm does. GPT-2 stores its projections as
Conv1D weights (in, out), q/k/v fused in c_attn; they are transposed on load and save.
Legacy buffers (``rotary_emb.inv_freq``, GPT-2's ``attn.bias``/``attn.masked_bias`` masks) are
not weights and are ignored on load.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

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
class CheckpointError(ValueError):
    """A checkpoint that does not match the architecture: missing, extra or mis-shaped tensors."""


class _Part(NamedTuple):
    """Rows [start, stop) of a fastlm tensor stored as Hugging Face tensor ``hf_name``, which is
    fastlm's unfused ``name`` (e.g. layers.0.attn.k_proj.weight within attn.qkv_proj.weight)."""

    hf_name: str
    name: str
    start: int
    stop: int


def _layout(config: ModelConfig) -> tuple[dict[str, list[_Part]], dict[str, tuple[int, ...]]]:
    """(fastlm tensor name -> its Hugging Face tensors in row order, fastlm name -> shape), the
    tied head left out. A fused projection (attn.qkv_proj, mlp.gate_up_proj) has one part per
    projection where Hugging Face stores them apart (Llama, Qwen, Gemma, ...), one part where it
    fuses them too (Phi-3's qkv_proj/gate_up_proj, GPT-2's c_attn)."""
    from fastlm.model import Model, packed_modules  # the model sits below io; imported here to keep this module light

    with torch.device("meta"):
        model = Model(config)
    shapes = {n: tuple(t.shape) for n, t in model.state_dict().items()
              if not (config.tie_word_embeddings and n == "lm_head.weight")}
    gpt2 = {**_gpt2_plain_names(config), **_gpt2_conv_names(config)} if config.arch == "gpt2" else {}
    split = {} if config.arch in ("gpt2", "phi3") else packed_modules(model)
    layout = {}
    for name in shapes:
        module, _, param = name.rpartition(".")
        if module in split:
            layout[name] = [_Part(_llama_like_name(config, f"{part}.{param}"), f"{part}.{param}", start, stop)
                            for part, start, stop in split[module]]
        else:
            hf_name = gpt2[name] if gpt2 else _llama_like_name(config, name)
            layout[name] = [_Part(hf_name, name, 0, shapes[name][0] if shapes[name] else 0)]
    return layout, shapes


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


_GPT2_CONV = (("mlp.up_proj", "mlp.c_fc"), ("mlp.down_proj", "mlp.c_proj"), ("attn.o_proj", "attn.c_proj"),
              ("attn.qkv_proj", "attn.c_attn"))


def _gpt2_plain_names(config: ModelConfig) -> dict[str, str]:
    """fastlm name -> HF name for GPT-2 tensors stored as they are (no transpose)."""
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
        for ours, theirs in _GPT2_CONV:
            names[f"layers.{i}.{ours}.bias"] = f"transformer.h.{i}.{theirs}.bias"
    return names


def _gpt2_conv_names(config: ModelConfig) -> dict[str, str]:
    """fastlm Linear weight (out, in) -> HF Conv1D weight, stored transposed (in, out). GPT-2's
    c_attn (hidden, 3·hidden), columns q, k, v, is fastlm's qkv_proj transposed."""
    names = {}
    for i in range(config.num_layers):
        for ours, theirs in _GPT2_CONV:
            names[f"layers.{i}.{ours}.weight"] = f"transformer.h.{i}.{theirs}.weight"
    return names


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
    """Hugging Face tensors -> fastlm state dict: q/k/v (gate/up) concatenated into the fused
    projections where Hugging Face stores them apart, GPT-2's Conv1D weights transposed. Raises
    CheckpointError naming any missing or unexpected tensor, and the unfused fastlm name of a
    mis-shaped part of a fused tensor; the caller checks the other shapes against the model."""
    tensors = _canonical_hf_names(config, tensors)
    if config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)  # tied (resolve_tied_head checked it equals the embedding)
    layout, shapes = _layout(config)
    conv = set(_gpt2_conv_names(config).values()) if config.arch == "gpt2" else set()
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def take(name: str) -> torch.Tensor:
        if name not in tensors:
            raise CheckpointError(f"checkpoint is missing tensor {name!r}")
        used.add(name)
        return tensors[name].t() if name in conv else tensors[name]

    for ours, parts in layout.items():
        if len(parts) == 1:
            out[ours] = take(parts[0].hf_name)
            continue
        blocks = []
        for part in parts:
            block = take(part.hf_name)
            want = (part.stop - part.start, *shapes[ours][1:])
            if tuple(block.shape) != want:
                raise CheckpointError(f"tensor for {part.name!r} has shape {tuple(block.shape)}, expected {want} "
                                      f"from config.json (checkpoint tensor {part.hf_name!r}, rows "
                                      f"{part.start}:{part.stop} of fastlm's {ours!r})")
            blocks.append(block)
        out[ours] = torch.cat(blocks, dim=0)
    extra = sorted(set(tensors) - used)
    if extra:
        shown = ", ".join(repr(n) for n in extra[:5]) + (" ..." if len(extra) > 5 else "")
        raise CheckpointError(f"checkpoint has {len(extra)} unexpected tensor(s) for this config: {shown}")
    if config.tie_word_embeddings:
        out["lm_head.weight"] = out["embed.weight"]
    return out


def hf_parts(config: ModelConfig) -> dict[str, list[tuple[str, int, int]]]:
    """fastlm tensor name -> [(Hugging Face tensor name, first row, end row)] in row order: how
    :func:`state_dict_to_hf` stores it (rows of the fastlm tensor, before GPT-2's transpose)."""
    layout, _ = _layout(config)
    return {name: [(p.hf_name, p.start, p.stop) for p in parts] for name, parts in layout.items()}


def state_dict_to_hf(config: ModelConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """fastlm state dict -> Hugging Face tensors (contiguous, tied head omitted): fused projections
    split into Hugging Face's q/k/v (gate/up) where it stores them apart, GPT-2's Conv1D weights
    transposed. Tensors beyond the model's (e.g. quantization scales) are left out."""
    layout, _ = _layout(config)
    conv = set(_gpt2_conv_names(config).values()) if config.arch == "gpt2" else set()
    out: dict[str, torch.Tensor] = {}
    for ours, parts in layout.items():
        tensor = state[ours]
        for part in parts:
            block = tensor if len(parts) == 1 else tensor[part.start:part.stop]
            out[part.hf_name] = block.t() if part.hf_name in conv else block
    return {name: t.detach().contiguous() for name, t in out.items()}
