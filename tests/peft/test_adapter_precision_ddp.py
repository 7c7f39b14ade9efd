"""Adapter training (LoRA and soft prompt) under bf16 autocast and under DDP, on CPU.

1. ``precision="bf16"``: the Trainer runs the forward under ``torch.autocast("cpu", bfloat16)``;
   a LoRA or prompt adapter on a float32 or bfloat16 base then trains (finite loss that falls on
   a tiny task), only the adapter changes (every base weight bit-identical, in its own dtype),
   the adapter stays float32 (master weights), and its checkpoint is a PEFT adapter that loads
   back into a fresh base with the trained model's outputs.
2. DDP with gloo and 2 processes (``torchrun ... -m fastlm finetune --method lora|prompt``): the
   losses of one process on the same global batch (|Δ| ≤ 2e-5, as tests/train/test_distributed.py),
   only the adapter is optimized, rank 0 writes the adapter in PEFT's format, and resuming
   (from a 2-process checkpoint, or scaling a 1-process run out to 2) continues the same run.
"""

import json
import random
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from fastlm import cli, peft
from fastlm.config import ModelConfig
from fastlm.data import ByteTokenizer
from fastlm.io import from_pretrained
from fastlm.model import Model
from fastlm.peft import LoraConfig, LoraLinear, LoraModel, PromptTuningConfig, PromptTuningModel
from fastlm.peft.tuning import AdapterTrainer, train_adapter
from fastlm.train import SFTSource, TrainerConfig
from fastlm.train.data import IGNORE_INDEX
from tests.distributed_env import torchrun_env

DDP_TOL = 2e-5  # tests/train/test_distributed.py's tolerance for 2 processes vs 1

# ---- a tiny task: "<bos> d d d d =" -> "7 3 5 <eos>" (token ids: digits 0-9, then specials) -----
BOS, EQUALS, EOS, PAD = 10, 11, 12, 13
ANSWER = [7, 3, 5, EOS]


def _examples(n=256, seed=0):
    rng = random.Random(seed)
    examples = []
    for _ in range(n):
        context = [BOS, *(rng.randrange(10) for _ in range(4)), EQUALS]
        examples.append(([*context, *ANSWER], [IGNORE_INDEX] * len(context) + ANSWER))
    return examples


SOURCE = SFTSource(_examples(), batch_size=16, pad_id=PAD)


def _base(dtype):
    """A random tiny Llama (GQA); initializer_range 0.3 gives logits large enough for a 4-token
    soft prompt to steer within a few steps."""
    torch.manual_seed(0)
    config = ModelConfig(arch="llama", vocab_size=16, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                         intermediate_size=64, max_position_embeddings=32, initializer_range=0.3,
                         tie_word_embeddings=True)
    return Model(config).to(dtype)


