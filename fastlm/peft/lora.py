"""LoraModel: named LoRA adapters on a fastlm Model, PEFT-compatible, with mixed-adapter batches.

    lora = LoraModel(model, LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"]))
    lora.load_adapter("path/to/peft_adapter", adapter_name="sql")
    logits = lora(input_ids, adapter_names=["default", "sql", "__base__"])  # one adapter per row

The base model is frozen; only the active adapter's parameters train (when it was created
here, or loaded with ``is_trainable=True``). The targeted ``nn.Linear`` layers are replaced by
:class:`~fastlm.peft.layers.LoraLinear` in place (``unload()`` puts them back); a target packed
in a fused projection (q_proj in attn.qkv_proj, ...) gets a :class:`~fastlm.peft.packed.LoraSlice`
at its own name and the fused layer becomes a :class:`~fastlm.peft.packed.PackedLoraLinear`
(one GEMM, each adapter added to its slice of the output). The model class itself knows
nothing of LoRA. The wrapper exposes what ``fastlm.generate`` and
``fastlm.train.Trainer`` use (config, device, new_cache, lm_head, ...); per-row adapters during
generation come from ``with lora.use_adapters(names): generate(lora, ...)``.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from fastlm.model import Model, packed_modules
from fastlm.peft import lora_io, names
from fastlm.peft.wrapper import ModelWrapper
from fastlm.peft.config import BASE_ADAPTER, LoraConfig, check_adapter_name, rows_for_batch
from fastlm.peft.layers import LoraLinear, LoraState, mixed_op
from fastlm.peft.packed import LoraSlice, PackedLoraLinear

logger = logging.getLogger(__name__)

COMBINATIONS = ("cat", "svd")


class LoraModel(ModelWrapper):
    """A fastlm :class:`Model` with named LoRA adapters (see the module docstring)."""

    def __init__(self, model: Model, config: LoraConfig | None = None, adapter_name: str = "default") -> None:
        super().__init__()
        if not isinstance(model, Model):
            raise TypeError(f"LoraModel wraps a fastlm.Model, got {type(model).__name__}")
        mixed_op()  # registers the triton LoRA kernels
        self.model = model
        self._state = LoraState()
        self.peft_config: dict[str, LoraConfig] = {}
        self._trainable: dict[str, bool] = {}
        self._row_default: list[str] | None = None
        self._row_index: dict[tuple, torch.Tensor] = {}  # (row names, device) -> index, built once
        model.requires_grad_(False)
        if config is not None:
            self.add_adapter(adapter_name, config)

    # ---- what generate() and the Trainer use ------------------------------------------------

    @property
    def config(self):
        return self.model.config

    def new_cache(self, batch_size: int, max_len: int | None = None, **options):
        return self.model.new_cache(batch_size, max_len, **options)

    def save_pretrained(self, directory: str | Path, **_ignored) -> None:
        """Save the active adapter (PEFT format), as PEFT's save_pretrained does."""
        self.save_adapter(directory)

    # ---- adapters -----------------------------------------------------------------------------

    @property
    def active_adapter(self) -> str | None:
        return self._state.active

    @property
    def adapter_names(self) -> list[str]:
        return list(self.peft_config)

    def lora_modules(self) -> dict[str, LoraLinear]:
        """fastlm module name -> LoraLinear (or LoraSlice of a fused projection), for every
        targeted layer: the modules that hold adapters, by their unfused names."""
        return {name: m for name, m in self.model.named_modules()
                if isinstance(m, LoraLinear) and not isinstance(m, PackedLoraLinear)}

    def _check_known(self, name: str) -> None:
        if name not in self.peft_config:
            known = ", ".join(repr(n) for n in self.peft_config) or "none"
            raise ValueError(f"unknown adapter {name!r}; this model has: {known}")

    def _packed_part(self, name: str) -> tuple[str, int, int] | None:
        """(fused module name, first row, end row) of a projection packed in a fused layer, else None."""
        for fused, parts in packed_modules(self.model).items():
            for part, start, stop in parts:
                if part == name:
                    return fused, start, stop
        return None

    def _target(self, name: str) -> tuple[nn.Module, int, int]:
        """(base module holding the weight, in_features, out_features) of LoRA target ``name``."""
        packed = self._packed_part(name)
        if packed is not None:
            fused, start, stop = packed
            module = self.model.get_submodule(fused)
            base = module.base if isinstance(module, LoraLinear) else module
            return base, LoraLinear._features(base, fused)[0], stop - start
        module = self.model.get_submodule(name)
        base = module.base if isinstance(module, LoraLinear) else module
        return base, *LoraLinear._features(base, name)

    def add_adapter(self, adapter_name: str, config: LoraConfig) -> None:
        """Create a new adapter on the modules ``config`` targets (PEFT's init: B = 0, so it
        starts as a no-op). The first adapter becomes the active one."""
        self._check_new(adapter_name)
        chosen = names.select(self.config, config)
        shared: dict[int, torch.Tensor] = {}  # GPT-2: one lora_A per block for q, k and v (PEFT's c_attn)
        chosen_names = {c.name for c in chosen}
        fused_layers = {c.layer for c in chosen if self.config.arch == "gpt2" and
                        all(f"layers.{c.layer}.{p}" in chosen_names for p in names.FUSED_QKV)}
        entries: lora_io.Entries = {}
        for cand in chosen:
            base, in_f, out_f = self._target(cand.name)
            r, alpha = config.rank_and_alpha(cand.names)
            tied = cand.layer in fused_layers and cand.name.split(".", 2)[-1] in names.FUSED_QKV
            dtype, device = _adapter_dtype(base), _device_of(base)
            if tied and cand.layer in shared:
                lora_a = shared[cand.layer]
                if lora_a.shape[0] != r:
                    raise ValueError(f"LoRA adapter {adapter_name!r}: GPT-2's q/k/v share one lora_A (PEFT's c_attn), "
                                     f"so module {cand.name} needs the rank of the others ({lora_a.shape[0]}), got {r}")
            else:
                lora_a = torch.empty(r, in_f, dtype=dtype, device=device)
                nn.init.kaiming_uniform_(lora_a, a=math.sqrt(5))
                if tied:
                    shared[cand.layer] = lora_a
            lora_b = torch.empty(out_f, r, dtype=dtype, device=device)
            if config.init_lora_weights:
                nn.init.zeros_(lora_b)
            else:
                nn.init.kaiming_uniform_(lora_b, a=math.sqrt(5))
            entries[cand.name] = (lora_a, lora_b, config.scaling(r, alpha))
        self._install(adapter_name, config, entries, trainable=True)
        logger.info("added LoRA adapter %r on %d modules: %s", adapter_name, len(entries),
                    self.trainable_parameters_summary())

    def _check_new(self, adapter_name: str) -> None:
        check_adapter_name(adapter_name)
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} already exists; delete_adapter() it first or pick another name")

    def _install(self, adapter_name: str, config: LoraConfig, entries: lora_io.Entries, trainable: bool) -> None:
        """Attach ``entries`` (validated for every module before any is changed); tensors shared
        between entries (one lora_A for GPT-2's q/k/v) become one shared Parameter."""
        for name, (lora_a, lora_b, _) in entries.items():
            _, in_f, out_f = self._target(name)
            r = lora_a.shape[0] if lora_a.dim() == 2 else 0
            if r < 1:
                raise ValueError(f"LoRA adapter {adapter_name!r}: rank must be >= 1 for module {name}, "
                                 f"got lora_A of shape {tuple(lora_a.shape)}")
            if lora_a.shape != (r, in_f) or lora_b.shape != (out_f, r):
                raise ValueError(
                    f"LoRA adapter {adapter_name!r} does not fit module {name} (in={in_f}, out={out_f}): lora_A "
                    f"{tuple(lora_a.shape)}, lora_B {tuple(lora_b.shape)}; expected ({r}, {in_f}) and ({out_f}, {r}) "
                    "— was it made for a different base model?")
        params: dict[int, nn.Parameter] = {}

        def parameter(t: torch.Tensor, like: nn.Module) -> nn.Parameter:
            if id(t) not in params:
                value = t.detach().to(device=_device_of(like), dtype=_adapter_dtype(like), copy=True)
                params[id(t)] = nn.Parameter(value, requires_grad=False)
            return params[id(t)]

        for name, (lora_a, lora_b, scaling) in entries.items():
            module = self._wrap(name)
            module.add(adapter_name, parameter(lora_a, module.base), parameter(lora_b, module.base), scaling,
                       config.lora_dropout)
        self.peft_config[adapter_name] = config
        self._trainable[adapter_name] = trainable
        if self._state.active is None:
            self._state.active = adapter_name
        self._refresh_trainable()

    def _wrap(self, name: str) -> LoraLinear:
        """The LoraLinear of target ``name``: the layer wrapped in place, or for a projection packed
        in a fused layer a LoraSlice registered at ``name`` (the fused layer wrapped in a
        PackedLoraLinear)."""
        parent_name, _, child = name.rpartition(".")
        parent = self.model.get_submodule(parent_name) if parent_name else self.model
        module = getattr(parent, child, None)
        if isinstance(module, LoraLinear):
            return module
        packed = self._packed_part(name)
        if packed is None:
            module = LoraLinear(module, name, self._state).train(module.training)
            setattr(parent, child, module)
            return module
        fused_name, start, stop = packed
        fused_parent, _, fused_child = fused_name.rpartition(".")
        holder = self.model.get_submodule(fused_parent) if fused_parent else self.model
        fused = getattr(holder, fused_child)
        if not isinstance(fused, PackedLoraLinear):
            fused = PackedLoraLinear(fused, fused_name, self._state).train(fused.training)
            setattr(holder, fused_child, fused)
        piece = LoraSlice(fused, name, start, stop, self._state).train(fused.training)
        fused.add_slice(piece)
        setattr(parent, child, piece)
        return piece

    def _refresh_trainable(self) -> None:
        """Only the active adapter's parameters train (if that adapter is trainable)."""
        for module in self.lora_modules().values():
            for store in (module.lora_A, module.lora_B):
                for name, p in store.items():
                    p.requires_grad_(False)
        active = self._state.active
        if active is not None and self._trainable.get(active, False):
            for module in self.lora_modules().values():
                if active in module.lora_A:
                    module.lora_A[active].requires_grad_(True)
                    module.lora_B[active].requires_grad_(True)

    def set_adapter(self, adapter_name: str) -> None:
        """Make ``adapter_name`` the adapter of every row (and the trainable one)."""
        self._check_known(adapter_name)
        merged = self._state.merged
        if merged is not None and merged != adapter_name:
            raise RuntimeError(f"adapter {merged!r} is merged into the base weights; unmerge_adapter() first")
        self._state.active = adapter_name
        self._refresh_trainable()

    def delete_adapter(self, adapter_name: str) -> None:
        self._check_known(adapter_name)
        if self._state.merged == adapter_name:
            raise RuntimeError(f"adapter {adapter_name!r} is merged into the base weights; unmerge_adapter() first")
        for module in self.lora_modules().values():
            module.remove(adapter_name)
        del self.peft_config[adapter_name]
        del self._trainable[adapter_name]
        if self._state.active == adapter_name:
            self._state.active = next(iter(self.peft_config), None)
        self._refresh_trainable()

    def entries(self, adapter_name: str) -> lora_io.Entries:
        """fastlm module name -> (lora_A, lora_B, scaling) of an adapter (the live parameters)."""
        self._check_known(adapter_name)
        return {name: (m.lora_A[adapter_name], m.lora_B[adapter_name], m.scaling[adapter_name])
                for name, m in self.lora_modules().items() if adapter_name in m.lora_A}

    def load_adapter(self, path: str | Path, adapter_name: str = "default", *, is_trainable: bool = False) -> None:
        """Add the PEFT adapter in ``path`` (adapter_config.json + adapter_model.safetensors) as
        ``adapter_name``; frozen unless ``is_trainable`` (PEFT's convention)."""
        self._check_new(adapter_name)
        config, entries = lora_io.read_lora(path, self.config)
        self._install(adapter_name, config, entries, trainable=is_trainable)

    @torch.no_grad()
    def load_adapter_weights(self, path: str | Path, adapter_name: str) -> None:
        """Copy the weights saved in ``path`` into the existing adapter, in place (resuming training)."""
        live = self.entries(adapter_name)
        _, saved = lora_io.read_lora(path, self.config)
        if set(saved) != set(live):
            raise ValueError(f"{path} does not hold adapter {adapter_name!r}'s modules")
        for name, (lora_a, lora_b, _) in saved.items():
            live[name][0].copy_(lora_a)
            live[name][1].copy_(lora_b)

    def save_adapter(self, path: str | Path, adapter_name: str | None = None) -> None:
        """Write the adapter (default: the active one) in PEFT's format, loadable with
        ``peft.PeftModel.from_pretrained`` on the transformers version of the base model."""
        adapter_name = adapter_name or self._state.active
        if adapter_name is None:
            raise ValueError("save_adapter: this model has no adapter")
        self._check_known(adapter_name)
        lora_io.write_lora(path, self.config, self.peft_config[adapter_name], self.entries(adapter_name))

    @torch.no_grad()
    def add_weighted_adapter(self, adapters: Sequence[str], weights: Sequence[float], adapter_name: str,
                             combination_type: str = "cat", svd_rank: int | None = None) -> None:
        """New adapter ``adapter_name`` with ΔW = Σ_i weights[i]·ΔW_i on every module any of them targets.

        "cat" (exact): A = [w_i·s_i·A_i] stacked, B = [B_i] side by side, scaling 1, rank Σ r_i.
        "svd": the best rank-``svd_rank`` (default: the largest source rank) approximation of
        Σ w_i·ΔW_i per module (per GPT-2 q/k/v group, keeping one shared lora_A), scaling 1.
        """
        if combination_type not in COMBINATIONS:
            raise ValueError(f"combination_type must be one of {COMBINATIONS}, got {combination_type!r}")
        if len(adapters) == 0 or len(adapters) != len(weights):
            raise ValueError(f"add_weighted_adapter: {len(adapters)} adapters and {len(weights)} weights; "
                             "give one weight per adapter")
        for name in adapters:
            self._check_known(name)
        self._check_new(adapter_name)
        groups: dict[tuple, list[str]] = {}  # modules whose sources share lora_A -> one shared result
        modules = self.lora_modules()
        for name, m in modules.items():
            sources = tuple((id(m.lora_A[a]), m.scaling[a]) for a in adapters if a in m.lora_A)
            if sources:
                groups.setdefault(sources, []).append(name)
        entries: lora_io.Entries = {}
        for group in groups.values():
            parts = [[(w, m.scaling[a], m.lora_A[a].float(), m.lora_B[a].float())
                      for a, w in zip(adapters, weights) if a in m.lora_A] for m in (modules[n] for n in group)]
            if combination_type == "cat":
                lora_a = torch.cat([w * s * a for w, s, a, _ in parts[0]], dim=0)
                for name, module_parts in zip(group, parts):
                    entries[name] = (lora_a, torch.cat([b for *_, b in module_parts], dim=1), 1.0)
            else:
                rank = svd_rank or max(a.shape[0] for w, s, a, b in parts[0])
                delta = torch.cat([sum(w * s * (b.double() @ a.double()) for w, s, a, b in mp) for mp in parts])
                u, sv, vh = torch.linalg.svd(delta, full_matrices=False)
                rank = min(rank, sv.shape[0])
                lora_a = vh[:rank].float()
                b_all = (u[:, :rank] * sv[:rank]).float()
                for name, b in zip(group, b_all.split([modules[n].out_features for n in group])):
                    entries[name] = (lora_a, b, 1.0)
        ranks = {e[0].shape[0] for e in entries.values()}
        config = LoraConfig(r=max(ranks), lora_alpha=max(ranks), target_modules=sorted(entries))
        self._install(adapter_name, config, entries, trainable=True)

    # ---- merge ------------------------------------------------------------------------------

    def merge_adapter(self, adapter_name: str | None = None) -> None:
        """Fold the adapter (default: the active one) into the base weights: no extra cost per token.

        Merging into float16/bfloat16 weights rounds W + ΔW to that dtype (a relative error of
        at most 2⁻¹¹ / 2⁻⁸ per weight, the dtype's own precision); unmerge_adapter() still gives
        the original weights back bit for bit. Quantized (int8) layers and an lm_head tied to the
        embedding are refused with an error naming the module."""
        adapter_name = adapter_name or self._state.active
        if adapter_name is None:
            raise ValueError("merge_adapter: this model has no adapter")
        self._check_known(adapter_name)
        if self._state.merged is not None:
            raise RuntimeError(f"adapter {self._state.merged!r} is already merged; unmerge_adapter() first")
        targets = [m for m in self.lora_modules().values() if adapter_name in m.lora_A]
        for module in targets:
            module.check_mergeable()
            if module.module_name == "lm_head" and self.config.tie_word_embeddings:
                raise ValueError("merge_adapter: cannot merge into module lm_head: it shares its weight with the "
                                 "token embedding (tie_word_embeddings), which merging would change too")
        for module in targets:
            module.merge(adapter_name)
        self._state.merged = adapter_name
        self._state.active = adapter_name
        self._refresh_trainable()

    def unmerge_adapter(self) -> None:
        """Restore the base weights exactly as they were before merge_adapter()."""
        for module in self.lora_modules().values():
            module.unmerge()
        self._state.merged = None

    @property
    def merged_adapter(self) -> str | None:
        return self._state.merged

    def unload(self) -> Model:
        """Remove every LoRA layer (restoring the base modules, unmerged) and return the base model."""
        self.unmerge_adapter()
        return self._unwrap_all()

    def merge_and_unload(self) -> Model:
        """Merge the active adapter for good and return the plain base model."""
        if self._state.merged is None:
            self.merge_adapter()
        for module in self.lora_modules().values():
            module._merge = None
        return self._unwrap_all()

    def _unwrap_all(self) -> Model:
        wrapped = [(n, m) for n, m in self.model.named_modules() if isinstance(m, LoraLinear)]
        for name, module in wrapped:
            parent_name, _, child = name.rpartition(".")
            parent = self.model.get_submodule(parent_name) if parent_name else self.model
            if isinstance(module, LoraSlice):
                delattr(parent, child)  # its adapters were computed by the fused layer
            else:
                setattr(parent, child, module.base)
        self.peft_config.clear()
        self._state.active = self._state.merged = None
        return self.model

    # ---- parameters ---------------------------------------------------------------------------

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable parameters, all parameters), shared tensors counted once (PEFT's name)."""
        params = list(self.parameters())
        return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)

    def trainable_parameters_summary(self) -> str:
        trainable, total = self.get_nb_trainable_parameters()
        percent = 100 * trainable / total
        return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {percent:.4f}"

    # ---- forward ------------------------------------------------------------------------------

    @property
    def adapters_disabled(self) -> bool:
        return self._state.disabled

    def disable_adapter_layers(self) -> None:
        """Run the plain base model until :meth:`enable_adapter_layers` (PEFT's name)."""
        if self._state.merged is not None:
            raise RuntimeError(f"adapter {self._state.merged!r} is merged; unmerge_adapter() to run the base model")
        self._state.disabled = True

    def enable_adapter_layers(self) -> None:
        self._state.disabled = False

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the plain base model inside the block."""
        if self._state.merged is not None:
            raise RuntimeError(f"adapter {self._state.merged!r} is merged; unmerge_adapter() to run the base model")
        previous, self._state.disabled = self._state.disabled, True
        try:
            yield
        finally:
            self._state.disabled = previous

    def forward(self, input_ids: torch.Tensor | None = None, *, adapter_names: Sequence[str] | None = None,
                **kwargs) -> torch.Tensor:
        """The model's forward (same arguments); ``adapter_names`` gives one adapter per row
        (``"__base__"``: none), equal to running each row with its own adapter active."""
        rows = self._row_default if adapter_names is None else list(adapter_names)
        if rows is None:
            return self.model(input_ids, **kwargs)
        batch = (input_ids if input_ids is not None else kwargs.get("inputs_embeds")).shape[0]
        if adapter_names is None:
            rows = rows_for_batch(rows, batch)
        if len(rows) != batch:
            raise ValueError(f"adapter_names has {len(rows)} names for a batch of {batch} rows")
        for name in set(rows) - {BASE_ADAPTER}:
            self._check_known(name)
        distinct = sorted(set(rows) - {BASE_ADAPTER})
        state = self._state
        if state.merged is not None and rows != [state.merged] * batch:
            raise RuntimeError(f"adapter {state.merged!r} is merged into the base weights; unmerge_adapter() "
                               "before running rows with other adapters")
        if not distinct:
            with self.disable_adapter():
                return self.model(input_ids, **kwargs)
        if len(distinct) == 1 and BASE_ADAPTER not in rows:
            previous, state.active = state.active, distinct[0]
            try:
                return self.model(input_ids, **kwargs)
            finally:
                state.active = previous
        key = (tuple(rows), self.device)
        if key not in self._row_index:  # built once per batch composition: no host-to-device copy per step
            if len(self._row_index) >= 256:
                self._row_index.clear()
            self._row_index[key] = torch.tensor([distinct.index(n) if n != BASE_ADAPTER else -1 for n in rows],
                                                device=self.device)
        state.row_names, state.row_index = distinct, self._row_index[key]
        try:
            return self.model(input_ids, **kwargs)
        finally:
            state.row_names = state.row_index = None


def _device_of(module: nn.Module) -> torch.device:
    tensor = next(iter(module.parameters()), None)
    if tensor is None:
        tensor = next(iter(module.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def _adapter_dtype(module: nn.Module) -> torch.dtype:
    """Adapters train in float32 on half-precision or quantized bases (PEFT's autocast_adapter_dtype),
    else in the base weight's dtype."""
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dtype in (torch.float32, torch.float64):
        return weight.dtype
    return torch.float32
