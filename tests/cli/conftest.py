"""Small checkpoints and data files for the command-line tests (built in about a second)."""

import json

import pytest
import torch

from fastlm.config import ModelConfig
from fastlm.data import HFTokenizer
from fastlm.model import Model

TEXT = "def add(a, b):\n    return a + b\n\nclass Point:\n    x: int = 0\n    y: int = 0\n" * 20


def make_checkpoint(directory, *, vocab_size=300, context=64):
    """A 2-layer llama-style checkpoint with its BPE tokenizer in ``directory``."""
    tokenizer = HFTokenizer.train_bpe([TEXT], vocab_size=vocab_size)
    config = ModelConfig(arch="llama", vocab_size=tokenizer.vocab_size, hidden_size=32, num_layers=2, num_heads=4,
                         num_kv_heads=2, intermediate_size=64, max_position_embeddings=context,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    Model(config).save_pretrained(directory)
    tokenizer.save(directory)
    return directory


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def text_corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_text(TEXT * 3)
    return path
