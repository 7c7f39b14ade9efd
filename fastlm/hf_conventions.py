"""The Hugging Face conventions on the model object: adapters and ``save_pretrained``.

:class:`HFModelMixin` gives :class:`fastlm.Model` the methods transformers' models offer:

    model.load_adapter("peft_dir", adapter_name="sql")   # PEFT's files (LoRA)
    model.add_adapter(fastlm.peft.LoraConfig(...), adapter_name="new")
    model.set_adapter("sql"); model.active_adapters()    # -> ["sql"]
    model.disable_adapters(); model.enable_adapters()
    model.delete_adapter("sql")                          # the last one restores the plain layers
    model.save_pretrained(dir)

The model itself still knows nothing of LoRA or quantization (the layering rule: peft and quant
wrap or replace the model's layers from outside): every method imports ``fastlm.peft``,
``fastlm.quant`` or ``fastlm.io`` when called. Adapters live in a :class:`fastlm.peft.LoraModel`
kept on the model (not as a submodule); its LoRA layers replace the targeted linear layers in
place, so ``model(...)`` and ``fastlm.generate(model, ...)`` run the active adapter, as with
transformers. As in PEFT, the base weights are frozen while adapters are loaded; removing the
last adapter restores the layers and the previous ``requires_grad`` flags.

``save_pretrained(dir)`` writes what transformers would: with adapters loaded, the active
adapter in PEFT's format (adapter_config.json + adapter_model.safetensors); for a quantized
model the quantized checkpoint (int8 weights + scales, a ``quantization`` entry in config.json,
read back by ``fastlm.from_pretrained``); otherwise the Hugging Face checkpoint.
"""

from __future__ import annotations

from pathlib import Path

_ADAPTERS = "_fastlm_adapters"  # the LoraModel, kept in __dict__: not a submodule (no cycle)
_FROZEN = "_fastlm_requires_grad"  # requires_grad of each parameter before the first adapter


class HFModelMixin:
    """Adapter methods and ``save_pretrained`` in transformers' form (module docstring)."""

    # ---- adapters -------------------------------------------------------------------------------

    def _adapter_model(self, create: bool = False):
        lora = self.__dict__.get(_ADAPTERS)
        if lora is None and create:
            from fastlm.peft import LoraModel

            self.__dict__[_FROZEN] = {name: p.requires_grad for name, p in self.named_parameters()}
            lora = LoraModel(self)
            self.__dict__[_ADAPTERS] = lora
        return lora

    def _require_adapters(self, method: str):
        lora = self._adapter_model()
        if lora is None or not lora.adapter_names:
            raise ValueError(f"{method}: this model has no adapter; load one with model.load_adapter(path)")
        return lora

    def load_adapter(self, path: str | Path, adapter_name: str = "default", *, is_trainable: bool = False) -> None:
        """Load the PEFT LoRA adapter directory ``path`` as ``adapter_name`` (the first adapter
        becomes the active one); frozen unless ``is_trainable``."""
        from fastlm.peft.lora_io import read_config

        kind = read_config(path).get("peft_type")
        if kind != "LORA":
            raise ValueError(f"load_adapter: {path} holds a {kind!r} adapter; model.load_adapter takes LoRA "
                             "adapters (use fastlm.peft.from_pretrained for prompt tuning)")
        lora = self._adapter_model(create=True)
        try:
            lora.load_adapter(path, adapter_name, is_trainable=is_trainable)
        except Exception:
            if not lora.adapter_names:
                self._drop_adapters()
            raise

    def add_adapter(self, adapter_config, adapter_name: str = "default") -> None:
        """A new trainable LoRA adapter from a :class:`fastlm.peft.LoraConfig` (transformers'
        ``add_adapter``)."""
        lora = self._adapter_model(create=True)
        try:
            lora.add_adapter(adapter_name, adapter_config)
        except Exception:
            if not lora.adapter_names:
                self._drop_adapters()
            raise

    def set_adapter(self, adapter_name: str) -> None:
        self._require_adapters("set_adapter").set_adapter(adapter_name)

    def active_adapters(self) -> list[str]:
        lora = self._require_adapters("active_adapters")
        return [] if lora.active_adapter is None else [lora.active_adapter]

    def delete_adapter(self, adapter_name: str) -> None:
        lora = self._require_adapters("delete_adapter")
        lora.delete_adapter(adapter_name)
        if not lora.adapter_names:
            self._drop_adapters()

    def disable_adapters(self) -> None:
        """Run the base model (adapters kept) until :meth:`enable_adapters`."""
        self._require_adapters("disable_adapters").disable_adapter_layers()

    def enable_adapters(self) -> None:
        self._require_adapters("enable_adapters").enable_adapter_layers()

    @property
    def peft_config(self) -> dict:
        lora = self._adapter_model()
        return {} if lora is None else dict(lora.peft_config)

    def _drop_adapters(self) -> None:
        lora = self.__dict__.pop(_ADAPTERS)
        lora.unload()
        flags = self.__dict__.pop(_FROZEN, {})
        for name, p in self.named_parameters():
            if name in flags:
                p.requires_grad_(flags[name])

    # ---- saving -----------------------------------------------------------------------------------

    def save_pretrained(self, directory: str | Path, **kwargs) -> None:
        """transformers' ``save_pretrained`` (module docstring): the active adapter when adapters
        are loaded, the quantized checkpoint of a quantized model, else the HF checkpoint
        (``fastlm.io.save_pretrained``, whose keyword arguments pass through)."""
        lora = self._adapter_model()
        if lora is not None and lora.adapter_names:
            if kwargs:
                raise TypeError(f"save_pretrained with adapters saves the adapter only; unexpected {sorted(kwargs)}")
            lora.save_adapter(directory)
            return
        if self._is_quantized():
            from fastlm.quant.checkpoint import save_quantized

            if kwargs:
                raise TypeError(f"save_pretrained of a quantized model takes no options, got {sorted(kwargs)}")
            save_quantized(self, directory)
            return
        from fastlm.io import save_pretrained  # io sits above the model layer

        save_pretrained(self, directory, **kwargs)

    def _is_quantized(self) -> bool:
        from fastlm.quant.quantize import quantized_layers

        return bool(quantized_layers(self))
