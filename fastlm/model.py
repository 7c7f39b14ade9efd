"""Decoder-only transformer, one module for every family, computed through fastlm.ops.

The family is configuration (:class:`fastlm.config.ModelConfig`'s feature fields):
  x = embed(ids) [· sqrt(hidden)] [+ pos_embed(positions)]
  pre-norm:  x += attn(norm(x));            x += mlp(norm(x))             (Llama, GPT-2, ...)
  sandwich:  x += post(attn(norm(x)));      x += post(mlp(norm(x)))       (Gemma 2/3)
  post-norm: x += post(attn(x));            x += post(mlp(x))             (OLMo 2)
  attn: q, k, v projections [q/k RMSNorm] [RoPE], GQA attention with a scale, sliding window
  and soft-cap per layer; mlp: down(act(gate(x))·up(x)) or down(act(up(x)));
  logits = head(norm(x)) [soft-capped].
Projections that read the same input are fused into one GEMM, as gpt-fast and vLLM do: q/k/v
are the row blocks of ``attn.qkv_proj`` and gate/up those of ``mlp.gate_up_proj``; each such
module records its blocks in ``packed_parts`` (see :func:`packed_modules`), so that fastlm.io,
fastlm.peft and fastlm.quant can address q_proj, k_proj, ... by their Hugging Face names.
Module names follow one scheme for every family; fastlm.io maps them to Hugging Face names.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from fastlm import ops
from fastlm.cache import DecodeStepState, KVCache, PagedKVCache
from fastlm.config import ModelConfig
from fastlm.hf_conventions import HFModelMixin  # load_adapter, set_adapter, ..., save_pretrained
from fastlm.ops.attn import check_cu_seqlens, check_max_seqlen
from fastlm.rope import Rotary


class Norm(nn.Module):
    """Over the last dim: "rms" x/rms(x)·w, "rms_offset" x/rms(x)·(1 + w) in float32 (Gemma),
    or "layer" LayerNorm with bias."""

    def __init__(self, dim: int, kind: str, eps: float) -> None:
        super().__init__()
        self.kind, self.eps = kind, eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if kind == "layer" else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.weight.fill_(0.0 if self.kind == "rms_offset" else 1.0)  # rms_offset: 1 + w = 1
        if self.bias is not None:
            self.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "rms":
            return ops.rms_norm(x, self.weight, self.eps)
        if self.kind == "rms_offset":
            return ops.rms_norm(x.float(), 1.0 + self.weight.float(), self.eps).to(x.dtype)
        return ops.layer_norm(x, self.weight, self.bias, self.eps)


def activate(kind: str, x: torch.Tensor) -> torch.Tensor:
    """The MLP activation: silu, gelu_tanh (ops.gelu), gelu (erf), gelu_fast, relu."""
    if kind == "gelu_tanh":
        return ops.gelu(x)
    if kind == "silu":
        return F.silu(x)
    if kind == "gelu":
        return F.gelu(x)
    if kind == "gelu_fast":
        return 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))
    return F.relu(x)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int) -> None:
        super().__init__()
        self.layer_index = layer_index
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.rotary = None
        if config.positions == "rope":
            self.rotary = Rotary(config.rope_theta_of(layer_index), config.head_dim, config.rotary_dim,
                                 config.rope_scaling_of(layer_index), config.max_position_embeddings)
        # scale, window and soft-cap of this layer's attention (see ModelConfig)
        self.options = {}
        if config.query_pre_attn_scalar is not None or config.scale_attn_by_inverse_layer_idx:
            self.options["scale"] = config.attention_scale(layer_index)  # else the ops' default, D^-0.5
        if config.window(layer_index) is not None:
            self.options["window"] = config.window(layer_index)
        if config.attn_softcap is not None:
            self.options["softcap"] = config.attn_softcap
        qkv_bias, o_bias = config.attention_bias or config.qkv_bias, config.attention_bias
        h, q_out, kv_out = config.hidden_size, config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
        self.qkv_split = (q_out, kv_out, kv_out)
        self.qkv_proj = nn.Linear(h, sum(self.qkv_split), bias=qkv_bias)  # rows: q, k, v
        self.packed_parts = {"qkv_proj": tuple(zip(("q_proj", "k_proj", "v_proj"), self.qkv_split))}
        self.o_proj = nn.Linear(q_out, h, bias=o_bias)
        self.qk_norm = config.qk_norm
        if config.qk_norm != "none":  # per head (D) or over the whole projection (H·D)
            q_dim, k_dim = (config.head_dim,) * 2 if config.qk_norm == "head" else (q_out, kv_out)
            self.q_norm = Norm(q_dim, "rms" if config.norm == "layer" else config.norm, config.norm_eps)
            self.k_norm = Norm(k_dim, "rms" if config.norm == "layer" else config.norm, config.norm_eps)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache: KVCache | None, layout: BatchLayout) -> torch.Tensor:
        b, t, _ = x.shape
        qkv = self.qkv_proj(x)  # one GEMM: (B, T, (H + 2·Hkv)·D)
        if layout.step is not None and self.qk_norm == "none" and self.rotary is not None \
                and self.rotary.fused_theta is not None:  # eager decode step, plain RoPE
            return self._decode_step(qkv, cache, layout.step, self.rotary.fused_theta)
        # q (B, T, H·D), k, v (B, T, Hkv·D) are views of its output
        q, k, v = qkv.split(self.qkv_split, dim=-1)
        if self.qk_norm == "proj":
            q, k = self.q_norm(q), self.k_norm(k)
        # q: (B, T, H, D) -> (B, H, T, D); k, v: (B, Hkv, T, D)
        q, k = q.view(b, t, self.num_heads, self.head_dim), k.view(b, t, self.num_kv_heads, self.head_dim)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = v.view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        theta = None if self.rotary is None else self.rotary.fused_theta
        if self.rotary is not None and theta is None:  # scaled or partial RoPE: rotated here
            q, k = self.rotary.apply(q, k, positions)
        if layout.step is not None:  # eager decode step over a static cache: per-step tables shared by the layers
            if theta is not None:
                q, k = layout.step.rotate(q, theta), layout.step.rotate(k, theta)
            k_all, v_all = cache.write(self.layer_index, k, v, layout.step)
            o = layout.step.attend(q, k_all, v_all, **self.options)
            return self.o_proj(o.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))
        if cache is not None:  # the cache stores k/v (rotating q/k by plain RoPE on the way); attend over its view
            length = None if layout.cached is None else layout.cached + t
            q, kv = cache.update(self.layer_index, q, k, v, positions, theta=theta, length=length)
            if kv.block_table is not None:  # paged: the blocks in place
                o = ops.decode_attention_paged(q, kv.k, kv.v, kv.block_table, kv.lens, **self.options)
            elif layout.cached == 0:  # prefill of an empty cache: its positions [0, T) are the new tokens
                o = ops.attention(q, kv.k.to(q.dtype), kv.v.to(q.dtype), causal=True, key_lens=layout.key_lens,
                                  **self.options)
            else:
                o = ops.decode_attention(q, kv.k, kv.v, kv.lens, **self.options)
            return self.o_proj(o.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))
        if theta is not None:
            q, k = ops.rope(q, positions, theta=theta), ops.rope(k, positions, theta=theta)
        if layout.cu_seqlens is not None:  # packed documents: (B·T, H, D), no attention across them
            def flat(u):
                return u.transpose(1, 2).reshape(b * t, u.shape[1], self.head_dim)

            n = layout.max_seqlen
            o = ops.attention_varlen(flat(q), flat(k), flat(v), layout.cu_seqlens, layout.cu_seqlens,
                                     max_seqlen_q=n, max_seqlen_k=n, causal=layout.causal, validate=False,
                                     **self.options)  # (values checked once, in Model.forward)
            o = o.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        else:
            o = ops.attention(q, k, v, causal=layout.causal, key_lens=layout.key_lens, **self.options)
        return self.o_proj(o.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))

    def _decode_step(self, qkv: torch.Tensor, cache: KVCache, step: DecodeStepState, theta: float) -> torch.Tensor:
        """One eager decode step (T = 1) with plain RoPE and no q/k norm: q and k, adjacent in
        the fused projection, are rotated as one (B, 1, H + Hkv, D) tensor (the same values)."""
        b, h, hkv, d = qkv.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        qk, v = qkv.split(((h + hkv) * d, hkv * d), dim=-1)
        qk = step.rotate(qk.view(b, 1, h + hkv, d), theta)
        q, k = qk[:, :, :h].transpose(1, 2), qk[:, :, h:].transpose(1, 2)  # (B, H, 1, D), (B, Hkv, 1, D)
        k_all, v_all = cache.write(self.layer_index, k, v.view(b, 1, hkv, d).transpose(1, 2), step)
        o = step.attend(q, k_all, v_all, **self.options)  # (B, H, 1, D)
        return self.o_proj(o.transpose(1, 2).reshape(b, 1, h * d))


class MLP(nn.Module):
    """Gated: down(act(gate(x))·up(x)) (SwiGLU for silu), gate and up the two row blocks of
    ``gate_up_proj`` (one GEMM); plain: down(act(up(x)))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        h, i = config.hidden_size, config.intermediate_size
        bias = config.mlp_bias
        self.activation = config.activation
        self.intermediate_size = i
        self.gated = config.mlp == "gated"
        if self.gated:
            self.gate_up_proj = nn.Linear(h, 2 * i, bias=bias)  # rows: gate, up
            self.packed_parts = {"gate_up_proj": (("gate_proj", i), ("up_proj", i))}
        else:
            self.up_proj = nn.Linear(h, i, bias=bias)
        self.down_proj = nn.Linear(i, h, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.gated:
            return self.down_proj(activate(self.activation, self.up_proj(x)))
        # gate, up (..., I): views of the fused (..., 2I) output, read in place by the op
        gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)
        if self.activation == "silu":
            return self.down_proj(ops.swiglu(gate, up))
        return self.down_proj(activate(self.activation, gate) * up)


def packed_modules(model: nn.Module) -> dict[str, tuple[tuple[str, int, int], ...]]:
    """Fused projections of ``model`` (also inside a wrapper): full module name -> the full
    names of the projections packed in it, with their rows [start, stop) of its output, e.g.
    ``"layers.0.attn.qkv_proj" -> (("layers.0.attn.q_proj", 0, 64), ("layers.0.attn.k_proj",
    64, 96), ...)``. The unfused names are the Hugging Face ones (q_proj, ..., gate_proj, up_proj)."""
    out = {}
    for prefix, module in model.named_modules():
        for child, parts in getattr(module, "packed_parts", {}).items():
            base = f"{prefix}." if prefix else ""
            rows, start = [], 0
            for name, size in parts:
                rows.append((base + name, start, start + size))
                start += size
            out[base + child] = tuple(rows)
    return out


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int) -> None:
        super().__init__()
        placement, h = config.norm_placement, config.hidden_size

        def norm():
            return Norm(h, config.norm, config.norm_eps)

        self.attn_norm = norm() if placement != "post" else None
        self.attn = Attention(config, layer_index)
        self.post_attn_norm = norm() if placement != "pre" else None
        self.mlp_norm = norm() if placement != "post" else None
        self.mlp = MLP(config)
        self.post_mlp_norm = norm() if placement != "pre" else None

    def forward(self, x, positions, cache, layout):
        a = self.attn(x if self.attn_norm is None else self.attn_norm(x), positions, cache, layout)
        x = x + (a if self.post_attn_norm is None else self.post_attn_norm(a))
        m = self.mlp(x if self.mlp_norm is None else self.mlp_norm(x))
        return x + (m if self.post_mlp_norm is None else self.post_mlp_norm(m))


