"""`fastlm distill` on two processes (torchrun, gloo, DDP) gives the losses of one process on the
same global batch: the teacher runs in each process, outside DDP, and the student's gradients
(its untied head included, used outside the DDP forward) are averaged."""

import json
import os
import subprocess
import sys

import pytest
import torch

import fastlm
from fastlm.config import ModelConfig
from fastlm.model import Model
from tests.cli.conftest import TEXT, make_checkpoint


def _run(root, out, nproc):
    launcher = [sys.executable, "-m", "fastlm"] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "-m", "fastlm"]
    command = [*launcher, "distill", "--teacher", str(root / "teacher"), "--student", str(root / "student"),
               "--data", str(root / "corpus.txt"), "--out", str(out), "--seq-len", "24", "--batch-size", "4",
               "--max-steps", "4", "--warmup-steps", "1", "--no-progress", "--device", "cpu", "--alpha", "0.7"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    teacher = make_checkpoint(tmp_path / "teacher")
    tokenizer = fastlm.load_tokenizer(teacher)
    config = ModelConfig(arch="llama", vocab_size=tokenizer.vocab_size, hidden_size=16, num_layers=1, num_heads=2,
                         intermediate_size=32, max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(1)
    Model(config).save_pretrained(tmp_path / "student")
    (tmp_path / "corpus.txt").write_text(TEXT * 3)
    one = _run(tmp_path, tmp_path / "one", 1)
    two = _run(tmp_path, tmp_path / "two", 2)
    assert len(one) == 4 and one[-1] < one[0]
    assert two == pytest.approx(one, abs=2e-5)
