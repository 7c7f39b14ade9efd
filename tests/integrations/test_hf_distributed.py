"""A patched transformers model under DDP and FSDP2 (two gloo processes on CPU) gives the loss
and gradients of the unpatched model on the whole batch in one process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import torch

from tests.distributed_env import ROOT, torchrun_env
from tests.integrations.hf_models import batch, build



@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_two_processes_match_one(tmp_path, mode):
    out = tmp_path / "rank0.pt"
    env = torchrun_env()
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "tests.integrations.ddp_worker", mode, str(out)]
    # its own session: on a timeout the whole group (torchrun and both workers) is killed, no worker lingers
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env,
                            start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, stderr = proc.communicate()
        pytest.fail(f"torchrun {mode} did not finish in 300 s; its stderr ends with:\n{stderr[-4000:]}")
    assert proc.returncode == 0, stderr[-4000:]
    got = torch.load(out)

    ids, mask, labels = batch(batch_size=4, length=10, seed=9, padding=None)
    model = build("llama", attn="sdpa")
    model.train()
    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    torch.testing.assert_close(got["loss"], loss.detach(), rtol=1e-5, atol=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(got["grads"][name], p.grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
