"""Worker of test_hf_distributed: one training step of a patched transformers Llama under DDP or
FSDP2 (gloo, CPU), run by torchrun; rank 0 saves the loss and the full gradients."""

from __future__ import annotations

import datetime
import os
import sys

import torch
import torch.distributed as dist

import fastlm.integrations.transformers as fi
from tests.integrations.hf_models import batch, build


def main(mode: str, out: str) -> None:
    # a collective that waits longer than this (a stuck peer) raises instead of hanging the test run
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    ids, mask, labels = batch(batch_size=4, length=10, seed=9, padding=None)
    shard = slice(rank * 4 // world, (rank + 1) * 4 // world)
    model = fi.apply(build("llama", attn="sdpa"))
    model.train()
    device = torch.device("cpu")
    if mode == "ddp":
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
    else:
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        wrapped = fully_shard(model)
    inputs = {"input_ids": ids[shard], "attention_mask": mask[shard], "labels": labels[shard]}
    assert all(t.device == device for t in inputs.values())  # what the collectives see lives on the training device
    loss = wrapped(**inputs).loss
    loss.backward()
    grads = {}
    for name, p in model.named_parameters():
        g = p.grad
        grads[name] = g.full_tensor() if hasattr(g, "full_tensor") else g
    losses = [torch.zeros(()) for _ in range(world)]
    dist.all_gather(losses, loss.detach())
    if rank == 0:
        torch.save({"loss": torch.stack(losses).mean(), "grads": grads}, out)
    dist.barrier()
    dist.destroy_process_group()
    # Leave without the interpreter's teardown: DDP's reducer still holds the gloo group, and its
    # destruction at exit joins gloo's threads while this thread holds the GIL one of them waits
    # for (a worker deadlocked so in CI, in ~ProcessGroupGloo under ~Reducer).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
