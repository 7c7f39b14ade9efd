"""The fastlm command: the demo job end to end (small), pretrain/finetune options and config
files, generate from a checkpoint, info."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastlm
from fastlm.cli import main
from fastlm.train import checkpoint as ckpt

SMALL = ["--vocab-size", "320", "--batch-size", "2", "--seq-len", "32"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(Path(fastlm.__file__).with_name("model.py").read_text() * 3)
    return path


@pytest.fixture(scope="module")
def demo_checkpoint(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--corpus", str(corpus), "--out", str(out), "--steps", "4", *SMALL,
                 "--max-new-tokens", "8"]) == 0
    return ckpt.latest_checkpoint(out)


def test_demo_writes_a_loadable_checkpoint_with_its_tokenizer(demo_checkpoint):
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in demo_checkpoint.iterdir()}
    model = fastlm.from_pretrained(demo_checkpoint)
    tokenizer = fastlm.load_tokenizer(demo_checkpoint)
    assert model.config.vocab_size == tokenizer.vocab_size == 320
    assert model.config.eos_token_id == tokenizer.eos_token_id
    assert (demo_checkpoint.parent.parent / "loss_curve.png").is_file()


def test_demo_reports_perplexity_and_a_sample(tmp_path, capsys):
    corpus = tmp_path / "c.txt"
    corpus.write_text("hello world, this is a tiny corpus for a tiny model.\n" * 50)
    main(["demo", "--corpus", str(corpus), "--out", str(tmp_path / "o"), "--steps", "2", "--vocab-size", "300",
          "--batch-size", "2", "--seq-len", "16", "--max-new-tokens", "4"])
    out = capsys.readouterr().out
    assert "validation loss" in out and "perplexity" in out and "--- sample ---" in out


def test_generate_command(demo_checkpoint, capsys):
    base = ["generate", "--model", str(demo_checkpoint), "--prompt", "def ", "--max-new-tokens", "6"]
    assert main([*base, "--greedy"]) == 0
    streamed = capsys.readouterr().out
    model, tokenizer = fastlm.from_pretrained(demo_checkpoint), fastlm.load_tokenizer(demo_checkpoint)
    expected = fastlm.generate(model, torch.tensor([tokenizer.encode("def ")]), max_new_tokens=6,
                               eos_token_id=tokenizer.eos_token_id)
    assert streamed == tokenizer.decode(expected[0].tolist(), skip_special_tokens=True) + "\n"
    for extra in (["--greedy", "--num-beams", "2"], ["--penalty-alpha", "0.5", "--top-k", "3", "--greedy"],
                  ["--draft-model", str(demo_checkpoint)], ["--top-p", "0.9", "--stop", "x"]):
        assert main([*base, *extra]) == 0
        assert capsys.readouterr().out.startswith("def ")
    assert main([*base, "--greedy", "--compile"]) == 0  # the compiled decode step streams the same text
    assert capsys.readouterr().out == streamed
    with pytest.raises(ValueError, match="--compile works with greedy and sampling"):
        main([*base, "--greedy", "--compile", "--num-beams", "2"])


def test_transformers_loads_the_demo_checkpoint(demo_checkpoint):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(demo_checkpoint).eval()
    ours = fastlm.from_pretrained(demo_checkpoint)
    ids = torch.randint(0, 320, (1, 12))
    with torch.no_grad():
        assert (hf(ids).logits - ours(ids)).abs().max().item() <= 1e-4


def test_pretrain_with_a_toml_config_file(corpus, tmp_path):
    config = tmp_path / "run.toml"
    config.write_text('max-steps = 3\nlr = 0.002\nschedule = "linear"\nseq_len = 32\nbatch_size = 2\n'
                      'vocab_size = 300\nno_such_option_here = 1\n')
    with pytest.raises(ValueError, match="unknown option.*no_such_option_here"):
        main(["pretrain", "--data", str(corpus), "--config", str(config), "--out", str(tmp_path / "o")])
    config.write_text(config.read_text().replace("no_such_option_here = 1\n", ""))
    out = tmp_path / "o"
    # the command line wins over the file (max-steps 2, not 3)
    assert main(["pretrain", "--data", str(corpus), "--config", str(config), "--out", str(out), "--max-steps", "2",
                 "--no-progress"]) == 0
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    # the default warmup is min(100, 10% of --max-steps): none for 2 steps, so step 1 runs at lr
    assert [x["step"] for x in lines] == [1, 2] and lines[0]["lr"] == pytest.approx(0.002)


def test_finetune_command(demo_checkpoint, tmp_path):
    data = tmp_path / "sft.jsonl"
    rows = [{"prompt": f"{i} + 1 =", "completion": f" {i + 1}"} for i in range(20)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "ft"
    assert main(["finetune", "--data", str(data), "--model", str(demo_checkpoint), "--out", str(out),
                 "--max-steps", "3", "--batch-size", "2", "--seq-len", "32", "--no-progress"]) == 0
    final = ckpt.latest_checkpoint(out)
    assert final.name == "step-00000003" and (final / "tokenizer.json").is_file()
    lora_out = tmp_path / "lora"
    assert main(["finetune", "--data", str(data), "--model", str(demo_checkpoint), "--out", str(lora_out),
                 "--max-steps", "2", "--batch-size", "2", "--seq-len", "32", "--no-progress", "--method", "lora",
                 "--lora-r", "4"]) == 0
    adapter = ckpt.latest_checkpoint(lora_out)
    assert (adapter / "adapter_config.json").is_file()
    assert main(["generate", "--model", str(demo_checkpoint), "--adapter", str(adapter), "--prompt", "1 + 1 =",
                 "--max-new-tokens", "3", "--greedy"]) == 0
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    with pytest.raises(ValueError, match='bad.jsonl:1: expected {"prompt": str, "completion": str}'):
        main(["finetune", "--data", str(bad), "--model", str(demo_checkpoint), "--out", str(out)])


def test_quantize_then_generate(demo_checkpoint, tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["quantize", str(demo_checkpoint), str(out), "--mode", "int8_weight_only"]) == 0
    assert main(["generate", "--model", str(out), "--prompt", "def ", "--max-new-tokens", "4", "--greedy"]) == 0
    assert "def " in capsys.readouterr().out
    # from_pretrained loads the quantized checkpoint (as load_quantized), and save_pretrained of a
    # quantized model writes one again, with identical outputs.
    quantized = fastlm.quant.load_quantized(out)
    loaded = fastlm.from_pretrained(out)
    ids = torch.tensor([[5, 9, 2, 7]])
    with torch.no_grad():
        expected = quantized(ids)
        assert torch.equal(loaded(ids), expected)
        loaded.save_pretrained(tmp_path / "again")
        assert torch.equal(fastlm.from_pretrained(tmp_path / "again")(ids), expected)


def test_python_dash_m_and_info():
    result = subprocess.run([sys.executable, "-m", "fastlm", "info"], capture_output=True, text=True, check=True)
    assert "reference" in result.stdout and "fastlm" in result.stdout
    bad = subprocess.run([sys.executable, "-m", "fastlm", "nope"], capture_output=True, text=True)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr
    missing = subprocess.run([sys.executable, "-m", "fastlm", "pretrain", "--data", "/no/such/file.txt"],
                             capture_output=True, text=True)
    assert missing.returncode == 2 and "fastlm: error:" in missing.stderr and "/no/such/file.txt" in missing.stderr
    assert "Traceback" not in missing.stderr
