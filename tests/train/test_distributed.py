"""Two processes with gloo (DDP, and FSDP2) give the losses of one process on the same global
batch, and their checkpoints resume like single-process ones."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

import fastlm
from tests.distributed_env import torchrun_env

ARGS = ["--vocab-size", "300", "--seq-len", "32", "--batch-size", "4", "--no-progress", "--device", "cpu",
        "--warmup-steps", "1", "--max-steps", "6", "--schedule", "constant"]  # constant: --max-steps may grow on resume


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "c.txt"
    path.write_text(Path(fastlm.__file__).with_name("model.py").read_text() * 4)
    return path


def _run(corpus, out, nproc, *extra):
    launcher = [sys.executable, "-m", "fastlm"] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "-m", "fastlm"]
    command = [*launcher, "pretrain", "--data", str(corpus), *ARGS, "--out", str(out), *extra]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=torchrun_env())
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def single(corpus, tmp_path_factory):
    """Losses of one process: 6 steps, then 2 more resumed from the step-6 checkpoint."""
    out = tmp_path_factory.mktemp("single")
    first = _run(corpus, out, 1)
    return first, _run(corpus, out, 1, "--resume", "--max-steps", "8")


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_match_one(corpus, single, tmp_path, mode):
    extra = ["--fsdp"] if mode == "fsdp" else []
    first, resumed = single
    assert _run(corpus, tmp_path, 2, *extra) == pytest.approx(first, abs=2e-5)
    # The 2-process checkpoint (gathered from shards under FSDP) resumes like the 1-process one.
    assert _run(corpus, tmp_path, 2, "--resume", "--max-steps", "8", *extra) == pytest.approx(resumed, abs=2e-5)
    model = fastlm.from_pretrained(tmp_path / "checkpoints" / "step-00000008")
    assert model.config.vocab_size == 300
