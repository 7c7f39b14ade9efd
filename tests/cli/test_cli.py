"""The fastlm command: the demo job end to end (small), generate from its checkpoint, info."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastlm
from fastlm.cli import main


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    corpus = out / "corpus.txt"
    corpus.write_text(Path(fastlm.__file__).with_name("model.py").read_text() * 3)
    code = main(["demo", "--corpus", str(corpus), "--out", str(out / "ckpt"), "--steps", "4", "--vocab-size", "320",
                 "--batch-size", "2", "--seq-len", "32", "--max-new-tokens", "8"])
    assert code == 0
    return out / "ckpt"


def test_demo_writes_a_loadable_checkpoint(demo_dir, capsys):
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in demo_dir.iterdir()}
    model = fastlm.from_pretrained(demo_dir)
    tokenizer = fastlm.load_tokenizer(demo_dir)
    assert model.config.vocab_size == tokenizer.vocab_size == 320
    assert model.config.eos_token_id == tokenizer.eos_token_id


def test_demo_reports_perplexity(tmp_path, capsys):
    corpus = tmp_path / "c.txt"
    corpus.write_text("hello world, this is a tiny corpus for a tiny model.\n" * 50)
    main(["demo", "--corpus", str(corpus), "--out", str(tmp_path / "o"), "--steps", "2", "--vocab-size", "300",
          "--batch-size", "2", "--seq-len", "16", "--max-new-tokens", "4"])
    out = capsys.readouterr().out
    assert "validation loss" in out and "perplexity" in out and "--- sample ---" in out


def test_generate_command(demo_dir, capsys):
    assert main(["generate", "--model", str(demo_dir), "--prompt", "def ", "--max-new-tokens", "5", "--greedy"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("def ")


def test_transformers_loads_the_demo_checkpoint(demo_dir):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(demo_dir).eval()
    ours = fastlm.from_pretrained(demo_dir)
    ids = torch.randint(0, 320, (1, 12))
    with torch.no_grad():
        assert (hf(ids).logits - ours(ids)).abs().max().item() <= 1e-4


def test_python_dash_m_and_info():
    result = subprocess.run([sys.executable, "-m", "fastlm", "info"], capture_output=True, text=True, check=True)
    assert "reference" in result.stdout and "fastlm" in result.stdout
    bad = subprocess.run([sys.executable, "-m", "fastlm", "nope"], capture_output=True, text=True)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr
