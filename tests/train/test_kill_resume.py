"""kill -9 at a random moment, then --resume: the run finishes with exactly the losses of an
uninterrupted one, and no partial checkpoint is ever picked up."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import fastlm
from fastlm.train import checkpoint as ckpt

ARGS = ["--vocab-size", "300", "--seq-len", "32", "--batch-size", "4", "--no-progress", "--device", "cpu",
        "--warmup-steps", "2", "--max-steps", "20", "--save-every", "2", "--keep-last", "2"]


def _command(corpus, out, *extra):
    return [sys.executable, "-m", "fastlm", "pretrain", "--data", str(corpus), *ARGS, "--out", str(out), *extra]


def _losses(out):
    return [(r["step"], r["loss"]) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]


def test_kill_then_resume(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text(Path(fastlm.__file__).with_name("model.py").read_text() * 4)
    straight = tmp_path / "straight"
    subprocess.run(_command(corpus, straight), check=True, capture_output=True, timeout=300)

    killed = tmp_path / "killed"
    process = subprocess.Popen(_command(corpus, killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not ckpt.complete_checkpoints(killed) and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(random.uniform(0.0, 0.5))  # somewhere in the middle of training or of a save
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert ckpt.latest_checkpoint(killed) is not None

    resumed = subprocess.run(_command(corpus, killed, "--resume"), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _losses(killed) == _losses(straight)
    assert [p.name for p in ckpt.complete_checkpoints(killed)] == ["step-00000018", "step-00000020"]
    assert not [p for p in (killed / "checkpoints").iterdir() if p.name.startswith(".")]
    fastlm.from_pretrained(killed / "checkpoints" / "step-00000020")
