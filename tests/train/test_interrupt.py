"""SIGINT and SIGTERM during training (a real process): the last completed step is saved, one
line says how to resume, exit status 130 / 143; a second Ctrl-C exits at once, leaving every
checkpoint intact; --resume then finishes the run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import fastlm
from fastlm.train import checkpoint as ckpt
from tests.cli.conftest import TEXT

ROOT = str(Path(fastlm.__file__).resolve().parents[1])


def _command(corpus, out, steps):
    return [sys.executable, "-m", "fastlm", "pretrain", "--data", str(corpus), "--vocab-size", "300", "--seq-len",
            "16", "--batch-size", "2", "--max-steps", str(steps), "--no-progress", "--device", "cpu", "--out",
            str(out), "--eval-batches", "1"]


def _start(corpus, out, steps):
    env = {**os.environ, "PYTHONPATH": ROOT}
    return subprocess.Popen(_command(corpus, out, steps), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)


def _wait_for_steps(out, count, process, timeout=120):
    deadline = time.monotonic() + timeout
    metrics = Path(out) / "metrics.jsonl"
    while time.monotonic() < deadline:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= count:
            return
        assert process.poll() is None, process.communicate()
        time.sleep(0.01)
    raise AssertionError("training did not start")


def _steps(out):
    return [json.loads(line)["step"] for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_saves_the_last_step_and_says_how_to_resume(tmp_path, sig, code):
    corpus = tmp_path / "c.txt"
    corpus.write_text(TEXT * 3)
    out = tmp_path / "run"
    process = _start(corpus, out, 400)
    _wait_for_steps(out, 3, process)
    process.send_signal(sig)  # lands in the middle of a step (steps take nearly all the time)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == code, stderr
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(f"fastlm: stopped by {signal.Signals(sig).name} after step ") and "--resume" in last
    step = int(last.split("after step ")[1].split(",")[0])
    assert _steps(out)[-1] == step and step < 400
    saved = ckpt.latest_checkpoint(out)
    assert saved.name == f"step-{step:08d}" and ckpt.verify_checkpoint(saved) is None
    assert str(saved) in last
    if sig == signal.SIGTERM:
        return
    # --resume continues from that step (stopped again after a few steps: --max-steps may not change)
    env = {**os.environ, "PYTHONPATH": ROOT}
    again = subprocess.Popen(_command(corpus, out, 400) + ["--resume"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env)
    _wait_for_steps(out, step + 2, again)
    again.send_signal(signal.SIGINT)
    _, stderr = again.communicate(timeout=120)
    assert again.returncode == 130, stderr
    steps = _steps(out)
    assert steps == list(range(1, steps[-1] + 1)) and steps[-1] > step  # contiguous: nothing lost or repeated


def test_second_ctrl_c_exits_at_once_and_corrupts_nothing(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text(TEXT * 3)
    out = tmp_path / "run"
    process = _start(corpus, out, 400)
    _wait_for_steps(out, 2, process)
    process.send_signal(signal.SIGINT)
    time.sleep(0.005)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    for path in ckpt.complete_checkpoints(out):  # whatever was saved is whole
        assert ckpt.verify_checkpoint(path) is None
