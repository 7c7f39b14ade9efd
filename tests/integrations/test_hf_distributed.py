"""A patched transformers model under DDP and FSDP2 (two gloo processes on CPU) gives the loss
and gradients of the unpatched model on the whole batch in one process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.distributed_env import ROOT, torchrun_env
from tests.integrations.hf_models import batch, build


def kill_workers(marker: str) -> None:
    """SIGKILL the processes whose command line holds ``marker`` (torchrun's workers run in
    their own process groups, so killing torchrun's group leaves them)."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if marker in cmdline.read_bytes().decode(errors="replace"):
                os.kill(int(cmdline.parent.name), signal.SIGKILL)
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue  # gone meanwhile, or not ours


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_two_processes_match_one(tmp_path, mode):
    out = tmp_path / "rank0.pt"
    env = torchrun_env()
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "tests.integrations.ddp_worker", mode, str(out)]
    log = tmp_path / "torchrun.log"  # a file, not a pipe: a lingering worker cannot keep the test reading
    with open(log, "w") as sink:
        proc = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
                                start_new_session=True)
        try:
            proc.wait(timeout=300)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            kill_workers(str(out))
            proc.wait()
            pytest.fail(f"torchrun {mode} did not finish in 300 s; its output ends with:\n{log.read_text()[-4000:]}")
    assert proc.returncode == 0, log.read_text()[-4000:]
    got = torch.load(out)

    ids, mask, labels = batch(batch_size=4, length=10, seed=9, padding=None)
    model = build("llama", attn="sdpa")
    model.train()
    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    torch.testing.assert_close(got["loss"], loss.detach(), rtol=1e-5, atol=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(got["grads"][name], p.grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
