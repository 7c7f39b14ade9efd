"""`fastlm reward` and `fastlm dpo` end to end on a tiny byte-level checkpoint: outputs that
transformers / fastlm load, LoRA variants, exact resume of a LoRA reward run, and bad input
refused with messages naming the flag or file:line."""

import json

import pytest
import torch

from fastlm.align import load_reward_model
from fastlm.align import synthetic as syn
from fastlm.align.data import PairSource, load_pairs
from fastlm.align.reward import RewardModel, RewardTrainer
from fastlm.cli import main
from fastlm.config import ModelConfig
from fastlm.data import ByteTokenizer
from fastlm.model import Model
from fastlm.peft import LoraConfig, LoraModel
from fastlm.train.trainer import TrainerConfig

FAST = ["--max-steps", "2", "--batch-size", "4", "--seq-len", "24", "--no-progress", "--eval-batches", "1"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("prefs")
    tok = ByteTokenizer()
    config = ModelConfig(arch="llama", vocab_size=tok.vocab_size, hidden_size=32, num_layers=1, num_heads=4,
                         num_kv_heads=2, intermediate_size=64, max_position_embeddings=32,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    Model(config).save_pretrained(root / "model")
    tok.save(root / "model")
    ranks = root / "ranks.jsonl"
    ranks.write_text("".join(json.dumps(r) + "\n" for r in syn.ranking_rows(20, k=3, seed=0)))
    pairs = root / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in syn.pair_rows(20, seed=0)))
    return root


def test_reward_command_writes_a_sequence_classification_model(files, tmp_path, capsys):
    out = tmp_path / "rm"
    assert main(["reward", "--data", str(files / "ranks.jsonl"), "--model", str(files / "model"), "--out", str(out),
                 "--method", "lora", "--lora-r", "4", *FAST]) == 0
    printed = capsys.readouterr().out
    assert "held-out pairwise accuracy" in printed
    final = out / "checkpoints" / "step-00000002"
    config = json.loads((final / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"] and config["num_labels"] == 1
    rm = load_reward_model(final)
    assert len(rm.score(["Q1:"], ["02468024\n"], ByteTokenizer())) == 1
    assert json.loads((out / "reward_eval.json").read_text())["held_out_pairs"] > 0


@pytest.mark.parametrize("extra", [["--loss", "ipo"], ["--method", "lora", "--lora-r", "4"]])
def test_dpo_command(files, tmp_path, capsys, extra):
    out = tmp_path / "dpo"
    assert main(["dpo", "--data", str(files / "pairs.jsonl"), "--model", str(files / "model"), "--out", str(out),
                 *FAST, *extra]) == 0
    assert "reward accuracy" in capsys.readouterr().out
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 and "rewards/margins" in records[-1]
    final = out / "checkpoints" / "step-00000002"
    assert (final / ("adapter_model.safetensors" if "lora" in extra else "model.safetensors")).is_file()


def test_bad_inputs_are_named(files, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "Q1:", "completions": ["1\n", "2\n"], "ranking": [1, 1, 2]}) + "\n"
                   + json.dumps({"prompt": "Q1:", "chosen": "2\n", "rejected": "1\n"}) + "\n")
    base = ["--model", str(files / "model"), "--out", str(tmp_path / "o"), *FAST]
    with pytest.raises(ValueError, match=rf"(?s)--on-bad-row skip.*{bad}:1: ranking has 3 entries for 2 completions"):
        main(["reward", "--data", str(bad), *base])
    with pytest.raises(ValueError, match="--beta must be a number > 0"):
        main(["dpo", "--data", str(files / "pairs.jsonl"), "--beta", "0", *base])
    with pytest.raises(ValueError, match="reference-free"):
        main(["dpo", "--data", str(files / "pairs.jsonl"), "--loss", "simpo", "--reference", "precompute", *base])
    with pytest.raises(FileNotFoundError, match="--data"):
        main(["dpo", "--data", str(tmp_path / "missing.jsonl"), *base])


def test_lora_reward_training_resumes_exactly(files, tmp_path):
    tok = ByteTokenizer()
    examples, _ = load_pairs(files / "ranks.jsonl", tok, template="plain", max_len=24)

    def run(out, **fit):
        torch.manual_seed(0)
        from fastlm.io import from_pretrained

        rm = RewardModel(LoraModel(from_pretrained(files / "model", dtype=torch.float32),
                                   LoraConfig(r=4, target_modules=["q_proj", "v_proj"])))
        config = TrainerConfig(out=str(out), max_steps=4, batch_size=4, lr=1e-2, warmup_steps=0, progress=False)
        return RewardTrainer(rm, PairSource(examples, 4, tok.pad_token_id), config).fit(**fit)

    straight = run(tmp_path / "a")
    run(tmp_path / "b", stop_at=2)
    resumed = run(tmp_path / "b", resume=True)
    assert resumed.start_step == 2
    assert resumed.losses == pytest.approx(straight.losses[2:], rel=1e-6, abs=1e-7)
