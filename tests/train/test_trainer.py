"""The training engine: learning, exact resume, NaN handling, schedules, metrics and plots."""

import json
import math

import pytest
import torch

from fastlm import Model, ModelConfig
from fastlm.train import PackedSource, Trainer, TrainerConfig
from fastlm.train import checkpoint as ckpt

CONFIG = ModelConfig(vocab_size=40, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                     max_position_embeddings=64)


def _stream(n=3000, seed=0):
    g = torch.Generator().manual_seed(seed)
    pattern = torch.randint(1, 40, (29,), generator=g)
    return pattern.repeat(n // 29 + 1)[:n]


def _trainer(tmp_path, steps=8, **overrides):
    torch.manual_seed(0)
    model = Model(CONFIG)
    source = PackedSource(_stream(), seq_len=16, batch_size=4, seed=0)
    val = PackedSource(_stream(seed=0)[:400], seq_len=16, batch_size=4, seed=1)
    options = dict(out=str(tmp_path), max_steps=steps, batch_size=4, lr=1e-2, warmup_steps=2, progress=False,
                   eval_batches=2, device="cpu")
    options.update(overrides)
    return Trainer(model, source, TrainerConfig(**options), val_source=val)


def test_loss_falls_and_everything_is_written(tmp_path):
    result = _trainer(tmp_path, steps=40).fit()
    assert result.losses[-1] < result.losses[0] / 3
    assert result.val_perplexity < 3.0
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == list(range(1, 41))
    assert {"loss", "lr", "tokens_per_s", "grad_norm"} <= set(lines[0]) and "val_loss" in lines[-1]
    assert (tmp_path / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in ckpt.complete_checkpoints(tmp_path)] == ["step-00000040"]


def test_resume_continues_exactly(tmp_path):
    straight = _trainer(tmp_path / "a", steps=10).fit().losses
    _trainer(tmp_path / "b", steps=10, save_every=3).fit(stop_at=6)
    resumed = _trainer(tmp_path / "b", steps=10, save_every=3).fit(resume=True)
    assert resumed.start_step == 6
    assert resumed.losses == straight[6:]  # bit-identical on CPU
    logged = [json.loads(x)["loss"] for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert logged == straight


def test_resume_drops_metrics_after_the_checkpoint(tmp_path):
    _trainer(tmp_path, steps=5, save_every=3).fit(stop_at=4)
    # step 4's checkpoint exists too (the last step run is always saved); remove it to mimic a kill
    ckpt._remove(tmp_path / "checkpoints" / "step-00000004")
    result = _trainer(tmp_path, steps=5, save_every=3).fit(resume=True)
    assert result.start_step == 3
    steps = [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]


def test_resume_without_checkpoint_warns_and_starts_fresh(tmp_path, caplog):
    result = _trainer(tmp_path, steps=2).fit(resume=True)
    assert result.start_step == 0 and "no checkpoint" in caplog.text


def test_keep_last_prunes_old_checkpoints_and_ignores_partial_ones(tmp_path):
    _trainer(tmp_path, steps=6, save_every=1, keep_last=2).fit()
    assert [p.name for p in ckpt.complete_checkpoints(tmp_path)] == ["step-00000005", "step-00000006"]
    partial = tmp_path / "checkpoints" / "step-00000009"
    partial.mkdir()  # a directory without the COMPLETE marker is never resumed from
    (tmp_path / "checkpoints" / ".tmp-step-00000010-abcd").mkdir()
    assert ckpt.latest_checkpoint(tmp_path).name == "step-00000006"
    _trainer(tmp_path, steps=6, keep_last=2).fit(resume=True)  # the same max_steps: a changed one is refused
    assert not (tmp_path / "checkpoints" / ".tmp-step-00000010-abcd").exists()


def test_nan_loss_stops_without_checkpoint(tmp_path):
    trainer = _trainer(tmp_path, steps=4, save_every=1)
    with torch.no_grad():
        trainer.model.embed.weight[5:8] = float("nan")
    with pytest.raises(FloatingPointError, match="at step 1"):
        trainer.fit()
    assert ckpt.complete_checkpoints(tmp_path) == []


def test_nan_loss_can_be_skipped(tmp_path, caplog):
    trainer = _trainer(tmp_path, steps=3, nan_policy="skip")
    with torch.no_grad():
        trainer.model.embed.weight[:] = float("nan")
    result = trainer.fit()
    assert all(math.isnan(x) for x in result.losses) and "update skipped" in caplog.text


def test_grad_accumulation_equals_a_larger_batch(tmp_path):
    one = _trainer(tmp_path / "a", steps=3, batch_size=4, grad_accum=1)
    two = _trainer(tmp_path / "b", steps=3, batch_size=2, grad_accum=2)
    # the same rows per step: the 4-row batch k is the pair of 2-row micro-batches 2k, 2k + 1
    two.train_source = PackedSource(_stream(), seq_len=16, batch_size=2, seed=0)
    a, b = one.fit().losses, two.fit().losses
    torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains(tmp_path, precision):
    result = _trainer(tmp_path, steps=12, precision=precision).fit()
    assert all(math.isfinite(x) for x in result.losses) and result.losses[-1] < result.losses[0]


def test_activation_checkpointing_gives_the_same_losses(tmp_path):
    a = _trainer(tmp_path / "a", steps=3).fit().losses
    b = _trainer(tmp_path / "b", steps=3, activation_checkpointing=True).fit().losses
    torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=1e-6, rtol=1e-6)


def test_schedules():
    cosine = TrainerConfig(max_steps=100, warmup_steps=10, min_lr_ratio=0.1)
    assert cosine.lr_factor(0) == pytest.approx(0.1) and cosine.lr_factor(9) == pytest.approx(1.0)
    assert cosine.lr_factor(55) == pytest.approx(0.55) and cosine.lr_factor(100) == pytest.approx(0.1)
    linear = TrainerConfig(max_steps=100, warmup_steps=0, min_lr_ratio=0.0, schedule="linear")
    assert linear.lr_factor(50) == pytest.approx(0.5)
    assert TrainerConfig(schedule="constant", warmup_steps=0).lr_factor(500) == 1.0


@pytest.mark.parametrize(
    "field,value",
    [("max_steps", 0), ("batch_size", -1), ("lr", 0.0), ("precision", "fp8"), ("schedule", "step"),
     ("nan_policy", "ignore"), ("betas", (0.9, 1.5)), ("save_every", -1)],
)
def test_trainer_config_validation(field, value):
    with pytest.raises(ValueError, match=f"TrainerConfig.{field}"):
        TrainerConfig(**{field: value})


def test_fused_loss_gives_the_same_training(tmp_path):
    a = _trainer(tmp_path / "a", steps=4).fit().losses
    b = _trainer(tmp_path / "b", steps=4, fused_loss=True).fit().losses
    torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=1e-5, rtol=1e-5)
