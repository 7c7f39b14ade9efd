"""Adapter fine-tuning with fastlm.train: a synthetic task learned by the adapter alone.

A tiny Llama (ByteTokenizer) is first trained to *copy* 3–4 digit strings ("123=" -> "123");
LoRA then teaches it to *reverse* them ("123=" -> "321"): exact-match accuracy goes from near
zero to high while every base weight stays bit-identical. A soft prompt trains on the same data
(its loss must fall; prompt tuning is too weak to learn reversal in a few CPU seconds), and the
file-based recipe (jsonl + checkpoint directory) checkpoints PEFT adapters and resumes.
"""

import json
import random
import shutil

import pytest
import torch

from fastlm.config import ModelConfig
from fastlm.data import ByteTokenizer, load_tokenizer
from fastlm.generate import generate
from fastlm.model import Model
from fastlm.peft import LoraConfig, LoraModel, PromptTuningConfig, PromptTuningModel
from fastlm.peft.tuning import finetune_adapter, train_adapter
from fastlm.train import SFTSource, Trainer, TrainerConfig
from fastlm.train.data import encode_example

TOKENIZER = ByteTokenizer()
_rng = random.Random(0)
TRAIN = ["".join(_rng.choice("0123456789") for _ in range(_rng.choice([3, 4]))) for _ in range(2000)]
TEST = ["".join(_rng.choice("0123456789") for _ in range(_rng.choice([3, 4]))) for _ in range(64)]


def copy(s):
    return s


def reverse(s):
    return s[::-1]


def source(task, strings=TRAIN, batch_size=64):
    examples = [encode_example(TOKENIZER, s + "=", task(s), "plain", 16) for s in strings]
    return SFTSource(examples, batch_size=batch_size, pad_id=TOKENIZER.pad_token_id)


def trainer_config(out, steps, lr):
    return TrainerConfig(out=str(out), max_steps=steps, batch_size=64, lr=lr, warmup_steps=10, weight_decay=0.0,
                         progress=False, device="cpu")


@torch.no_grad()
def exact_match(model, task):
    prompts = [TOKENIZER.encode(s + "=", add_bos=True) for s in TEST]
    outputs = generate(model, prompts, max_new_tokens=5, eos_token_id=TOKENIZER.eos_token_id)
    hits = [TOKENIZER.decode(out[len(p):].tolist(), skip_special_tokens=True) == task(s) for s, p, out in zip(TEST, prompts, outputs)]
    return sum(hits) / len(hits)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These tiny models are dominated by per-op overhead: one thread is faster, and much faster
    when the CPU is shared with other test runs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def copier(tmp_path_factory):
    """A tiny Llama trained (fully) to copy digit strings."""
    torch.manual_seed(0)
    config = ModelConfig(arch="llama", vocab_size=TOKENIZER.vocab_size, hidden_size=64, num_layers=2, num_heads=4,
                         intermediate_size=128, max_position_embeddings=32, tie_word_embeddings=True)
    model = Model(config)
    Trainer(model, source(copy), trainer_config(tmp_path_factory.mktemp("base"), 200, 6e-3)).fit()
    return model.eval()


def _state(model):
    return {n: p.detach().clone() for n, p in model.state_dict().items()}


def test_lora_learns_reversal_with_only_adapter_weights(copier, tmp_path):
    base_before = _state(copier)
    assert exact_match(copier, copy) >= 0.7  # the base copies ...
    before = exact_match(copier, reverse)
    assert before <= 0.2  # ... and cannot reverse (palindromes aside)
    lora = LoraModel(copier, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    trainable, total = lora.get_nb_trainable_parameters()
    assert 0 < trainable < 0.5 * total
    result = train_adapter(lora, source(reverse), trainer_config(tmp_path, 200, 1e-2))
    assert result.losses[-1] < 0.3 * result.losses[0]
    lora.eval()
    after = exact_match(lora, reverse)
    assert after >= 0.8, f"exact match {before:.2f} -> {after:.2f}"
    for name, value in _state(copier).items():
        if "lora_" not in name:
            assert torch.equal(value, base_before[name.replace(".base.", ".")]), name
    # the checkpoint directory is a PEFT adapter: loading it gives the trained model
    (checkpoint,) = (tmp_path / "checkpoints").iterdir()
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in checkpoint.iterdir()}
    lora.load_adapter(checkpoint, "reloaded")
    x = torch.tensor([TOKENIZER.encode("1234=", add_bos=True)])
    with torch.no_grad():
        torch.testing.assert_close(lora(x, adapter_names=["reloaded"]), lora(x, adapter_names=["default"]))
        with lora.disable_adapter():
            assert exact_match(lora, copy) >= 0.7  # the base still copies
    lora.unload()


def test_soft_prompt_trains_alone(copier, tmp_path):
    base_before = _state(copier)
    prompt = PromptTuningModel(copier, PromptTuningConfig(num_virtual_tokens=4))
    initial = prompt.prompts["default"].detach().clone()
    result = train_adapter(prompt, source(reverse), trainer_config(tmp_path, 40, 3e-2))
    assert result.losses[-1] < 0.8 * result.losses[0]
    assert not torch.equal(prompt.prompts["default"], initial)
    assert all(torch.equal(v, base_before[n]) for n, v in _state(copier).items())


def test_finetune_recipe_from_files_checkpoints_and_resumes(tmp_path):
    torch.manual_seed(0)
    model = Model(ModelConfig(arch="gpt2", vocab_size=TOKENIZER.vocab_size, hidden_size=32, num_layers=1,
                              num_heads=4, max_position_embeddings=32))
    model.save_pretrained(tmp_path / "base")
    TOKENIZER.save(tmp_path / "base")
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": s + "=", "completion": reverse(s)}) + "\n" for s in TRAIN[:40]))
    lora = LoraConfig(r=4, target_modules=["c_attn", "c_fc"])

    def run(steps, resume=False):
        config = TrainerConfig(out=str(tmp_path / "run"), max_steps=steps, batch_size=8, lr=1e-2, warmup_steps=0,
                               save_every=2, progress=False, device="cpu")
        return finetune_adapter(config, data=str(data), model_dir=str(tmp_path / "base"), lora=lora, seq_len=16,
                                resume=resume)

    full = run(6)
    checkpoint = tmp_path / "run" / "checkpoints" / "step-00000006"
    config = json.loads((checkpoint / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["target_modules"] == ["c_attn", "c_fc"]
    assert load_tokenizer(checkpoint).vocab_size == TOKENIZER.vocab_size
    # resume from step 4 (as if killed after it): the same final adapter as the uninterrupted run
    shutil.rmtree(checkpoint)
    resumed = run(6, resume=True)
    assert resumed.result.start_step == 4
    for (name, (a1, b1, _)), (_, (a2, b2, _)) in zip(full.model.entries("default").items(),
                                                     resumed.model.entries("default").items()):
        torch.testing.assert_close(a1, a2, msg=name)
        torch.testing.assert_close(b1, b2, msg=name)
    with pytest.raises(ValueError, match="method must be one of"):
        finetune_adapter(TrainerConfig(out=str(tmp_path / "x")), data=str(data), model_dir=str(tmp_path / "base"),
                         method="ia3")
