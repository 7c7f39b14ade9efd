"""Decoder-only transformer of the Llama and GPT-2 families, computed through fastlm.ops.

Llama: x += attn(rms_norm(x)) with RoPE and GQA; x += down(swiglu(gate(h), up(h))).
GPT-2: x = wte + wpe; x += attn(layer_norm(x)); x += proj(gelu(fc(layer_norm(x)))).
Module names follow one scheme for both families; fastlm.io maps them to Hugging Face names.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from fastlm import ops
from fastlm.cache import KVCache, PagedKVCache
from fastlm.config import ModelConfig
from fastlm.hf_conventions import HFModelMixin  # load_adapter, set_adapter, ..., save_pretrained


class Norm(nn.Module):
    """RMSNorm (llama) or LayerNorm with bias (gpt2) over the last dim."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.eps = config.norm_eps
        self.weight = nn.Parameter(torch.ones(config.hidden_size))
        self.bias = nn.Parameter(torch.zeros(config.hidden_size)) if config.arch == "gpt2" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias is None:
            return ops.rms_norm(x, self.weight, self.eps)
        return ops.layer_norm(x, self.weight, self.bias, self.eps)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int) -> None:
        super().__init__()
        self.layer_index = layer_index
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.rope_theta = config.rope_theta if config.arch == "llama" else None
        bias = config.arch == "gpt2" or config.attention_bias
        h, q_out, kv_out = config.hidden_size, config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
        self.q_proj = nn.Linear(h, q_out, bias=bias)
        self.k_proj = nn.Linear(h, kv_out, bias=bias)
        self.v_proj = nn.Linear(h, kv_out, bias=bias)
        self.o_proj = nn.Linear(q_out, h, bias=bias)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache: KVCache | None, layout: BatchLayout) -> torch.Tensor:
        b, t, _ = x.shape
        # q: (B, H, T, D); k, v: (B, Hkv, T, D)
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if cache is not None:  # the cache rotates q/k (RoPE), stores k/v and attends over everything cached
            o = cache.attend(self.layer_index, q, k, v, positions, layout.key_lens, rope_theta=self.rope_theta)
            return self.o_proj(o.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))
        if self.rope_theta is not None:
            q = ops.rope(q, positions, theta=self.rope_theta)
            k = ops.rope(k, positions, theta=self.rope_theta)
        if layout.cu_seqlens is not None:  # packed documents: (B·T, H, D), no attention across them
            def flat(u):
                return u.transpose(1, 2).reshape(b * t, u.shape[1], self.head_dim)

            n = layout.max_seqlen
            o = ops.attention_varlen(flat(q), flat(k), flat(v), layout.cu_seqlens, layout.cu_seqlens,
                                     max_seqlen_q=n, max_seqlen_k=n, causal=layout.causal)
            o = o.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        else:
            o = ops.attention(q, k, v, causal=layout.causal, key_lens=layout.key_lens)
        return self.o_proj(o.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU (llama): down(silu(gate(x))·up(x)); GELU (gpt2): down(gelu(up(x)))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        h, i = config.hidden_size, config.intermediate_size
        gated = config.arch == "llama"
        bias = not gated or config.mlp_bias
        self.gate_proj = nn.Linear(h, i, bias=bias) if gated else None
        self.up_proj = nn.Linear(h, i, bias=bias)
        self.down_proj = nn.Linear(i, h, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_proj is not None:
            return self.down_proj(ops.swiglu(self.gate_proj(x), self.up_proj(x)))
        return self.down_proj(ops.gelu(self.up_proj(x)))


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int) -> None:
        super().__init__()
        self.attn_norm = Norm(config)
        self.attn = Attention(config, layer_index)
        self.mlp_norm = Norm(config)
        self.mlp = MLP(config)

    def forward(self, x, positions, cache, layout):
        x = x + self.attn(self.attn_norm(x), positions, cache, layout)
        return x + self.mlp(self.mlp_norm(x))


@dataclass(frozen=True)
class BatchLayout:
    """How the tokens of a batch may attend to each other.

    causal: each token sees only earlier ones (False: bidirectional, e.g. masked-LM training).
    key_lens (B,): right padding — tokens at or beyond key_lens[b] are hidden.
    cu_seqlens (num_docs + 1,) int32 with max_seqlen: documents packed into the rows, as
    offsets into the flattened B·T tokens; no token sees another document, and positions
    restart at 0 in each document.
    """

    causal: bool = True
    key_lens: torch.Tensor | None = None
    cu_seqlens: torch.Tensor | None = None
    max_seqlen: int = 0


def packed_positions(cu_seqlens: torch.Tensor, b: int, t: int) -> torch.Tensor:
    """Position of each token within its document: (B, T) int64, from cu_seqlens over B·T."""
    index = torch.arange(b * t, device=cu_seqlens.device)
    doc = torch.searchsorted(cu_seqlens.to(torch.int64), index, right=True) - 1
    return (index - cu_seqlens.to(torch.int64)[doc]).view(b, t)


class Model(HFModelMixin, nn.Module):
    """``model(input_ids)`` -> logits (B, T, vocab_size).

    With ``cache`` (a :class:`KVCache`), the tokens continue each cached sequence and their
    keys/values are appended. ``key_lens`` (B,) marks right padding: tokens at or beyond
    key_lens[b] are not attended to (their own logits are meaningless); on the prefill of an
    empty cache it sets each sequence's cached length (ragged prompts). ``cu_seqlens`` packs
    several documents per row (see :class:`BatchLayout`); ``causal=False`` attends both ways.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.pos_embed = (
            nn.Embedding(config.max_position_embeddings, config.hidden_size) if config.arch == "gpt2" else None
        )
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_layers))
        self.final_norm = Norm(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.gradient_checkpointing = False  # recompute each block in backward to save activations
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, initializer_range) weights, zero biases, unit norms; residual output
        projections scaled by 1/sqrt(2·num_layers) (GPT-2's scheme)."""
        std = self.config.initializer_range
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                scaled = name.endswith(("o_proj", "down_proj"))
                module.weight.normal_(0.0, std / math.sqrt(2 * self.config.num_layers) if scaled else std)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, Norm):
                module.weight.fill_(1.0)
                if module.bias is not None:
                    module.bias.zero_()

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def new_cache(self, batch_size: int, max_len: int | None = None, *, paged: bool = False,
                  **paged_options) -> KVCache | PagedKVCache:
        """An empty KV cache for this model's dtype and device: static (preallocated per
        sequence), or ``paged`` (blocks from a shared pool; options num_blocks, block_size)."""
        max_len = self.config.max_position_embeddings if max_len is None else max_len
        if paged:
            return PagedKVCache.for_model(self.config, batch_size, max_len, dtype=self.dtype, device=self.device,
                                          **paged_options)
        return KVCache.for_model(self.config, batch_size, max_len, dtype=self.dtype, device=self.device)

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        cache: KVCache | None = None,
        key_lens: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        causal: bool = True,
        return_hidden: bool = False,
        inputs_embeds: torch.Tensor | None = None,
        validate: bool = True,
    ) -> torch.Tensor:
        """input_ids (B, T) -> logits (B, T, vocab), or the final normed hidden states
        (B, T, hidden) with ``return_hidden`` (for a fused linear + loss). ``inputs_embeds``
        (B, T, hidden) replaces the token embeddings (e.g. with soft-prompt vectors prepended;
        input_ids is then ignored and may be None). See the class and :class:`BatchLayout` for
        cache, key_lens, cu_seqlens/max_seqlen and causal. ``validate=False`` skips the
        (host-synchronizing) check that token ids are in range, for ids known to be valid such
        as sampled ones in a decode loop."""
        if inputs_embeds is not None:
            self._check_embeds(inputs_embeds)
            input_ids = torch.zeros(inputs_embeds.shape[:2], dtype=torch.int64, device=inputs_embeds.device)
        self._check_input(input_ids, cache, key_lens, cu_seqlens, max_seqlen, causal, validate)
        b, t = input_ids.shape
        layout = BatchLayout(causal, key_lens, cu_seqlens, max_seqlen or 0)
        if cache is not None:
            positions = cache.positions(t)  # (B, T)
        elif cu_seqlens is not None:
            positions = packed_positions(cu_seqlens, b, t)  # (B, T)
        else:
            positions = torch.arange(t, device=input_ids.device)  # (T,)
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, hidden)
        out = self.forward_embeddings(x, positions, cache, layout, return_hidden=return_hidden)
        if cache is not None:
            cache.advance(t, lens=key_lens)
        return out

    def forward_embeddings(self, x: torch.Tensor, positions: torch.Tensor, cache, layout: BatchLayout, *,
                           return_hidden: bool = False) -> torch.Tensor:
        """The layers, final norm and head on embeddings x (B, T, hidden) at ``positions``
        ((T,) or (B, T)), with no input checks and no cache bookkeeping (the caller advances
        the cache): the core that :meth:`forward` and the compiled decode step share."""
        if self.pos_embed is not None:
            x = x + self.pos_embed(positions)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, positions, cache, layout, use_reentrant=False)
            else:
                x = layer(x, positions, cache, layout)
        hidden = self.final_norm(x)
        return hidden if return_hidden else self.lm_head(hidden)

    def _check_embeds(self, embeds: torch.Tensor) -> None:
        hidden = self.config.hidden_size
        if not isinstance(embeds, torch.Tensor) or embeds.dim() != 3 or embeds.shape[-1] != hidden:
            shape = tuple(embeds.shape) if isinstance(embeds, torch.Tensor) else type(embeds).__name__
            raise ValueError(f"Model: expected inputs_embeds of shape (B, T, {hidden}), got {shape}")
        if not embeds.dtype.is_floating_point:
            raise TypeError(f"Model: expected floating-point inputs_embeds, got {embeds.dtype}")

    def _check_input(self, input_ids, cache, key_lens, cu_seqlens, max_seqlen, causal, validate) -> None:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ValueError(f"Model: expected input_ids of shape (B, T), got {shape}")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"Model: expected integer input_ids (int64), got {input_ids.dtype}")
        if input_ids.numel() == 0:
            raise ValueError(f"Model: input_ids is empty, shape {tuple(input_ids.shape)}")
        if input_ids.device != self.device:
            raise ValueError(f"Model: input_ids on {input_ids.device} but the model is on {self.device}")
        context = self.config.max_position_embeddings
        used = input_ids.shape[1] + (cache.filled if cache is not None else 0)
        if used > context:
            raise ValueError(f"Model: sequence of {used} tokens is longer than the model's context of {context}")
        if cache is not None and cache.batch_size != input_ids.shape[0]:
            raise ValueError(f"Model: cache holds {cache.batch_size} sequences, input_ids has {input_ids.shape[0]}")
        if cache is not None and (cu_seqlens is not None or not causal):
            raise ValueError("Model: a KV cache is for causal decoding; cu_seqlens and causal=False are not "
                             "supported with it")
        if cache is not None and key_lens is not None and cache.filled:
            raise ValueError("Model: key_lens (ragged prompts) is only supported for the prefill of an empty cache")
        if key_lens is not None and cu_seqlens is not None:
            raise ValueError("Model: give either key_lens (padding) or cu_seqlens (packing), not both")
        if cu_seqlens is not None and max_seqlen is None:
            raise ValueError("Model: cu_seqlens needs max_seqlen (the longest document, a host int)")
        vocab = self.config.vocab_size
        if validate and not torch.compiler.is_compiling() and ((input_ids < 0) | (input_ids >= vocab)).any():
            raise ValueError(f"Model: token ids must be in [0, {vocab})")
