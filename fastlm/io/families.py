"""Model families: a Hugging Face config.json <-> ModelConfig, one small mapping per family.

Fields absent from a config.json take the default of the family's transformers config class
(e.g. Mistral's sliding_window 4096, Gemma 2's soft-caps 50/30, Qwen3's head_dim 128), so a
file means the same model here as in transformers. Every family saves back to a config.json
that transformers (4.x with rope_scaling, or 5.x) loads as the same model.
"""

from __future__ import annotations

import logging
from typing import Any

from fastlm.config import ModelConfig

logger = logging.getLogger(__name__)

# transformers class name -> fastlm family (ModelConfig.arch)
ARCH_BY_HF_NAME = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3",
    "Phi3ForCausalLM": "phi3",
    "Olmo2ForCausalLM": "olmo2",
    "GPT2LMHeadModel": "gpt2",
}
HF_NAME_BY_ARCH = {arch: name for name, arch in ARCH_BY_HF_NAME.items()}
MODEL_TYPE_BY_ARCH = {arch: arch for arch in HF_NAME_BY_ARCH} | {"gemma3": "gemma3_text"}
ARCH_BY_MODEL_TYPE = {t: arch for arch, t in MODEL_TYPE_BY_ARCH.items()}
# Feed-forward activations (transformers' ACT2FN names) -> ModelConfig.activation
ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_new": "gelu_tanh",
               "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_fast", "relu": "relu"}
HF_ACTIVATION = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "gelu_fast": "gelu_fast",
                 "relu": "relu"}
# Behaviour defaults of transformers' config classes, for keys a config.json leaves out.
_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": dict(rms_norm_eps=1e-6, max_position_embeddings=2048, tie_word_embeddings=False, rope_theta=10000.0),
    "mistral": dict(rms_norm_eps=1e-6, max_position_embeddings=131072, tie_word_embeddings=False,
                    rope_theta=10000.0, sliding_window=4096, num_key_value_heads=8),
    "qwen2": dict(rms_norm_eps=1e-6, max_position_embeddings=32768, tie_word_embeddings=False, rope_theta=10000.0,
                  sliding_window=4096, max_window_layers=28, num_key_value_heads=32),
    "qwen3": dict(rms_norm_eps=1e-6, max_position_embeddings=32768, tie_word_embeddings=False, rope_theta=10000.0,
                  sliding_window=4096, max_window_layers=28, num_key_value_heads=32, head_dim=128),
    "gemma2": dict(rms_norm_eps=1e-6, max_position_embeddings=8192, tie_word_embeddings=True, rope_theta=10000.0,
                   sliding_window=4096, num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256,
                   final_logit_softcapping=30.0, attn_logit_softcapping=50.0,
                   hidden_activation="gelu_pytorch_tanh"),
    "gemma3": dict(rms_norm_eps=1e-6, max_position_embeddings=131072, tie_word_embeddings=True,
                   rope_theta=1_000_000.0, rope_local_base_freq=10_000.0, sliding_window=4096,
                   num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256, final_logit_softcapping=None,
                   attn_logit_softcapping=None, hidden_activation="gelu_pytorch_tanh", sliding_window_pattern=6),
    "phi3": dict(rms_norm_eps=1e-5, max_position_embeddings=4096, original_max_position_embeddings=4096,
                 tie_word_embeddings=False, rope_theta=10000.0, sliding_window=None),
    "olmo2": dict(rms_norm_eps=1e-5, max_position_embeddings=2048, tie_word_embeddings=False, rope_theta=10000.0),
}
_MOE_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_intermediate_size")


def arch_of(hf: dict[str, Any]) -> str:
    """fastlm family of a config.json, from ``architectures`` (or ``model_type``)."""
    names = hf.get("architectures") or []
    for name in names:
        if name in ARCH_BY_HF_NAME:
            return ARCH_BY_HF_NAME[name]
    if not names and hf.get("model_type") in ARCH_BY_MODEL_TYPE:
        return ARCH_BY_MODEL_TYPE[hf["model_type"]]
    found = names or hf.get("model_type")
    supported = ", ".join(ARCH_BY_HF_NAME)
    if any(key in hf for key in _MOE_KEYS) or any("moe" in n.lower() or "mixtral" in n.lower() for n in names):
        raise ValueError(f"unsupported architecture {found!r}: mixture-of-experts models are not supported yet; "
                         f"fastlm loads {supported}")
    raise ValueError(f"unsupported architecture {found!r}; fastlm loads {supported}")


