"""bench/quant_accuracy.py end to end on a tiny random checkpoint and a tiny corpus: the held-out
split is pretrain's validation split, the rows cover every variant, the files are written."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # `bench` is a repo-root package, not an installed one
    sys.path.insert(0, str(REPO))

import fastlm  # noqa: E402
from bench import quant_accuracy  # noqa: E402
from fastlm.data import ByteTokenizer, read_texts, split_train_val  # noqa: E402
from fastlm.train import pretrain_texts  # noqa: E402


@pytest.fixture()
def corpus(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i in range(6):
        (folder / f"doc{i}.txt").write_text(f"def f{i}(x):\n    return x * {i} + {i * i}\n" * 12)
    return folder


def test_pretrain_texts_is_pretrains_split(corpus):
    train, val = pretrain_texts([str(corpus)], val_fraction=0.34, seed=3)
    assert (train, val) == split_train_val(read_texts([str(corpus)]), val_fraction=0.34, seed=3)
    assert len(val) == 2 and not set(train) & set(val)


def test_helpers():
    model = fastlm.Model(fastlm.ModelConfig(arch="llama", vocab_size=64, hidden_size=48, num_layers=1, num_heads=4,
                                            intermediate_size=80, max_position_embeddings=32))
    assert quant_accuracy.default_group_size(model) == 16  # gcd(48, 80) = 16
    windows = quant_accuracy.calibration_windows(torch.arange(100), 4, 10)
    assert windows.shape == (4, 10) and windows[0, 0] == 0 and windows[-1, -1] == 99
    with pytest.raises(ValueError, match="calibration"):
        quant_accuracy.calibration_windows(torch.arange(5), 2, 10)


def test_end_to_end(tmp_path, corpus):
    tokenizer = ByteTokenizer()
    torch.manual_seed(0)
    config = fastlm.ModelConfig(arch="llama", vocab_size=tokenizer.vocab_size, hidden_size=32, num_layers=1,
                                num_heads=2, intermediate_size=64, max_position_embeddings=64,
                                tie_word_embeddings=True)
    ckpt = tmp_path / "ckpt"
    fastlm.save_pretrained(fastlm.Model(config), ckpt)
    tokenizer.save(ckpt)
    out = tmp_path / "results"
    args = ["--model", str(ckpt), "--data", str(corpus), "--val-fraction", "0.34", "--seed", "3", "--seq-len", "16",
            "--batch-size", "4", "--max-batches", "1", "--calibration-windows", "2", "--smooth-alphas", "0.5", "0.8",
            "--out", str(out)]
    assert quant_accuracy.main(args) == 0
    payload = json.loads((out / "quant_accuracy.json").read_text())
    rows = payload["records"]
    assert [r["variant"] for r in rows] == [
        "float32", "bfloat16", "int8_weight_only", "w8a8", "w8a8_smoothquant",  # per channel, alpha 0.5
        "int8_weight_only",  # group 32 = largest power of two <= 128 dividing 32 and 64
        "w8a8_smoothquant",  # alpha 0.8
        "int8_weight_only", "w8a8", "w8a8_smoothquant", "int8_weight_only",  # head quantized
    ]
    assert [r["group_size"] for r in rows if r["variant"] == "int8_weight_only"] == [None, 32, None, 32]
    assert [r["smooth_alpha"] for r in rows if r["variant"] == "w8a8_smoothquant"] == [0.5, 0.8, 0.5]
    assert [r["include_head"] for r in rows][-4:] == [True] * 4
    baseline = rows[1]["perplexity"]
    assert all(r["delta_pct"] == pytest.approx(100 * (r["perplexity"] - baseline) / baseline) for r in rows)
    _, val = pretrain_texts([str(corpus)], val_fraction=0.34, seed=3)
    meta = payload["meta"]
    assert meta["heldout_tokens"] == sum(len(tokenizer.encode(t)) + 1 for t in val)  # + eos per document
    assert meta["evaluated_tokens"] == 4 * 16 and payload["env"]["device"] == "cpu"
    assert meta["training"] is None  # no trainer_state.pt in this checkpoint
    assert meta["activation_outliers"]["max"] >= 1 and meta["activation_outliers"]["layer"]
    md = (out / "quant_accuracy.md").read_text()
    assert "| variant |" in md and "int8 weight-only:" in md and "W8A8:" in md