def _adapter(kind, base):
    if kind == "lora":
        return LoraModel(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    return PromptTuningModel(base, PromptTuningConfig(num_virtual_tokens=4))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models are dominated by per-op overhead: one thread is faster on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _trainable(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _watch_autocast(model, kind):
    """Record (autocast on, autocast dtype, output dtype) of lm_head (and of one LoRA layer) per call."""
    seen = []

    def hook(module, args, output):
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"), output.dtype))

    modules = [model.lm_head]
    if kind == "lora":
        modules.append(next(m for m in model.modules() if isinstance(m, LoraLinear)))
    return seen, [m.register_forward_hook(hook) for m in modules]


def _loss(model, batch):
    logits = model(batch["input_ids"], key_lens=batch["key_lens"])
    return F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE_INDEX)


# ---- 1. bf16 autocast ----------------------------------------------------------------------------

@pytest.mark.parametrize("base_dtype", [torch.float32, torch.bfloat16], ids=["fp32-base", "bf16-base"])
@pytest.mark.parametrize("kind", ["lora", "prompt"])
def test_bf16_autocast_trains_only_the_float32_adapter(kind, base_dtype, tmp_path):
    base = _base(base_dtype)
    base_before = {n: t.clone() for n, t in base.state_dict().items()}
    model = _adapter(kind, base)
    adapter_before = {n: p.detach().clone() for n, p in _trainable(model).items()}
    assert adapter_before and all(p.dtype == torch.float32 for p in adapter_before.values())
    batch = SOURCE.batch(0)
    with torch.no_grad():  # the first step's loss computed in float32 throughout
        reference = _loss(_adapter(kind, _base(torch.float32)), batch).item()

    seen, hooks = _watch_autocast(model, kind)
    config = TrainerConfig(out=str(tmp_path), max_steps=15, batch_size=16, lr=3e-2 if kind == "lora" else 1e-1,
                           warmup_steps=2, weight_decay=0.0, precision="bf16", eval_batches=1, progress=False,
                           device="cpu")
    losses = train_adapter(model, SOURCE, config).losses
    for hook in hooks:
        hook.remove()

    # the forward ran under CPU bf16 autocast, in bf16
    assert seen and set(seen) == {(True, torch.bfloat16, torch.bfloat16)}, set(seen)
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert losses[0] == pytest.approx(reference, rel=2e-2)  # bf16 rounding only
    assert losses[-1] < 0.5 * losses[0], losses
    # only the adapter changed, and it is still float32; the base is bit-identical, in its dtype
    after = _trainable(model)
    assert after.keys() == adapter_before.keys()
    for name, p in after.items():
        assert p.dtype == torch.float32, name
        assert not torch.equal(p, adapter_before[name]), f"{name} did not train"
    for name, value in base.state_dict().items():
        if "lora_" not in name:
            original = base_before[name.replace(".base.", ".")]
            assert value.dtype == base_dtype and torch.equal(value, original), name

    # the checkpoint is a float32 PEFT adapter; loaded into a fresh base it gives the same outputs
    checkpoint = tmp_path / "checkpoints" / "step-00000015"
    saved = json.loads((checkpoint / "adapter_config.json").read_text())
    assert saved["peft_type"] == ("LORA" if kind == "lora" else "PROMPT_TUNING")
    with safe_open(checkpoint / "adapter_model.safetensors", "pt") as f:
        assert f.keys() and all(f.get_slice(k).get_dtype() == "F32" for k in f.keys())
        if kind == "lora":
            assert all(k.startswith("base_model.model.model.layers.") for k in f.keys())
    reloaded = peft.from_pretrained(_base(base_dtype), checkpoint).eval()
    assert all(p.dtype == torch.float32 for n, p in reloaded.named_parameters() if "lora_" in n or "prompts" in n)
    model.eval()
    with torch.no_grad():
        assert torch.equal(reloaded(batch["input_ids"], key_lens=batch["key_lens"]),
                           model(batch["input_ids"], key_lens=batch["key_lens"]))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(reloaded(batch["input_ids"]), model(batch["input_ids"]))


@pytest.mark.parametrize("targets, option, message", [
    ("all-linear", "fsdp", "fsdp=True is not supported for adapter training"),
    (["q_proj", "lm_head"], "fused_loss", "would skip the LoRA adapter on lm_head"),
], ids=["fsdp", "fused-loss-lora-head"])
def test_adapter_trainer_refuses_what_would_break_the_adapter(tmp_path, targets, option, message):
    """Sharded adapters (FSDP) could not be checkpointed from rank 0, and the fused loss reads
    lm_head's weight directly: both are refused up front with a clear message."""
    model = LoraModel(_base(torch.float32), LoraConfig(r=2, target_modules=targets))
    with pytest.raises(ValueError, match=message):
        AdapterTrainer(model, SOURCE, TrainerConfig(out=str(tmp_path), device="cpu", **{option: True}))
    AdapterTrainer(model, SOURCE, TrainerConfig(out=str(tmp_path), device="cpu"))  # fine without the option


# ---- 2. DDP, through the CLI -----------------------------------------------------------------------

TOKENIZER = ByteTokenizer()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """Tiny GPT-2 and Llama checkpoints (with a byte tokenizer) and prompt/completion data."""
    root = tmp_path_factory.mktemp("ddp")
    for arch in ("gpt2", "llama"):
        torch.manual_seed(0)
        model = Model(ModelConfig(arch=arch, vocab_size=TOKENIZER.vocab_size, hidden_size=32, num_layers=2,
                                  num_heads=4, intermediate_size=64, max_position_embeddings=32))
        model.save_pretrained(root / arch)
        TOKENIZER.save(root / arch)
    rng = random.Random(0)
    lines = []
    for _ in range(64):
        digits = "".join(rng.choice("0123456789") for _ in range(rng.choice([3, 4])))
        lines.append(json.dumps({"prompt": digits + "=", "completion": digits[::-1]}) + "\n")
    (root / "data.jsonl").write_text("".join(lines))
    return root


def _finetune_args(workdir, arch, out, *extra):
    return ["finetune", "--model", str(workdir / arch), "--data", str(workdir / "data.jsonl"), "--seq-len", "16",
            "--batch-size", "8", "--warmup-steps", "1", "--lr", "1e-2", "--save-every", "2", "--eval-batches", "2",
            "--device", "cpu", "--no-progress", "--out", str(out), *extra]


def _one_process(args):
    assert cli.main(args) == 0


def _two_processes(args):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "fastlm", *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=torchrun_env())
    assert result.returncode == 0, result.stderr[-3000:]
    # DDP neither fails nor warns about parameters that get no gradient (the frozen base)
    assert "find_unused_parameters" not in result.stderr, result.stderr[-3000:]
    return result


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _losses(out):
    return [record["loss"] for record in _metrics(out)]