def _activation(arch: str, hf: dict[str, Any], key: str, default: str) -> str:
    name = hf.get(key) or default
    if name not in ACTIVATIONS:
        raise NotImplementedError(f"{arch}: {key} {name!r} is not supported (supported: {', '.join(ACTIVATIONS)})")
    return ACTIVATIONS[name]


def _rope(arch: str, hf: dict[str, Any], params: dict[str, Any] | None, theta_default: float,
          top_level: bool = True) -> tuple[float, dict[str, Any] | None, float]:
    """(theta, scaling or None, partial_rotary_factor) from one rope_parameters/rope_scaling
    dict, as transformers' ``standardize_rope_params`` reads it."""
    params = dict(params or {})
    theta = float(params.pop("rope_theta", hf.get("rope_theta", theta_default) if top_level else theta_default))
    partial = params.pop("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0) if top_level else 1.0)
    kind = params.pop("rope_type", params.pop("type", "default"))
    params.pop("type", None)
    if arch == "phi3" and kind in ("su", "yarn"):
        kind = "longrope"  # transformers' Phi3Config renames them
    if kind == "default":
        return theta, None, float(partial)
    from fastlm.config import ROPE_TYPES

    if kind not in ROPE_TYPES:
        raise NotImplementedError(f"rope scaling of type {kind!r} is not supported (supported: "
                                  f"{', '.join(ROPE_TYPES)})")
    if kind in ("llama3", "yarn", "longrope"):
        if "original_max_position_embeddings" in hf or arch == "phi3":  # a top-level value wins (Phi-3)
            params["original_max_position_embeddings"] = hf.get("original_max_position_embeddings",
                                                                _DEFAULTS["phi3"]["original_max_position_embeddings"])
        params.setdefault("original_max_position_embeddings", hf.get("max_position_embeddings"))
    return theta, {"rope_type": kind, **params}, float(partial)


def _layer_types(arch: str, hf: dict[str, Any], num_layers: int, window: int | None) -> tuple[str, ...] | None:
    given = hf.get("layer_types")
    if given is not None:
        return tuple(given)
    if window is None or arch in ("mistral", "phi3"):
        return None  # every layer slides (or none does)
    if arch in ("qwen2", "qwen3"):
        first = hf.get("max_window_layers", _DEFAULTS[arch]["max_window_layers"])
        return tuple("sliding_attention" if i >= first else "full_attention" for i in range(num_layers))
    every = 2 if arch == "gemma2" else hf.get("sliding_window_pattern", _DEFAULTS["gemma3"]["sliding_window_pattern"])
    return tuple("sliding_attention" if (i + 1) % every else "full_attention" for i in range(num_layers))


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """ModelConfig from a Hugging Face config.json dict."""
    try:
        return _config_from_hf(hf)
    except KeyError as err:
        raise ValueError(f"config.json lacks the required field {err.args[0]!r}") from None


def _token_ids(hf: dict[str, Any]) -> dict[str, int | None]:
    ids = {key: hf.get(key) for key in ("bos_token_id", "eos_token_id", "pad_token_id")}
    ids = {key: (value[0] if isinstance(value, list) and value else value) for key, value in ids.items()}
    for key, value in ids.items():
        if value is not None and not 0 <= value < hf["vocab_size"]:
            logger.warning("config.json %s=%s is outside the vocabulary of %d; ignored", key, value, hf["vocab_size"])
            ids[key] = None
    return ids


def _config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    arch = arch_of(hf)
    if arch == "gpt2":
        return _gpt2_from_hf(hf)
    d = _DEFAULTS[arch]

    def get(key):
        return hf.get(key, d.get(key))

    fields: dict[str, Any] = dict(
        arch=arch,
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        num_kv_heads=get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=get("head_dim"),
        intermediate_size=hf["intermediate_size"],
        max_position_embeddings=get("max_position_embeddings"),
        norm_eps=get("rms_norm_eps"),
        tie_word_embeddings=bool(get("tie_word_embeddings")),
        initializer_range=hf.get("initializer_range", 0.02),
        **_token_ids(hf),
    )
    if arch in ("gemma2", "gemma3"):
        fields["activation"] = _activation(arch, hf, "hidden_activation", d["hidden_activation"])
        fields["query_pre_attn_scalar"] = get("query_pre_attn_scalar")
        fields["attn_softcap"] = get("attn_logit_softcapping")
        fields["final_softcap"] = get("final_logit_softcapping")
        if hf.get("use_bidirectional_attention"):
            raise NotImplementedError(f"{arch}: use_bidirectional_attention=True is not supported")
    else:
        fields["activation"] = _activation(arch, hf, "hidden_act", "silu")
    if arch in ("llama", "qwen3", "gemma2", "gemma3", "olmo2"):
        fields["attention_bias"] = bool(hf.get("attention_bias", False))
    if arch == "llama":
        fields["mlp_bias"] = bool(hf.get("mlp_bias", False))
    if arch == "qwen2":
        fields["qkv_bias"] = True
    # sliding window
    window = get("sliding_window")
    if arch in ("qwen2", "qwen3") and not hf.get("use_sliding_window", False):
        window = None
    if arch in ("llama", "olmo2"):
        window = None  # their transformers models have no sliding window
    fields["sliding_window"] = window
    fields["layer_types"] = _layer_types(arch, hf, fields["num_layers"], window)
    # rotary embeddings
    if arch == "gemma3":
        params = hf.get("rope_parameters") or {}
        nested = isinstance(params, dict) and ("full_attention" in params or "sliding_attention" in params)
        full = dict(params.get("full_attention") or {}) if nested else dict(hf.get("rope_scaling") or params or {})
        local = dict(params.get("sliding_attention") or {}) if nested else {}
        local_theta, local_scaling, _ = _rope(arch, hf, local, hf.get("rope_local_base_freq", d["rope_local_base_freq"]),
                                              top_level=False)
        if local_scaling is not None:
            raise NotImplementedError("gemma3: RoPE scaling of the sliding-window layers is not supported")
        fields["local_rope_theta"] = local_theta
        theta, scaling, partial = _rope(arch, hf, full, hf.get("rope_theta", d["rope_theta"]))
    else:
        theta, scaling, partial = _rope(arch, hf, hf.get("rope_scaling") or hf.get("rope_parameters"), d["rope_theta"])
    fields.update(rope_theta=theta, rope_scaling=scaling, partial_rotary_factor=partial)
    return ModelConfig(**fields)


_GPT2_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh", "gelu", "gelu_fast", "relu", "silu")


def _gpt2_from_hf(hf: dict[str, Any]) -> ModelConfig:
    act = hf.get("activation_function", "gelu_new")
    if act not in _GPT2_ACTIVATIONS:
        raise NotImplementedError(f"GPT-2 activation_function {act!r} is not supported (supported: "
                                  f"{', '.join(_GPT2_ACTIVATIONS)})")
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
        activation=ACTIVATIONS[act],
        # scale_attn_weights=False: scores not divided by sqrt(D) (query_pre_attn_scalar 1)
        query_pre_attn_scalar=None if hf.get("scale_attn_weights", True) else 1.0,
        scale_attn_by_inverse_layer_idx=bool(hf.get("scale_attn_by_inverse_layer_idx", False)),
        **_token_ids(hf),
    )


