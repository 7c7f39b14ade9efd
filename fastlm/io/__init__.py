"""Checkpoint I/O in the Hugging Face format."""

from fastlm.io.checkpoint import atomic_write, from_pretrained, load_config, save_pretrained
from fastlm.io.hf_format import CheckpointError

__all__ = ["CheckpointError", "atomic_write", "from_pretrained", "load_config", "save_pretrained"]
