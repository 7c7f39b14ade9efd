"""Tiny random transformers models of every architecture fastlm.integrations.transformers supports.

Shapes are scaled down from the published configs (GQA kept, Qwen3/Gemma 3 q/k norms, Gemma's
(1 + w) norms, GELU-tanh MLP, query_pre_attn_scalar, Mistral/Gemma sliding windows shorter than
the test sequences, Gemma 2 attention soft-capping); every parameter is perturbed so that a
dropped norm weight or bias shows in the outputs.
"""

from __future__ import annotations

import torch
import transformers as T

ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3")
VOCAB = 96
PAD = 0

_COMMON = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256, pad_token_id=PAD, bos_token_id=1, eos_token_id=2,
)


def config(arch: str, **overrides):
    c = dict(_COMMON)
    if arch == "llama":
        cfg = T.LlamaConfig(**c, rope_theta=500000.0)
    elif arch == "mistral":
        cfg = T.MistralConfig(**c, sliding_window=6)
    elif arch == "qwen2":
        cfg = T.Qwen2Config(**c, rope_theta=1000000.0)
    elif arch == "qwen3":
        cfg = T.Qwen3Config(**c, head_dim=16)
    elif arch == "gemma2":
        cfg = T.Gemma2Config(**c, head_dim=16, sliding_window=6, attn_logit_softcapping=5.0,
                             final_logit_softcapping=None, query_pre_attn_scalar=24)
    elif arch == "gemma3":
        cfg = T.Gemma3TextConfig(**c, head_dim=16, sliding_window=6, query_pre_attn_scalar=24,
                                 layer_types=["sliding_attention", "full_attention"])
    else:
        raise ValueError(arch)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


_CLASSES = {
    "llama": T.LlamaForCausalLM, "mistral": T.MistralForCausalLM, "qwen2": T.Qwen2ForCausalLM,
    "qwen3": T.Qwen3ForCausalLM, "gemma2": T.Gemma2ForCausalLM, "gemma3": T.Gemma3ForCausalLM,
}


def build(arch: str, *, seed: int = 0, attn: str = "eager", dtype=torch.float32, **overrides):
    """A random model with every parameter perturbed (norm weights away from 1 / 0)."""
    torch.manual_seed(seed)
    cfg = config(arch, **overrides)
    cfg._attn_implementation = attn
    model = _CLASSES[arch](cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.to(dtype)


def batch(batch_size: int = 3, length: int = 11, *, seed: int = 1, padding: str | None = "left"):
    """(input_ids, attention_mask, labels): ragged rows (lengths length, length-4, length-1...)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch_size, length), generator=g)
    mask = torch.ones_like(ids)
    if padding is not None:
        for b in range(batch_size):
            pad = (4 * b + 3 * (b > 0)) % (length - 2) if b else 0
            if padding == "left":
                mask[b, :pad] = 0
            else:
                mask[b, length - pad:] = 0
    ids = ids.masked_fill(mask == 0, PAD)
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels
