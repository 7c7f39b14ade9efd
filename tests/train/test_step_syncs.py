"""The training step on a GPU: collectives on the training device, one device→host read per step.

Two things a CPU run cannot show by itself. (1) NCCL refuses CPU tensors, but gloo on CPU takes
anything: so the step runs with its training device set to ``meta`` (a non-CPU device every torch
has) with ``dist.all_reduce`` replaced by a recorder, and every tensor handed to it must be on
that device. (2) Reads of device values stall a GPU: they are counted (tests/host_reads.py).
"""

import contextlib
import math

import pytest
import torch
import torch.distributed as dist

from fastlm import Model, ModelConfig
from fastlm.train import PackedSource, Trainer, TrainerConfig
from fastlm.train import distributed
from tests.host_reads import HostReads

CONFIG = ModelConfig(vocab_size=40, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                     max_position_embeddings=64)


def _stream(n=3000):
    return (torch.arange(n) * 7 % 39 + 1).long()


def _trainer(tmp_path, **overrides):
    torch.manual_seed(0)
    options = dict(out=str(tmp_path), max_steps=4, batch_size=4, lr=1e-2, warmup_steps=1, progress=False,
                   eval_batches=2, device="cpu", grad_accum=2)
    options.update(overrides)
    return Trainer(Model(CONFIG), PackedSource(_stream(), seq_len=16, batch_size=4, seed=0),
                   TrainerConfig(**options), val_source=PackedSource(_stream(400), seq_len=16, batch_size=4, seed=1))


@contextlib.contextmanager
def _recorded_collectives(monkeypatch):
    """dist looks initialized; every collective records its tensors (and reduces nothing)."""
    seen = []

    def record(name):
        def collective(tensor, *args, **kwargs):
            seen.append((name, tensor))
        return collective

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    for name in ("all_reduce", "broadcast", "reduce", "all_gather_into_tensor", "reduce_scatter_tensor"):
        monkeypatch.setattr(dist, name, record(name))
    monkeypatch.setattr(dist, "barrier", lambda *a, **k: None)
    yield seen


def test_collectives_get_tensors_on_the_training_device(tmp_path, monkeypatch):
    trainer = _trainer(tmp_path)  # (the fused loss asks autocast about the device, which meta is not)
    trainer._build()
    meta = torch.device("meta")  # stands for "cuda": not the CPU, and runs everywhere
    trainer.info = distributed.DistInfo(device=meta)
    trainer.model.to(meta)
    trainer._timer.restart()
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: [1.0] * t.numel())  # meta holds no values
    with _recorded_collectives(monkeypatch) as seen:
        trainer._step(0)
        trainer._eval_totals(trainer._fetch_eval())
    assert [name for name, _ in seen] == ["all_reduce", "all_reduce"]  # one per step, one per evaluation
    assert all(t.device == meta for _, t in seen), [(n, t.device) for n, t in seen]


def test_all_reduce_refuses_a_tensor_off_the_training_device():
    with pytest.raises(ValueError, match="training device meta"):
        distributed.all_reduce_sum(torch.zeros(2), torch.device("meta"))


@pytest.mark.parametrize("fused_loss", [False, True])
def test_one_host_read_per_training_step(tmp_path, fused_loss):
    trainer = _trainer(tmp_path, fused_loss=fused_loss)
    trainer._build()
    trainer._timer.restart()
    reads = []
    for step in range(3):
        batches = trainer._fetch(step)  # the data boundary: host batches checked on the host
        with HostReads() as counter:
            loss, grad_norm, _ = trainer._run_step(step, batches)
        reads.append(counter.where)
        assert math.isfinite(loss) and math.isfinite(grad_norm)
    assert all(len(r) == 1 for r in reads), reads
    batches = trainer._fetch_eval()
    with HostReads() as counter:
        trainer._eval_totals(batches).tolist()
    assert counter.count == 1, counter.where


def test_the_data_boundary_rejects_out_of_range_ids(tmp_path):
    trainer = _trainer(tmp_path)
    trainer._build()

    class Bad:
        def batch(self, i, rank=0, world_size=1):
            ids = torch.full((2, 8), 5)
            labels = ids.clone()
            labels[0, 3] = 40  # == vocab_size
            return {"input_ids": ids, "labels": labels}

    trainer.train_source = Bad()
    with pytest.raises(ValueError, match=r"labels must be in \[0, 40\)"):
        trainer._step(0)


def test_the_loss_and_gradients_match_a_plain_pytorch_step(tmp_path):
    """The post-scaled gradients (constant scale in backward, 1/(a·T) after) are the mean loss's
    gradients: with SGD(lr=1) the update equals -∇ of F.cross_entropy over the whole step."""
    trainer = _trainer(tmp_path, grad_clip=0.0)
    trainer._build()
    trainer.optimizer = torch.optim.SGD(trainer.model.parameters(), lr=1.0)
    trainer.scheduler = torch.optim.lr_scheduler.LambdaLR(trainer.optimizer, lambda step: 1.0)
    reference = Model(CONFIG)
    reference.load_state_dict(trainer.model.state_dict())
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer._timer.restart()
    batches = trainer._fetch(0)
    for batch, _ in batches:  # some ignored targets: T differs from the nominal count
        batch["labels"][0, :5] = -100
    batches = [(b, int((b["labels"] != -100).sum())) for b, _ in batches]
    loss, _, _ = trainer._run_step(0, batches)
    logits = torch.cat([reference(b["input_ids"]).flatten(0, 1) for b, _ in batches])
    labels = torch.cat([b["labels"].flatten() for b, _ in batches])
    expected = torch.nn.functional.cross_entropy(logits, labels)
    expected.backward()
    assert loss == pytest.approx(expected.item(), rel=1e-5)
    for (name, p), q in zip(trainer.model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(before[name] - p.detach(), q.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_fused_loss_defaults_to_cuda_only(tmp_path):
    trainer = _trainer(tmp_path)
    trainer._build()
    assert trainer.config.fused_loss is None and not trainer._fused  # CPU: logits + cross_entropy
    trainer.info = distributed.DistInfo(device=torch.device("cuda", 0))
    assert trainer._use_fused_loss()


def test_the_head_weight_is_cast_once_per_optimizer_step(tmp_path):
    trainer = _trainer(tmp_path, fused_loss=True)
    trainer._build()
    first = trainer._head_weight(torch.bfloat16)
    assert trainer._head_weight(torch.bfloat16) is first  # the next micro-batch reuses it
    trainer._optimizer_steps += 1
    assert trainer._head_weight(torch.bfloat16) is not first