def _rope_scaling_to_hf(config: ModelConfig) -> dict[str, Any] | None:
    return None if config.rope_scaling is None else dict(config.rope_scaling)


def config_to_hf(config: ModelConfig, dtype) -> dict[str, Any]:
    """A config.json dict that transformers loads as the same model."""
    arch = config.arch
    common = {
        "architectures": [HF_NAME_BY_ARCH[arch]],
        "model_type": MODEL_TYPE_BY_ARCH[arch],
        "vocab_size": config.vocab_size,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
        "tie_word_embeddings": config.tie_word_embeddings,
        "initializer_range": config.initializer_range,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    _check_expressible(config)
    if arch == "gpt2":
        return {
            **common,
            "n_embd": config.hidden_size,
            "n_layer": config.num_layers,
            "n_head": config.num_heads,
            "n_inner": config.intermediate_size,
            "n_positions": config.max_position_embeddings,
            "n_ctx": config.max_position_embeddings,
            "activation_function": "gelu_new" if config.activation == "gelu_tanh" else config.activation,
            "layer_norm_epsilon": config.norm_eps,
            "scale_attn_weights": config.query_pre_attn_scalar is None,
            "scale_attn_by_inverse_layer_idx": config.scale_attn_by_inverse_layer_idx,
        }
    out = {
        **common,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": _rope_scaling_to_hf(config),
    }
    if config.partial_rotary_factor != 1.0:
        out["partial_rotary_factor"] = config.partial_rotary_factor
    if arch in ("gemma2", "gemma3"):
        out.update(hidden_activation=HF_ACTIVATION[config.activation], hidden_act=HF_ACTIVATION[config.activation],
                   query_pre_attn_scalar=config.query_pre_attn_scalar or config.head_dim,
                   attn_logit_softcapping=config.attn_softcap, final_logit_softcapping=config.final_softcap)
    else:
        out["hidden_act"] = HF_ACTIVATION[config.activation]
    if arch in ("llama", "qwen3", "gemma2", "gemma3", "olmo2"):
        out["attention_bias"] = config.attention_bias
    if arch == "llama":
        out["mlp_bias"] = config.mlp_bias
    if arch == "gemma3":
        out["rope_local_base_freq"] = config.local_rope_theta or config.rope_theta
    if arch == "phi3" and config.rope_scaling is not None:
        out["original_max_position_embeddings"] = config.rope_scaling.get("original_max_position_embeddings",
                                                                          config.max_position_embeddings)
    if arch not in ("llama", "olmo2"):
        out["sliding_window"] = config.sliding_window
    if arch in ("qwen2", "qwen3"):
        out["use_sliding_window"] = config.sliding_window is not None
        types = [config.layer_type(i) for i in range(config.num_layers)]
        first = types.index("sliding_attention") if "sliding_attention" in types else config.num_layers
        out["max_window_layers"] = first  # transformers 4.x reads this; 5.x the layer_types below
    if arch in ("qwen2", "qwen3", "gemma2", "gemma3"):
        out["layer_types"] = [config.layer_type(i) for i in range(config.num_layers)]
    return out


def _check_expressible(config: ModelConfig) -> None:
    """Refuse to save a config whose features the family's transformers class cannot express."""
    from fastlm.config import FAMILY_DEFAULTS

    arch, problems = config.arch, []
    for name, value in FAMILY_DEFAULTS[arch].items():
        if name in ("activation", "attention_bias", "mlp_bias"):
            continue
        if getattr(config, name) != value:
            problems.append(f"{name}={getattr(config, name)!r}")
    if config.qkv_bias != (arch == "qwen2"):
        problems.append(f"qkv_bias={config.qkv_bias}")
    if config.attention_bias and arch not in ("llama", "qwen3", "gemma2", "gemma3", "olmo2", "gpt2"):
        problems.append("attention_bias=True")
    if config.mlp_bias and arch not in ("llama", "gpt2"):
        problems.append("mlp_bias=True")
    gemma = arch in ("gemma2", "gemma3")
    if not gemma and (config.attn_softcap or config.final_softcap):
        problems.append("soft-capping")
    if not gemma and arch != "gpt2" and config.query_pre_attn_scalar is not None:
        problems.append(f"query_pre_attn_scalar={config.query_pre_attn_scalar}")
    if arch == "gpt2" and config.query_pre_attn_scalar not in (None, 1.0):
        problems.append(f"query_pre_attn_scalar={config.query_pre_attn_scalar}")
    if arch != "gpt2" and config.scale_attn_by_inverse_layer_idx:
        problems.append("scale_attn_by_inverse_layer_idx=True")
    if arch in ("llama", "olmo2") and config.sliding_window is not None:
        problems.append(f"sliding_window={config.sliding_window}")
    if arch in ("mistral", "phi3") and config.layer_types is not None and len(set(config.layer_types)) > 1:
        problems.append("mixed layer_types")
    if arch != "gemma3" and config.local_rope_theta is not None:
        problems.append("local_rope_theta")
    if problems:
        raise ValueError(f"cannot save as {HF_NAME_BY_ARCH[arch]}: transformers' class has no way to express "
                         f"{', '.join(problems)}")
