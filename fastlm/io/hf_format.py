"""Translation between fastlm's and Hugging Face's configs and tensor names.

Supported: LlamaForCausalLM (model_type "llama") and GPT2LMHeadModel (model_type "gpt2").
GPT-2 stores its projections as Conv1D weights (in, out) and a fused c_attn; they are
transposed and split into fastlm's q/k/v Linear weights (out, in), and back on save.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from fastlm.config import ModelConfig

logger = logging.getLogger(__name__)

ARCH_BY_HF_NAME = {"LlamaForCausalLM": "llama", "GPT2LMHeadModel": "gpt2"}
HF_NAME_BY_ARCH = {arch: name for name, arch in ARCH_BY_HF_NAME.items()}
_GPT2_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")
# Buffers old GPT-2 checkpoints carry (causal masks): not weights, ignored on load.
_GPT2_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")


class CheckpointError(ValueError):
    """A checkpoint that does not match the architecture: missing, extra or mis-shaped tensors."""


def arch_of(hf_config: dict[str, Any]) -> str:
    """fastlm arch of a config.json, from ``architectures`` (or ``model_type``)."""
    names = hf_config.get("architectures") or []
    for name in names:
        if name in ARCH_BY_HF_NAME:
            return ARCH_BY_HF_NAME[name]
    if not names and hf_config.get("model_type") in HF_NAME_BY_ARCH:
        return hf_config["model_type"]
    found = names or hf_config.get("model_type")
    raise ValueError(
        f"unsupported architecture {found!r}; fastlm loads {', '.join(sorted(ARCH_BY_HF_NAME))}"
    )


def _rope_theta(hf: dict[str, Any]) -> float:
    """rope_theta from either transformers 4's top-level keys or 5's ``rope_parameters``."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    for spec in (params, scaling):
        kind = spec.get("rope_type", spec.get("type", "default"))
        if kind != "default":
            raise NotImplementedError(f"rope scaling of type {kind!r} is not supported yet (only the default RoPE)")
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """ModelConfig from a Hugging Face config.json dict."""
    try:
        return _config_from_hf(hf)
    except KeyError as err:
        raise ValueError(f"config.json lacks the required field {err.args[0]!r}") from None


def _config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    arch = arch_of(hf)
    ids = {key: hf.get(key) for key in ("bos_token_id", "eos_token_id", "pad_token_id")}
    ids = {key: (value[0] if isinstance(value, list) and value else value) for key, value in ids.items()}
    for key, value in ids.items():
        if value is not None and not 0 <= value < hf["vocab_size"]:
            logger.warning("config.json %s=%s is outside the vocabulary of %d; ignored", key, value, hf["vocab_size"])
            ids[key] = None
    if arch == "llama":
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise NotImplementedError(f"Llama hidden_act {act!r} is not supported (expected 'silu')")
        return ModelConfig(
            arch="llama",
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=hf["num_attention_heads"],
            num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            head_dim=hf.get("head_dim"),
            intermediate_size=hf["intermediate_size"],
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            rope_theta=_rope_theta(hf),
            norm_eps=hf.get("rms_norm_eps", 1e-6),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=bool(hf.get("attention_bias", False)),
            mlp_bias=bool(hf.get("mlp_bias", False)),
            initializer_range=hf.get("initializer_range", 0.02),
            **ids,
        )
    act = hf.get("activation_function", "gelu_new")
    if act not in _GPT2_ACTIVATIONS:
        raise NotImplementedError(f"GPT-2 activation_function {act!r} is not supported (expected 'gelu_new')")
    if hf.get("scale_attn_by_inverse_layer_idx"):
        raise NotImplementedError("GPT-2 option scale_attn_by_inverse_layer_idx=True is not supported")
    if hf.get("scale_attn_weights", True) is False:
        raise NotImplementedError("GPT-2 option scale_attn_weights=False is not supported")
    return ModelConfig(
        arch="gpt2",
        vocab_size=hf["vocab_size"],
        hidden_size=hf["n_embd"],
        num_layers=hf["n_layer"],
        num_heads=hf["n_head"],
        intermediate_size=hf.get("n_inner") or 4 * hf["n_embd"],
        max_position_embeddings=hf.get("n_positions", 1024),
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
        initializer_range=hf.get("initializer_range", 0.02),
        **ids,
    )


