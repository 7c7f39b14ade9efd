"""Soft-prompt (prompt) tuning: N trainable virtual-token embeddings prepended to every input.

For input ids (B, T) and the active prompt P (N, hidden):

    embeds = [P, embed(ids)]  (B, N + T, hidden)  ->  model(inputs_embeds=embeds)[:, N:]

so the logits (B, T, vocab) line up with the ids, as without a prompt (PEFT returns the N
virtual positions too; fastlm drops them). The base model is frozen. Right padding (key_lens)
is shifted by N. With a KV cache, the prompt is prepended on the first call (prefill) only and
the cache holds N more positions: ``new_cache`` adds them and ``config`` reports a context N
tokens shorter, so ``fastlm.generate(prompt_model, ids)`` works unchanged. Several named
prompts (tasks) can live on one model: ``set_adapter``, or one per row with
``adapter_names=[...]`` (prompts in one batch must have the same length; ``"__base__"`` rows
are not supported in a mixed batch, since their positions would differ).

Files are PEFT's: adapter_config.json (peft_type PROMPT_TUNING) + adapter_model.safetensors
holding ``prompt_embeddings`` (N, hidden).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from fastlm._files import atomic_write, atomic_write_text
from fastlm.model import Model
from fastlm.peft.wrapper import ModelWrapper
from fastlm.peft.config import BASE_ADAPTER, PromptTuningConfig, check_adapter_name, rows_for_batch
from fastlm.peft.lora_io import CONFIG_NAME, WEIGHTS_NAME, read_config, read_tensors

PROMPT_KEY = "prompt_embeddings"


class PromptTuningModel(ModelWrapper):
    """A fastlm :class:`Model` with named soft prompts (see the module docstring)."""

    def __init__(self, model: Model, config: PromptTuningConfig | None = None, adapter_name: str = "default") -> None:
        super().__init__()
        if not isinstance(model, Model):
            raise TypeError(f"PromptTuningModel wraps a fastlm.Model, got {type(model).__name__}")
        self.model = model
        self.prompts = nn.ParameterDict()
        self.peft_config: dict[str, PromptTuningConfig] = {}
        self._trainable: dict[str, bool] = {}
        self.active_adapter: str | None = None
        self._row_default: list[str] | None = None
        model.requires_grad_(False)
        if config is not None:
            self.add_adapter(adapter_name, config)

    # ---- what generate() and the Trainer use ------------------------------------------------

    @property
    def num_virtual_tokens(self) -> int:
        return 0 if self.active_adapter is None else self.prompts[self.active_adapter].shape[0]

    @property
    def config(self):
        """The base config with the context shortened by the virtual tokens."""
        base = self.model.config
        return base.replace(max_position_embeddings=base.max_position_embeddings - self.num_virtual_tokens)

    def new_cache(self, batch_size: int, max_len: int | None = None, **options):
        """A cache for max_len tokens plus the virtual ones (options: the model's, e.g. paged)."""
        max_len = self.config.max_position_embeddings if max_len is None else max_len
        return self.model.new_cache(batch_size, max_len + self.num_virtual_tokens, **options)

    def save_pretrained(self, directory: str | Path, **_ignored) -> None:
        self.save_adapter(directory)

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        params = list(self.parameters())
        return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)

    # ---- prompts ------------------------------------------------------------------------------

    @property
    def adapter_names(self) -> list[str]:
        return list(self.peft_config)

    def _check_known(self, name: str) -> None:
        if name not in self.peft_config:
            known = ", ".join(repr(n) for n in self.peft_config) or "none"
            raise ValueError(f"unknown prompt adapter {name!r}; this model has: {known}")

    def _check_new(self, name: str) -> None:
        check_adapter_name(name)
        if name in self.peft_config:
            raise ValueError(f"prompt adapter {name!r} already exists; delete_adapter() it first or pick another name")

    @torch.no_grad()
    def _init_prompt(self, config: PromptTuningConfig) -> torch.Tensor:
        table = self.model.embed.weight
        n = config.num_virtual_tokens
        if config.init == "random":
            return torch.randn(n, table.shape[1], device=table.device, dtype=torch.float32) * table.float().std()
        if config.init == "sample_vocab":
            ids = torch.randint(0, table.shape[0], (n,), device=table.device)
        else:
            bad = [i for i in config.init_token_ids if not 0 <= i < table.shape[0]]
            if bad:
                raise ValueError(f"PromptTuningConfig.init_token_ids: ids {bad} are outside the vocabulary "
                                 f"of {table.shape[0]}")
            ids = torch.tensor(config.init_token_ids, device=table.device).repeat(n)[:n]
        return table[ids].float()

    def add_adapter(self, adapter_name: str, config: PromptTuningConfig) -> None:
        self._check_new(adapter_name)
        self._install(adapter_name, config, self._init_prompt(config), trainable=True)

    def _install(self, name: str, config: PromptTuningConfig, prompt: torch.Tensor, trainable: bool) -> None:
        hidden = self.model.config.hidden_size
        if prompt.dim() != 2 or prompt.shape != (config.num_virtual_tokens, hidden):
            raise ValueError(f"prompt adapter {name!r}: prompt_embeddings of shape {tuple(prompt.shape)} do not fit "
                             f"this model: expected ({config.num_virtual_tokens}, {hidden}) (num_virtual_tokens, "
                             "hidden_size); was it made for a different base model?")
        if config.num_virtual_tokens >= self.model.config.max_position_embeddings:
            raise ValueError(f"prompt adapter {name!r}: {config.num_virtual_tokens} virtual tokens leave no room in "
                             f"the model's context of {self.model.config.max_position_embeddings}")
        dtype = torch.float32 if self.model.dtype in (torch.float16, torch.bfloat16) else self.model.dtype
        self.prompts[name] = nn.Parameter(prompt.detach().to(device=self.device, dtype=dtype), requires_grad=False)
        self.peft_config[name] = config
        self._trainable[name] = trainable
        if self.active_adapter is None:
            self.active_adapter = name
        self._refresh_trainable()

    def _refresh_trainable(self) -> None:
        for name, p in self.prompts.items():
            p.requires_grad_(name == self.active_adapter and self._trainable[name])

    def set_adapter(self, adapter_name: str) -> None:
        self._check_known(adapter_name)
        self.active_adapter = adapter_name
        self._refresh_trainable()

    def delete_adapter(self, adapter_name: str) -> None:
        self._check_known(adapter_name)
        del self.prompts[adapter_name], self.peft_config[adapter_name], self._trainable[adapter_name]
        if self.active_adapter == adapter_name:
            self.active_adapter = next(iter(self.peft_config), None)
        self._refresh_trainable()

    def save_adapter(self, path: str | Path, adapter_name: str | None = None) -> None:
        """PEFT's files: PeftModel.from_pretrained loads them on the transformers base model."""
        adapter_name = adapter_name or self.active_adapter
        if adapter_name is None:
            raise ValueError("save_adapter: this model has no prompt")
        self._check_known(adapter_name)
        base = self.model.config
        config = self.peft_config[adapter_name].to_peft(base.hidden_size, base.num_layers, base.num_heads)
        tensors = {PROMPT_KEY: self.prompts[adapter_name].detach().cpu().contiguous()}
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        atomic_write(path / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
        atomic_write_text(path / CONFIG_NAME, json.dumps(config, indent=2, sort_keys=True) + "\n")

    def load_adapter(self, path: str | Path, adapter_name: str = "default", *, is_trainable: bool = False) -> None:
        self._check_new(adapter_name)
        config = PromptTuningConfig.from_peft(read_config(path))
        token_dim = read_config(path).get("token_dim")
        if token_dim not in (None, self.model.config.hidden_size):
            raise ValueError(f"{path}: the prompt was made for token_dim={token_dim}, this model's hidden size is "
                             f"{self.model.config.hidden_size}; was it made for a different base model?")
        tensors = read_tensors(path)
        if set(tensors) != {PROMPT_KEY}:
            raise ValueError(f"{path}: expected one tensor {PROMPT_KEY!r}, got {sorted(tensors)}")
        self._install(adapter_name, config, tensors[PROMPT_KEY], trainable=is_trainable)

    @torch.no_grad()
    def load_adapter_weights(self, path: str | Path, adapter_name: str) -> None:
        """Copy the saved prompt into the existing one, in place (resuming training)."""
        self._check_known(adapter_name)
        self.prompts[adapter_name].copy_(read_tensors(path)[PROMPT_KEY])

    # ---- forward ------------------------------------------------------------------------------

    def _prompt_rows(self, batch: int, adapter_names: list[str] | None) -> torch.Tensor | None:
        """(B, N, hidden) prompt of each row, or None for no prompt."""
        if adapter_names is None:
            if self.active_adapter is None:
                return None
            return self.prompts[self.active_adapter][None].expand(batch, -1, -1)
        if len(adapter_names) != batch:
            raise ValueError(f"adapter_names has {len(adapter_names)} names for a batch of {batch} rows")
        if set(adapter_names) == {BASE_ADAPTER}:
            return None
        for name in set(adapter_names):
            if name == BASE_ADAPTER:
                raise ValueError("prompt tuning: '__base__' rows cannot be mixed with prompted rows in one batch "
                                 "(their positions would differ); run them separately")
            self._check_known(name)
        lengths = {self.prompts[n].shape[0] for n in adapter_names}
        if len(lengths) > 1:
            raise ValueError(f"prompt tuning: the prompts of one batch must have one length, got {sorted(lengths)}")
        return torch.stack([self.prompts[n] for n in adapter_names])

    def forward(self, input_ids: torch.Tensor | None = None, *, adapter_names: Sequence[str] | None = None,
                cache=None, key_lens: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                **kwargs) -> torch.Tensor:
        """Same arguments as the model; logits (or hidden states) for the real tokens only."""
        if kwargs.get("cu_seqlens") is not None:
            raise ValueError("prompt tuning does not support packed batches (cu_seqlens)")
        if cache is not None and cache.filled > 0:  # decoding: the prompt is already in the cache
            return self.model(input_ids, cache=cache, inputs_embeds=inputs_embeds, **kwargs)
        embeds = self.model.embed(input_ids) if inputs_embeds is None else inputs_embeds
        batch = embeds.shape[0]
        if adapter_names is not None:
            names = list(adapter_names)
        else:
            names = None if self._row_default is None else rows_for_batch(self._row_default, batch)
        prompt = self._prompt_rows(batch, names)
        if prompt is None:
            return self.model(None, cache=cache, key_lens=key_lens, inputs_embeds=embeds, **kwargs)
        n = prompt.shape[1]
        embeds = torch.cat([prompt.to(embeds.dtype), embeds], dim=1)  # (B, N + T, hidden)
        if key_lens is not None:
            key_lens = key_lens + n
        out = self.model(None, cache=cache, key_lens=key_lens, inputs_embeds=embeds, **kwargs)
        return out[:, n:]