class Embedding(nn.Embedding):
    """Token embeddings, times ``scale`` (cast to the weight dtype, as Gemma does) when given."""

    def __init__(self, num: int, dim: int, scale: float | None = None) -> None:
        super().__init__(num, dim)
        self.scale = scale
        self._rounded: dict[torch.dtype, float] = {}

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = super().forward(ids)
        if self.scale is None:
            return x
        if x.dtype not in self._rounded:  # the scale rounded to the weights' dtype, as Gemma does
            self._rounded[x.dtype] = float(torch.tensor(self.scale, dtype=x.dtype))
        return x * self._rounded[x.dtype]


@dataclass(frozen=True)
class BatchLayout:
    """How the tokens of a batch may attend to each other.

    causal: each token sees only earlier ones (False: bidirectional, e.g. masked-LM training).
    key_lens (B,): right padding — tokens at or beyond key_lens[b] are hidden.
    cu_seqlens (num_docs + 1,) int32 with max_seqlen: documents packed into the rows, as
    offsets into the flattened B·T tokens; no token sees another document, and positions
    restart at 0 in each document.
    cached: with a KV cache, a host bound on the positions every sequence held before this
    forward (0: the prefill of an empty cache); attention reads the cache's first cached + T
    positions. None: the whole cache (a static shape, for a compiled decode step; never a prefill).
    step: an eager decode step of one token per sequence over a static :class:`KVCache`, with
    the state its layers share (:class:`fastlm.cache.DecodeStepState`: RoPE tables, scatter
    index, masks built once); the layers then write and attend through it.
    """

    causal: bool = True
    key_lens: torch.Tensor | None = None
    cu_seqlens: torch.Tensor | None = None
    max_seqlen: int = 0
    cached: int | None = None
    step: DecodeStepState | None = None