def config_to_hf(config: ModelConfig, dtype: torch.dtype) -> dict[str, Any]:
    """A config.json dict that transformers loads as the same model."""
    common = {
        "architectures": [HF_NAME_BY_ARCH[config.arch]],
        "model_type": config.arch,
        "vocab_size": config.vocab_size,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
        "tie_word_embeddings": config.tie_word_embeddings,
        "initializer_range": config.initializer_range,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    if config.arch == "llama":
        return {
            **common,
            "hidden_size": config.hidden_size,
            "intermediate_size": config.intermediate_size,
            "num_hidden_layers": config.num_layers,
            "num_attention_heads": config.num_heads,
            "num_key_value_heads": config.num_kv_heads,
            "head_dim": config.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": config.max_position_embeddings,
            "rms_norm_eps": config.norm_eps,
            "rope_theta": config.rope_theta,
            "rope_scaling": None,
            "attention_bias": config.attention_bias,
            "mlp_bias": config.mlp_bias,
        }
    return {
        **common,
        "n_embd": config.hidden_size,
        "n_layer": config.num_layers,
        "n_head": config.num_heads,
        "n_inner": config.intermediate_size,
        "n_positions": config.max_position_embeddings,
        "n_ctx": config.max_position_embeddings,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": config.norm_eps,
    }


def _llama_names(config: ModelConfig) -> dict[str, str]:
    """fastlm name -> Hugging Face name, for every Llama tensor."""
    names = {"embed.weight": "model.embed_tokens.weight", "final_norm.weight": "model.norm.weight"}
    if not config.tie_word_embeddings:
        names["lm_head.weight"] = "lm_head.weight"
    for i in range(config.num_layers):
        ours, theirs = f"layers.{i}.", f"model.layers.{i}."
        names[ours + "attn_norm.weight"] = theirs + "input_layernorm.weight"
        names[ours + "mlp_norm.weight"] = theirs + "post_attention_layernorm.weight"
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            names[f"{ours}attn.{proj}.weight"] = f"{theirs}self_attn.{proj}.weight"
            if config.attention_bias:
                names[f"{ours}attn.{proj}.bias"] = f"{theirs}self_attn.{proj}.bias"
        for proj in ("gate_proj", "up_proj", "down_proj"):
            names[f"{ours}mlp.{proj}.weight"] = f"{theirs}mlp.{proj}.weight"
            if config.mlp_bias:
                names[f"{ours}mlp.{proj}.bias"] = f"{theirs}mlp.{proj}.bias"
    return names


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


def _canonical_hf_names(config: ModelConfig, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Add the base-model prefix where a checkpoint omits it (e.g. GPT-2's GPT2Model files)."""
    prefix = "model." if config.arch == "llama" else "transformer."
    out = {}
    for name, tensor in tensors.items():
        if name != "lm_head.weight" and not name.startswith(prefix):
            name = prefix + name
        out[name] = tensor
    return out


def state_dict_from_hf(config: ModelConfig, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face tensors -> fastlm state dict. Raises CheckpointError naming any missing or
    unexpected tensor. Shapes are checked by the caller against the model."""
    tensors = _canonical_hf_names(config, tensors)
    if config.arch == "gpt2":
        tensors = {n: t for n, t in tensors.items() if not n.endswith(_GPT2_IGNORED_SUFFIXES)}
    if config.tie_word_embeddings and "lm_head.weight" in tensors:
        tensors.pop("lm_head.weight")  # tied: the head is the embedding (transformers may save both)
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def take(name: str) -> torch.Tensor:
        if name not in tensors:
            raise CheckpointError(f"checkpoint is missing tensor {name!r}")
        used.add(name)
        return tensors[name]

    if config.arch == "llama":
        for ours, theirs in _llama_names(config).items():
            out[ours] = take(theirs)
    else:
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
    extra = sorted(set(tensors) - used)
    if extra:
        shown = ", ".join(repr(n) for n in extra[:5]) + (" ..." if len(extra) > 5 else "")
        raise CheckpointError(f"checkpoint has {len(extra)} unexpected tensor(s) for this config: {shown}")
    if config.tie_word_embeddings:
        out["lm_head.weight"] = out["embed.weight"]
    return out


def state_dict_to_hf(config: ModelConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """fastlm state dict -> Hugging Face tensors (contiguous, tied head omitted)."""
    out: dict[str, torch.Tensor] = {}
    if config.arch == "llama":
        for ours, theirs in _llama_names(config).items():
            out[theirs] = state[ours]
    else:
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
    return {name: t.detach().contiguous() for name, t in out.items()}
