"""Nothing lost, nothing silent: re-running into a used --out, resuming with changed settings,
damaged checkpoints, over-long fine-tuning examples."""

import json
import logging
from pathlib import Path

import pytest
import torch

import fastlm
from fastlm.cli import main
from fastlm.data import HFTokenizer
from fastlm.io import CheckpointError
from fastlm.train import TrainerConfig, checkpoint as ckpt, pretrain
from fastlm.train.data import IGNORE_INDEX, encode_example, encode_examples
from fastlm.train.rundir import ResumeMismatchError, RunDirectoryError
from tests.cli.conftest import TEXT, make_checkpoint, write_jsonl


def _config(out, **overrides):
    options = dict(out=str(out), max_steps=4, batch_size=2, lr=1e-3, progress=False, device="cpu", save_every=2,
                   keep_last=3, eval_batches=1)
    return TrainerConfig(**{**options, **overrides})


def _pretrain(out, data, resume=False, overwrite=False, **overrides):
    return pretrain(_config(out, **overrides), data=[str(data)], vocab_size=300, seq_len=16, resume=resume,
                    overwrite=overwrite)


def _steps(out):
    return [json.loads(line)["step"] for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def _losses(out):
    return {r["step"]: r["loss"] for r in map(json.loads, (Path(out) / "metrics.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "a.txt"
    path.write_text(TEXT * 3)
    return path


def _tree(root):
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in Path(root).rglob("*")}


def test_rerun_into_a_used_out_is_refused_then_overwrite_replaces_it(corpus, tmp_path):
    out = tmp_path / "run"
    _pretrain(out, corpus, max_steps=6, save_every=2)
    before = _tree(out)
    with pytest.raises(RunDirectoryError, match="--resume|resume"):
        _pretrain(out, corpus, max_steps=2, save_every=1)
    assert _tree(out) == before  # nothing touched
    # --overwrite: the old run (steps up to 6) is gone; keep_last counts only the new run's checkpoints
    _pretrain(out, corpus, overwrite=True, max_steps=2, save_every=1, keep_last=1)
    assert [p.name for p in ckpt.complete_checkpoints(out)] == ["step-00000002"]
    assert _steps(out) == [1, 2]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # the renamed-away old run is deleted


def test_keep_last_never_prunes_a_newer_step(tmp_path):
    def write(directory):
        (directory / ckpt.STATE_FILE).write_bytes(b"state")

    for step in (8, 2):  # a leftover higher step, then a new lower one
        ckpt.write_checkpoint(tmp_path, step, write, keep_last=1)
    assert [p.name for p in ckpt.complete_checkpoints(tmp_path)] == ["step-00000002", "step-00000008"]


def test_resume_uses_the_runs_tokenizer_and_refuses_changed_data(corpus, tmp_path, monkeypatch, caplog):
    out = tmp_path / "run"
    from fastlm.train.trainer import Trainer

    original_fit = Trainer.fit
    monkeypatch.setattr(Trainer, "fit", lambda self, resume=False, stop_at=None: original_fit(self, resume=resume,
                                                                                               stop_at=2))
    _pretrain(out, corpus)  # stopped after step 2 of 4, as a time-limited job
    monkeypatch.setattr(Trainer, "fit", original_fit)
    tokenizer_before = (out / "tokenizer" / "tokenizer.json").read_text()

    changed = tmp_path / "changed.txt"
    changed.write_text(TEXT.replace("Point", "Vector") * 3)
    with pytest.raises(ResumeMismatchError, match="content of the data differs"):
        _pretrain(out, changed, resume=True)
    with pytest.raises(ResumeMismatchError, match=r"max_steps is 8 now, 4 in the run"):
        _pretrain(out, corpus, resume=True, max_steps=8)  # would reshape the cosine schedule mid-run
    with pytest.raises(ResumeMismatchError, match="batch_size"):
        _pretrain(out, corpus, resume=True, batch_size=4)
    assert _steps(out) == [1, 2]

    def no_training(*args, **kwargs):
        raise AssertionError("the tokenizer was retrained on resume")

    monkeypatch.setattr(HFTokenizer, "train_bpe", staticmethod(no_training))
    with caplog.at_level(logging.WARNING):
        output = _pretrain(out, corpus, resume=True, eval_every=1)  # a reported change: used, with a warning
    assert "eval_every is 1 now, 0 in the run" in caplog.text
    assert output.result.start_step == 2 and _steps(out) == [1, 2, 3, 4]
    assert (out / "tokenizer" / "tokenizer.json").read_text() == tokenizer_before


@pytest.mark.parametrize("damage", ["truncated", "zero-bytes", "garbage-header", "state-missing"])
def test_damaged_latest_checkpoint_falls_back_to_the_newest_intact_one(corpus, tmp_path, damage, caplog):
    straight = tmp_path / "straight"
    _pretrain(straight, corpus, max_steps=4, save_every=2)
    out = tmp_path / "run"
    _pretrain(out, corpus, max_steps=4, save_every=2)
    latest = out / "checkpoints" / "step-00000004"
    weights = latest / "model.safetensors"
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:-100])
    elif damage == "zero-bytes":
        weights.write_bytes(b"")
    elif damage == "garbage-header":
        weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + weights.read_bytes()[24:])
    else:
        (latest / ckpt.STATE_FILE).unlink()
    assert ckpt.verify_checkpoint(latest) is not None
    with caplog.at_level(logging.WARNING):
        output = _pretrain(out, corpus, resume=True)
    assert "step-00000004 is damaged" in caplog.text and "resuming from step-00000002" in caplog.text
    assert output.result.start_step == 2
    assert (out / "checkpoints" / "damaged-step-00000004").is_dir()  # kept for inspection
    assert [p.name for p in ckpt.complete_checkpoints(out)] == ["step-00000002", "step-00000004"]
    assert ckpt.verify_checkpoint(out / "checkpoints" / "step-00000004") is None
    assert _losses(out) == _losses(straight)  # steps 3-4 redone exactly


def test_every_checkpoint_damaged_is_an_error(corpus, tmp_path):
    out = tmp_path / "run"
    _pretrain(out, corpus, max_steps=2, save_every=2)
    (out / "checkpoints" / "step-00000002" / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="every checkpoint .* is damaged"):
        _pretrain(out, corpus, resume=True, max_steps=2, save_every=2)


def test_a_checkpoint_that_does_not_verify_prunes_nothing(tmp_path):
    def good(directory):
        (directory / ckpt.STATE_FILE).write_bytes(b"state")

    def bad(directory):
        good(directory)
        (directory / "model.safetensors").write_bytes(b"")

    ckpt.write_checkpoint(tmp_path, 1, good, keep_last=1)
    with pytest.raises(OSError, match="does not verify"):
        ckpt.write_checkpoint(tmp_path, 2, bad, keep_last=1)
    assert (tmp_path / "checkpoints" / "step-00000001").is_dir()


def test_checkpoint_files_share_permissions_and_the_manifest(corpus, tmp_path):
    out = tmp_path / "run"
    _pretrain(out, corpus, max_steps=2, save_every=2)
    latest = ckpt.latest_checkpoint(out)
    modes = {p.name: p.stat().st_mode & 0o777 for p in latest.iterdir()}
    assert len(set(modes.values())) == 1, modes
    manifest = json.loads((latest / ckpt.MARKER).read_text())["files"]
    assert set(manifest) == set(modes) - {ckpt.MARKER}


# ---- fine-tuning examples longer than --seq-len ----------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    return HFTokenizer.train_bpe([TEXT], vocab_size=300)


def test_over_long_examples_are_counted_and_left_truncation_keeps_the_completion(tokenizer, caplog):
    pairs = [("short", " yes"), ("word " * 40, " yes"), ("x", " yes" * 20)]
    with caplog.at_level(logging.WARNING):
        examples, report = encode_examples(tokenizer, pairs, "plain", 16, source="sft.jsonl")
    assert (report.total, report.truncated, report.dropped) == (3, 1, 1) and len(examples) == 2
    assert "sft.jsonl: 1 of 3 examples truncated to seq_len 16 (the end of the completion cut), 1 dropped" \
        in caplog.text
    examples, report = encode_examples(tokenizer, pairs, "plain", 16, truncation="left")
    assert report.dropped == 0 and report.truncated == 2
    ids, targets = encode_example(tokenizer, "word " * 40, " yes", "plain", 16, truncation="left")
    answer = tokenizer.encode(" yes", add_eos=True)
    assert len(ids) <= 17 and ids[-len(answer):] == answer and targets[-len(answer):] == answer
    if tokenizer.bos_token_id is not None:
        assert ids[0] == tokenizer.bos_token_id  # the prompt is cut after its BOS
    assert targets[: len(ids) - len(answer)] == [IGNORE_INDEX] * (len(ids) - len(answer))
    with pytest.raises(ValueError, match="all 1 examples of x.jsonl are dropped.*truncation"):
        encode_examples(tokenizer, pairs[1:2], "plain", 16, source="x.jsonl")


def test_finetune_reports_and_left_truncation_from_the_command_line(tmp_path, caplog):
    model = make_checkpoint(tmp_path / "model")
    data = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "1 +", "completion": " 2"}] * 5  # the first is held out
                       + [{"prompt": "word " * 40, "completion": " yes"}] * 3)
    base = ["finetune", "--data", str(data), "--model", str(model), "--seq-len", "16", "--batch-size", "2",
            "--max-steps", "1", "--no-progress", "--device", "cpu"]
    with caplog.at_level(logging.WARNING):
        assert main([*base, "--out", str(tmp_path / "right")]) == 0
    assert "3 dropped" in caplog.text and "--seq-len 16" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert main([*base, "--out", str(tmp_path / "left"), "--truncation", "left"]) == 0
    assert "3 of 7 examples truncated to --seq-len 16 (the start of the prompt cut), 0 dropped" in caplog.text
    # the checkpoint records the template it learned, for `fastlm generate --chat`
    final = ckpt.latest_checkpoint(tmp_path / "left")
    assert json.loads((final / "prompt_template.json").read_text()) == {"template": "plain"}


def test_adapter_records_its_base_model(tmp_path):
    model = make_checkpoint(tmp_path / "model")
    data = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": f"{i} +", "completion": f" {i}"} for i in range(6)])
    assert main(["finetune", "--data", str(data), "--model", str(model), "--seq-len", "16", "--batch-size", "2",
                 "--max-steps", "1", "--no-progress", "--device", "cpu", "--method", "lora", "--lora-r", "2",
                 "--out", str(tmp_path / "lora")]) == 0
    adapter = ckpt.latest_checkpoint(tmp_path / "lora")
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(model.resolve())
    assert fastlm.from_pretrained(config["base_model_name_or_path"]) is not None
    with pytest.raises(CheckpointError, match="PEFT adapter.*its base model: " + str(model.resolve())):
        fastlm.from_pretrained(adapter)
    assert torch.is_tensor(fastlm.from_pretrained(model).embed.weight)
