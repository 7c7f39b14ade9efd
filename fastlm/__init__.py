"""fastlm: fast kernels and a thin PyTorch runtime for decoder-only language models.

>>> import fastlm
>>> model = fastlm.Model(fastlm.preset("tiny"))
>>> out = fastlm.generate(model, input_ids, max_new_tokens=16)
"""

from fastlm import ops
from fastlm.config import PRESETS, ModelConfig, preset
from fastlm.cache import KVCache, PagedKVCache
from fastlm.model import Model
from fastlm.ops import available_backends, use_backend
from fastlm.io import CheckpointError, from_pretrained, load_config, save_pretrained
from fastlm.generate import generate, generate_stream
from fastlm.data import ByteTokenizer, HFTokenizer, Tokenizer, load_tokenizer
from fastlm import peft, quant
from fastlm.quant import quantize

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "ByteTokenizer",
    "CheckpointError",
    "HFTokenizer",
    "KVCache",
    "Model",
    "PagedKVCache",
    "ModelConfig",
    "Tokenizer",
    "available_backends",
    "from_pretrained",
    "generate",
    "generate_stream",
    "load_config",
    "load_tokenizer",
    "ops",
    "peft",
    "preset",
    "quant",
    "quantize",
    "save_pretrained",
    "use_backend",
]
