"""Table-driven: the fastlm command given bad inputs. Each case asserts exit status 2, exactly one
line on stderr, no traceback, the user's flag or file named, and nothing written or deleted."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import fastlm
from fastlm.cli import console_main
from tests.cli.conftest import make_checkpoint, write_jsonl


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A workspace of good and bad inputs."""
    root = tmp_path_factory.mktemp("ws")
    model = make_checkpoint(root / "model")
    (root / "run" / "checkpoints").mkdir(parents=True)
    shutil.copytree(model, root / "run" / "checkpoints" / "step-00000002")
    (root / "run" / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n')
    (root / "adapter").mkdir()
    (root / "adapter" / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 2, "base_model_name_or_path": str(model)}))
    save_file({"x": torch.zeros(2)}, root / "adapter" / "adapter_model.safetensors")
    for name in ("truncated", "zero", "garbage", "badjson"):
        shutil.copytree(model, root / name)
    weights = (root / "model" / "model.safetensors").read_bytes()
    (root / "truncated" / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    (root / "zero" / "model.safetensors").write_bytes(b"")
    (root / "garbage" / "model.safetensors").write_bytes(b"\xff" * 64)
    (root / "badjson" / "config.json").write_text('{"architectures": ["LlamaForCausalLM"],')
    (root / "corpus.txt").write_text("def f(x):\n    return x\n" * 200)
    (root / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 50)
    (root / "binary.bin").write_bytes(bytes(range(256)) * 8)
    (root / "emptydir").mkdir()
    write_jsonl(root / "sft.jsonl", [{"prompt": f"{i} + 1 =", "completion": f" {i + 1}"} for i in range(8)])
    write_jsonl(root / "long.jsonl", [{"prompt": "word " * 200, "completion": " yes"} for _ in range(4)])
    (root / "bad.jsonl").write_text('{"prompt": "x", "completion": "y"}\n{oops\n')
    (root / "binary.jsonl").write_bytes(b'{"prompt": "\xff\xfe", "completion": "y"}\n')
    (root / "badtype.toml").write_text('max_steps = "ten"\n')
    (root / "unknown.toml").write_text("max_stepz = 3\n")
    (root / "invalid.toml").write_text("max_steps = = 3\n")
    (root / "a_file").write_text("not a directory\n")
    (root / "nonempty").mkdir()
    (root / "nonempty" / "keep.txt").write_text("precious\n")
    return root


def _snapshot(root):
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            info = os.stat(path)
            found[os.path.relpath(path, root)] = (info.st_size, info.st_mtime_ns)
    return found


PRE = ["pretrain", "--data", "corpus.txt", "--vocab-size", "300", "--seq-len", "16", "--batch-size", "2",
       "--max-steps", "1", "--no-progress", "--device", "cpu", "--out", "newrun"]
FT = ["finetune", "--data", "sft.jsonl", "--model", "model", "--seq-len", "32", "--batch-size", "2",
      "--max-steps", "1", "--no-progress", "--device", "cpu", "--out", "newft"]
GEN = ["generate", "--model", "model", "--prompt", "def ", "--max-new-tokens", "2"]

CASES = [
    # (id, argv, strings the one error line must contain)
    ("seq-len-0", PRE + ["--seq-len", "0"], ["--seq-len"]),
    ("max-steps-0", PRE + ["--max-steps", "0"], ["--max-steps"]),
    ("max-steps-text", PRE + ["--max-steps", "ten"], ["--max-steps"]),
    ("batch-size-0", PRE + ["--batch-size", "0"], ["--batch-size"]),
    ("lr-0", PRE + ["--lr", "0"], ["--lr"]),
    ("lr-text", PRE + ["--lr", "fast"], ["--lr"]),
    ("warmup-negative", PRE + ["--warmup-steps", "-1"], ["--warmup-steps"]),
    ("schedule", PRE + ["--schedule", "exp"], ["--schedule"]),
    ("precision", PRE + ["--precision", "fp8"], ["--precision"]),
    ("nan-policy", PRE + ["--nan-policy", "ignore"], ["--nan-policy"]),
    ("grad-clip", PRE + ["--grad-clip", "-1"], ["--grad-clip"]),
    ("weight-decay", PRE + ["--weight-decay", "-0.1"], ["--weight-decay"]),
    ("min-lr-ratio", PRE + ["--min-lr-ratio", "2"], ["--min-lr-ratio"]),
    ("keep-last-0", PRE + ["--keep-last", "0"], ["--keep-last"]),
    ("eval-batches-0", PRE + ["--eval-batches", "0"], ["--eval-batches"]),
    ("device-tpu", PRE + ["--device", "tpu"], ["--device"]),
    ("fsdp-no-torchrun", PRE + ["--fsdp"], ["--fsdp", "torchrun"]),
    ("preset", PRE + ["--preset", "huge"], ["--preset", "huge"]),
    ("vocab-size", PRE + ["--vocab-size", "10"], ["--vocab-size"]),
    ("val-fraction", PRE + ["--val-fraction", "1.5"], ["--val-fraction"]),
    ("seq-len-over-context", PRE + ["--seq-len", "100000"], ["--seq-len"]),
    ("document-masking-mlm", PRE + ["--objective", "mlm", "--document-masking"], ["--document-masking"]),
    ("objective", PRE + ["--objective", "seq2seq"], ["--objective"]),
    ("tokenizer-missing", PRE + ["--tokenizer", "no_tokenizer.json"], ["--tokenizer", "no_tokenizer.json"]),
    ("data-missing", PRE + ["--data", "missing.txt"], ["missing.txt"]),
    ("data-binary", PRE + ["--data", "binary.bin"], ["binary.bin", "UTF-8"]),
    ("data-latin1", PRE + ["--data", "latin1.txt"], ["latin1.txt", "--on-bad-file"]),
    ("data-empty-dir", PRE + ["--data", "emptydir"], ["emptydir"]),
    ("out-holds-a-run", PRE + ["--out", "run"], ["--out", "run", "--resume", "--overwrite"]),
    ("out-non-empty", PRE + ["--out", "nonempty"], ["--out", "nonempty"]),
    ("out-is-a-file", PRE + ["--out", "a_file"], ["--out", "a_file"]),
    ("resume-and-overwrite", PRE + ["--out", "run", "--resume", "--overwrite"], ["--resume", "--overwrite"]),
    ("config-missing", PRE + ["--config", "none.toml"], ["--config", "none.toml"]),
    ("config-wrong-type", PRE + ["--config", "badtype.toml"], ["max_steps in badtype.toml"]),
    ("config-unknown-key", PRE + ["--config", "unknown.toml"], ["max_stepz", "unknown.toml"]),
    ("config-invalid", PRE + ["--config", "invalid.toml"], ["--config", "invalid.toml"]),
    ("unknown-flag", PRE + ["--bogus"], ["--bogus"]),
    ("ft-model-is-run", FT + ["--model", "run"], ["--model", "run", "step-00000002"]),
    ("ft-model-is-adapter", FT + ["--model", "adapter"], ["--model", "adapter", "--adapter"]),
    ("ft-model-truncated", FT + ["--model", "truncated"], ["truncated", "model.safetensors"]),
    ("ft-model-zero-bytes", FT + ["--model", "zero"], ["zero", "model.safetensors"]),
    ("ft-model-garbage", FT + ["--model", "garbage"], ["garbage", "model.safetensors"]),
    ("ft-config-not-json", FT + ["--model", "badjson"], ["badjson", "config.json"]),
    ("ft-model-missing", FT + ["--model", "nowhere"], ["--model", "nowhere"]),
    ("ft-data-missing", FT + ["--data", "none.jsonl"], ["--data", "none.jsonl"]),
    ("ft-data-not-json", FT + ["--data", "bad.jsonl"], ["bad.jsonl:2"]),
    ("ft-data-not-utf8", FT + ["--data", "binary.jsonl"], ["binary.jsonl", "UTF-8"]),
    ("ft-all-dropped", FT + ["--data", "long.jsonl"], ["long.jsonl", "--seq-len", "--truncation"]),
    ("ft-template", FT + ["--template", "vicuna"], ["--template"]),
    ("ft-truncation", FT + ["--truncation", "middle"], ["--truncation"]),
    ("ft-lora-r", FT + ["--method", "lora", "--lora-r", "0"], ["--lora-r"]),
    ("ft-seq-len-over-context", FT + ["--seq-len", "1000"], ["--seq-len"]),
    ("ft-out-holds-a-run", FT + ["--out", "run"], ["--out", "run"]),
    ("gen-model-is-run", GEN[:1] + ["--model", "run"] + GEN[3:], ["--model", "run", "step-00000002"]),
    ("gen-model-is-adapter", GEN[:1] + ["--model", "adapter"] + GEN[3:], ["--model", "adapter"]),
    ("gen-model-truncated", GEN[:1] + ["--model", "truncated"] + GEN[3:], ["truncated", "model.safetensors"]),
    ("gen-config-not-json", GEN[:1] + ["--model", "badjson"] + GEN[3:], ["badjson", "config.json"]),
    ("gen-max-new-tokens", GEN + ["--max-new-tokens", "0"], ["--max-new-tokens"]),
    ("gen-temperature", GEN + ["--temperature", "0"], ["--temperature"]),
    ("gen-top-p", GEN + ["--top-p", "1.5"], ["--top-p"]),
    ("gen-top-k", GEN + ["--top-k", "0"], ["--top-k"]),
    ("gen-greedy-and-sampling", GEN + ["--greedy", "--temperature", "0.7"], ["--greedy", "--temperature"]),
    ("gen-beams-and-sampling", GEN + ["--num-beams", "2", "--top-p", "0.9"], ["--num-beams", "--top-p"]),
    ("gen-penalty-alpha", GEN + ["--penalty-alpha", "0.5"], ["--penalty-alpha", "--top-k"]),
    ("gen-compile-beams", GEN + ["--compile", "--num-beams", "2"], ["--compile", "--num-beams"]),
    ("gen-adapter-missing", GEN + ["--adapter", "no_adapter"], ["--adapter", "no_adapter"]),
    ("gen-adapter-not-adapter", GEN + ["--adapter", "model"], ["--adapter", "model"]),
    ("gen-chat-without-template", GEN + ["--chat"], ["--chat"]),
    ("gen-draft-missing", GEN + ["--draft-model", "nodraft"], ["--draft-model", "nodraft"]),
    ("gen-device", GEN + ["--device", "npu"], ["--device"]),
    ("quant-src-missing", ["quantize", "nosrc", "q"], ["SRC", "nosrc"]),
    ("quant-src-is-run", ["quantize", "run", "q"], ["SRC", "run"]),
    ("quant-dst-non-empty", ["quantize", "model", "nonempty"], ["DST", "nonempty"]),
    ("quant-group-size", ["quantize", "model", "q", "--group-size", "0"], ["--group-size"]),
    ("demo-steps", ["demo", "--corpus", "corpus.txt", "--steps", "0"], ["--steps"]),
    ("demo-corpus-binary", ["demo", "--corpus", "binary.bin", "--out", "d"], ["--corpus", "binary.bin"]),
    ("demo-out-holds-a-run", ["demo", "--corpus", "corpus.txt", "--out", "run"], ["--out", "run"]),
]
if not torch.cuda.is_available():
    CASES += [("device-cuda-without-gpu", PRE + ["--device", "cuda"], ["--device", "cuda", "no CUDA"]),
              ("gen-device-cuda-without-gpu", GEN + ["--device", "cuda"], ["--device", "cuda"])]


def test_at_least_40_cases():
    assert len(CASES) >= 40


@pytest.mark.parametrize(("argv", "named"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(ws, monkeypatch, capsys, argv, named):
    monkeypatch.chdir(ws)
    before = _snapshot(ws)
    try:
        code = console_main(list(argv))
    except SystemExit as stop:  # argparse's own errors
        code = stop.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for text in named:
        assert text in lines[0], (text, lines[0])
    assert _snapshot(ws) == before


def test_debug_shows_the_traceback(ws, monkeypatch):
    monkeypatch.chdir(ws)
    with pytest.raises(ValueError, match="--seq-len"):
        console_main(PRE + ["--seq-len", "0", "--debug"])


def test_a_real_process(ws):
    """The installed entry point behaves the same (one process start: kept to one case)."""
    env = {**os.environ, "PYTHONPATH": str(Path(fastlm.__file__).resolve().parents[1])}
    result = subprocess.run([sys.executable, "-m", "fastlm", *GEN[:1], "--model", "truncated", *GEN[3:]],
                            cwd=ws, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and "model.safetensors" in result.stderr