def _tensors(checkpoint):
    with safe_open(checkpoint / "adapter_model.safetensors", "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _assert_adapter_checkpoint(checkpoint, peft_type, trainable_names):
    """A PEFT adapter directory (no base weights) whose optimizer state covers exactly the adapter."""
    files = {p.name for p in checkpoint.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "trainer_state.pt"} <= files, files
    assert "config.json" not in files and not any(f.startswith("model") for f in files), files
    assert json.loads((checkpoint / "adapter_config.json").read_text())["peft_type"] == peft_type
    state = torch.load(checkpoint / "trainer_state.pt", weights_only=True)
    assert set(state["optimizer"]["state"]) == trainable_names


def test_lora_ddp_matches_one_process_and_resumes(workdir, tmp_path):
    # GPT-2: q, k and v share one lora_A (PEFT's c_attn), a parameter used three times per block.
    # No dropout: its masks depend on how the batch is split over processes. Two micro-batches
    # per step: the first backward runs under DDP's no_sync.
    lora = ["--method", "lora", "--lora-r", "4", "--lora-alpha", "8", "--lora-dropout", "0",
            "--lora-targets", "c_attn", "c_proj", "c_fc", "--grad-accum", "2"]
    one, two = tmp_path / "one", tmp_path / "two"
    _one_process(_finetune_args(workdir, "gpt2", one, "--max-steps", "6", *lora))
    _two_processes(_finetune_args(workdir, "gpt2", two, "--max-steps", "6", *lora))
    expected = _losses(one)
    assert expected[-1] < expected[0]
    assert _losses(two) == pytest.approx(expected, abs=DDP_TOL)
    assert _metrics(two)[-1]["val_loss"] == pytest.approx(_metrics(one)[-1]["val_loss"], abs=DDP_TOL)

    reference = LoraModel(from_pretrained(workdir / "gpt2"),
                          LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"]))
    final = two / "checkpoints" / "step-00000006"
    _assert_adapter_checkpoint(final, "LORA", set(_trainable(reference)))
    trained = _tensors(final)
    for name, value in _tensors(one / "checkpoints" / "step-00000006").items():
        torch.testing.assert_close(trained[name], value, rtol=0, atol=1e-5, msg=name)

    # killed before step 6 was saved: the 2 processes resume from step 4 and end the same way
    shutil.rmtree(final)
    result = _two_processes(_finetune_args(workdir, "gpt2", two, "--max-steps", "6", "--resume", *lora))
    assert "steps 5-6" in result.stdout
    assert [r["step"] for r in _metrics(two)] == [1, 2, 3, 4, 5, 6]
    assert _losses(two) == pytest.approx(expected, abs=DDP_TOL)
    for name, value in _tensors(final).items():
        torch.testing.assert_close(value, trained[name], rtol=0, atol=1e-5, msg=name)


def test_prompt_tuning_bf16_run_scales_out_to_ddp(workdir, tmp_path):
    """A 1-process soft-prompt run (bf16 autocast), resumed on 2 processes after step 2, gives the
    uninterrupted 1-process run's losses."""
    prompt = ["--method", "prompt", "--num-virtual-tokens", "4", "--precision", "bf16", "--max-steps", "4"]
    one, two = tmp_path / "one", tmp_path / "two"
    _one_process(_finetune_args(workdir, "llama", one, *prompt))
    shutil.copytree(one, two)
    shutil.rmtree(two / "checkpoints" / "step-00000004")
    result = _two_processes(_finetune_args(workdir, "llama", two, "--resume", *prompt))
    assert "steps 3-4" in result.stdout
    assert _losses(two) == pytest.approx(_losses(one), abs=DDP_TOL)
    final = two / "checkpoints" / "step-00000004"
    _assert_adapter_checkpoint(final, "PROMPT_TUNING", {"prompts.default"})
    torch.testing.assert_close(_tensors(final)["prompt_embeddings"],
                               _tensors(one / "checkpoints" / "step-00000004")["prompt_embeddings"],
                               rtol=0, atol=1e-5)
