"""`fastlm distill` end to end on a tiny corpus: logits mode on text and on prompt/completion rows,
sequence mode (the teacher's completions are what fastlm.generate gives), resume checks, and
refused inputs (one line naming the flag)."""

import json
import logging

import pytest
import torch

import fastlm
from fastlm.align.distill import COMPLETIONS_FILE
from fastlm.cli import console_main, main
from fastlm.config import ModelConfig
from fastlm.model import Model
from fastlm.train import checkpoint as ckpt
from tests.cli.conftest import TEXT, make_checkpoint, write_jsonl


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A 2-layer teacher with its BPE tokenizer, a 1-layer student sharing it, and a corpus."""
    root = tmp_path_factory.mktemp("distill")
    teacher = make_checkpoint(root / "teacher")
    tokenizer = fastlm.load_tokenizer(teacher)
    config = ModelConfig(arch="llama", vocab_size=tokenizer.vocab_size, hidden_size=16, num_layers=1, num_heads=2,
                         intermediate_size=32, max_position_embeddings=64, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(1)
    Model(config).save_pretrained(root / "student")
    tokenizer.save(root / "student")
    corpus = root / "corpus.txt"
    corpus.write_text(TEXT * 3)
    return root


TRAIN = ["--max-steps", "3", "--batch-size", "2", "--seq-len", "24", "--device", "cpu", "--no-progress",
         "--eval-batches", "1"]


def test_logits_mode_on_a_corpus(pair, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["distill", "--teacher", str(pair / "teacher"), "--student", str(pair / "student"), "--data",
            str(pair / "corpus.txt"), "--out", str(out), "--temperature", "3", "--alpha", "0.25", *TRAIN]
    assert main(argv) == 0
    assert "validation loss" in capsys.readouterr().out
    latest = ckpt.latest_checkpoint(out)
    model = fastlm.from_pretrained(latest)
    assert model.config.num_layers == 1 and model.config.hidden_size == 16  # the student was saved
    assert fastlm.load_tokenizer(latest).vocab_size == fastlm.load_tokenizer(pair / "teacher").vocab_size
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3] and "val_perplexity" in lines[-1]
    settings = json.loads((out / "run.json").read_text())["settings"]
    assert settings["command"] == "distill" and settings["alpha"] == 0.25 and settings["temperature"] == 3.0
    # resuming with another loss is refused, naming the flag
    assert console_main([*argv[:-len(TRAIN)], *TRAIN[:1], "4", *TRAIN[2:], "--resume", "--alpha", "0.5"]) == 2
    assert "--alpha is 0.5 now, 0.25 in the run" in capsys.readouterr().err


def test_logits_mode_on_prompt_completions_with_a_preset_student(pair, tmp_path):
    rows = [{"prompt": f"def f{i}(a, b):", "completion": f"\n    return a + {i}"} for i in range(12)]
    data = write_jsonl(tmp_path / "sft.jsonl", rows)
    out = tmp_path / "run"
    assert main(["distill", "--teacher", str(pair / "teacher"), "--preset", "tiny", "--data", str(data),
                 "--out", str(out), "--divergence", "jsd", "--jsd-beta", "0.3", "--max-steps", "1",
                 "--batch-size", "2", "--seq-len", "24", "--device", "cpu", "--no-progress"]) == 0
    model = fastlm.from_pretrained(ckpt.latest_checkpoint(out))
    teacher_vocab = fastlm.load_tokenizer(pair / "teacher").vocab_size
    assert model.config.hidden_size == 256 and model.config.vocab_size == teacher_vocab  # tiny, on the teacher's
    settings = json.loads((out / "run.json").read_text())["settings"]
    assert settings["data_format"] == "prompt-completion" and settings["template"] == "plain"


def test_sequence_mode_trains_on_the_teachers_greedy_completions(pair, tmp_path):
    prompts = ["def add(a, b):", "class Point:", "    return"]
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in prompts])
    out = tmp_path / "run"
    assert main(["distill", "--teacher", str(pair / "teacher"), "--student", str(pair / "student"), "--data",
                 str(data), "--mode", "sequence", "--max-new-tokens", "6", "--gen-batch-size", "2", "--out",
                 str(out), "--val-fraction", "0.3", *TRAIN]) == 0
    rows = [json.loads(x) for x in (out / COMPLETIONS_FILE).read_text().splitlines()]
    teacher, tokenizer = fastlm.from_pretrained(pair / "teacher"), fastlm.load_tokenizer(pair / "teacher")
    for row, prompt in zip(rows, prompts, strict=True):
        ids = tokenizer.encode(prompt, add_bos=True)
        alone = fastlm.generate(teacher, torch.tensor([ids]), max_new_tokens=6, eos_token_id=tokenizer.eos_token_id)
        assert row == {"prompt": prompt, "completion": tokenizer.decode(alone[0, len(ids):].tolist(),
                                                                        skip_special_tokens=True)}
    assert ckpt.latest_checkpoint(out) is not None
    assert json.loads((out / "run.json").read_text())["settings"]["mode"] == "sequence"


@pytest.mark.parametrize("extra,message", [
    (["--alpha", "1.5"], "--alpha must be in [0, 1]"),
    (["--temperature", "0"], "--temperature must be > 0"),
    (["--top-k", "5"], "--top-k applies to the teacher's completions of --mode sequence"),
    (["--mode", "sequence", "--top-p", "0.9"], "--top-p applies to sampled completions: add --do-sample"),
    (["--seq-len", "100"], "--seq-len 100 exceeds the student's context of 64"),
    (["--template", "alpaca"], "--template and --truncation apply to prompt/completion data"),
    (["--mode", "sequence"], "corpus.txt:1: not valid JSON"),
    (["--jsd-beta", "1"], "--jsd-beta must be in (0, 1)"),
])
def test_bad_options_are_one_line_errors(pair, tmp_path, capsys, extra, message):
    argv = ["distill", "--teacher", str(pair / "teacher"), "--student", str(pair / "student"), "--data",
            str(pair / "corpus.txt"), "--out", str(tmp_path / "run"), "--device", "cpu", *extra]
    assert console_main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()  # refused before any work


def test_a_student_with_another_vocabulary_is_refused(pair, tmp_path, capsys):
    other = make_checkpoint(tmp_path / "other", vocab_size=270)
    sizes = [fastlm.load_tokenizer(d).vocab_size for d in (pair / "teacher", other)]
    assert sizes[0] != sizes[1]
    argv = ["distill", "--teacher", str(pair / "teacher"), "--student", str(other), "--data",
            str(pair / "corpus.txt"), "--out", str(tmp_path / "run"), "--device", "cpu", "--seq-len", "24"]
    assert console_main(argv) == 2
    assert f"teacher's vocabulary has {sizes[0]} ids and the student's {sizes[1]}" in capsys.readouterr().err


def test_sequence_mode_resumes_on_the_same_completions(pair, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="fastlm.align.distill")
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in ("def add(a, b):", "class Point:")] * 3)
    out = tmp_path / "run"
    base = ["distill", "--teacher", str(pair / "teacher"), "--student", str(pair / "student"), "--data", str(data),
            "--mode", "sequence", "--max-new-tokens", "5", "--do-sample", "--seed", "3", "--out", str(out),
            "--schedule", "constant", "--seq-len", "24", "--batch-size", "2", "--device", "cpu", "--no-progress"]
    assert main([*base, "--max-steps", "2"]) == 0
    written = (out / COMPLETIONS_FILE).read_bytes()
    assert main([*base, "--max-steps", "3", "--resume"]) == 0
    assert "using the teacher's completions" in caplog.text
    assert (out / COMPLETIONS_FILE).read_bytes() == written
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    again = tmp_path / "again"  # sampling with the same seed gives the same completions
    assert main([*base, "--out", str(again), "--max-steps", "1"]) == 0  # the last --out wins
    assert (again / COMPLETIONS_FILE).read_bytes() == written


def test_read_prompts(tmp_path):
    from fastlm.align.distill import read_prompts

    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "old answer"}]
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "completion": "ignored"}, {"messages": chat}])
    assert read_prompts(path) == ["a", chat[:1]]
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a"}, {"text": "b"}])
    with pytest.raises(ValueError, match=r"bad.jsonl:2: expected \{\"prompt\": str\}"):
        read_prompts(bad)