def packed_positions(cu_seqlens: torch.Tensor, b: int, t: int) -> torch.Tensor:
    """Position of each token within its document: (B, T) int64, from cu_seqlens over B·T."""
    index = torch.arange(b * t, device=cu_seqlens.device)
    doc = torch.searchsorted(cu_seqlens.to(torch.int64), index, right=True) - 1
    return (index - cu_seqlens.to(torch.int64)[doc]).view(b, t)


class Model(HFModelMixin, nn.Module):
    """``model(input_ids)`` -> logits (B, T, vocab_size).

    With ``cache`` (a :class:`KVCache` or :class:`PagedKVCache`), the tokens continue each cached sequence and their
    keys/values are appended. ``key_lens`` (B,) marks right padding: tokens at or beyond
    key_lens[b] are not attended to (their own logits are meaningless); on the prefill of an
    empty cache it sets each sequence's cached length (ragged prompts). ``cu_seqlens`` packs
    several documents per row (see :class:`BatchLayout`); ``causal=False`` attends both ways.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = Embedding(config.vocab_size, config.hidden_size,
                               math.sqrt(config.hidden_size) if config.scale_embeddings else None)
        self.pos_embed = (
            nn.Embedding(config.max_position_embeddings, config.hidden_size) if config.positions == "learned" else None
        )
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_layers))
        self.final_norm = Norm(config.hidden_size, config.norm, config.norm_eps)
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
                module.reset_parameters()

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
        max_len = self.config.context_length if max_len is None else max_len
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
        (B, T, hidden) with ``return_hidden`` (for a fused linear + loss; :meth:`head` turns
        them into logits, with the final soft-cap). ``inputs_embeds``
        (B, T, hidden) replaces the token embeddings (e.g. with soft-prompt vectors prepended;
        input_ids is then ignored and may be None). See the class and :class:`BatchLayout` for
        cache, key_lens, cu_seqlens/max_seqlen and causal. ``validate=False`` skips the
        (host-synchronizing) checks of values — token ids in range, cu_seqlens' offsets and
        max_seqlen (once per forward, not per layer) — for inputs known to be valid, such as
        sampled ids in a decode loop or a training batch checked at the data boundary."""
        if inputs_embeds is not None:
            self._check_embeds(inputs_embeds)
            input_ids = torch.zeros(inputs_embeds.shape[:2], dtype=torch.int64, device=inputs_embeds.device)
        self._check_input(input_ids, cache, key_lens, cu_seqlens, max_seqlen, causal, validate)
        b, t = input_ids.shape
        layout = BatchLayout(causal, key_lens, cu_seqlens, max_seqlen or 0, None if cache is None else cache.filled)
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
        return hidden if return_hidden else self.head(hidden)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits of final hidden states: lm_head, then c·tanh(logits/c) with final_softcap c."""
        logits = self.lm_head(hidden)
        cap = self.config.final_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap

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
        context = self.config.context_length
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
        if cu_seqlens is not None:  # the layers' attention_varlen skips these value checks
            offsets = check_cu_seqlens("Model", "cu_seqlens", cu_seqlens, input_ids.numel(), self.device, validate)
            check_max_seqlen("Model", "max_seqlen", max_seqlen, offsets)
        vocab = self.config.vocab_size
        if validate and not torch.compiler.is_compiling() and ((input_ids < 0) | (input_ids >= vocab)).any():
            raise ValueError(f"Model: token ids must be in [0, {vocab})")
