"""Shared fixtures: one tiny random Llama saved as a Hugging Face checkpoint with a BPE tokenizer
(loadable by fastlm, transformers and lm-evaluation-harness), and a second one for comparisons."""

import json

import pytest
import torch

import fastlm
from fastlm.data import HFTokenizer

CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "Water boils at one hundred degrees. Ice melts at zero degrees.",
    "A cat sat on the mat, and the dog slept by the door.",
    "Numbers: one, two, three, four, five, six, seven, eight, nine, ten.",
    "Naïve café owners in Zürich serve crème brûlée — très bien! 東京 😀",
] * 4


def build_checkpoint(directory, seed: int = 0, vocab: int = 300):
    """A 2-layer GQA Llama (every parameter perturbed) and its tokenizer in ``directory``."""
    tokenizer = HFTokenizer.train_bpe(CORPUS, vocab_size=vocab)
    config = fastlm.ModelConfig(arch="llama", vocab_size=tokenizer.vocab_size, hidden_size=32, num_layers=2,
                                num_heads=4, num_kv_heads=2, intermediate_size=48, max_position_embeddings=96,
                                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = fastlm.Model(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.15)
    model.save_pretrained(directory)
    tokenizer.save(directory)
    return model, tokenizer


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny_llama")
    build_checkpoint(directory)
    return directory


@pytest.fixture(scope="session")
def checkpoint2(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny_llama_b")
    build_checkpoint(directory, seed=1)
    return directory


@pytest.fixture(scope="session")
def hf_model(checkpoint):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


MC_ROWS = [
    {"context": "The capital of France is", "choices": ["Paris.", "Rome.", "ten."], "gold": 0},
    {"context": "Water boils at one hundred", "choices": ["degrees.", "cats", "the door"], "gold": 0},
    {"context": "A cat sat on the", "choices": ["mat", "capital of Italy", "six"], "gold": 1},
    {"context": "Numbers: one, two,", "choices": ["three", "four, five", "Zürich"], "gold": 0},
    {"context": "Ice melts at", "choices": ["zero degrees.", "Paris", "the dog slept"], "gold": 2},
    {"context": "Naïve café", "choices": ["owners", "crème brûlée", "東京 😀"], "gold": 1},
]
