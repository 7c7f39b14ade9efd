"""transformers.Trainer (and TRL's SFTTrainer and DPOTrainer) with apply(): 20 training steps give the same
losses as the unpatched model, by the 2x rule against a float64 run."""

from __future__ import annotations

import logging

import pytest
import torch
import transformers as T

import fastlm.integrations.transformers as fi
from tests.integrations.hf_models import batch, build
from tests.integrations.rule import assert_2x

STEPS = 20


class _Rows(torch.utils.data.Dataset):
    def __init__(self, n=STEPS * 4):
        ids, mask, labels = batch(batch_size=n, length=12, seed=3, padding="right")
        self.rows = [{"input_ids": i, "attention_mask": m, "labels": lab} for i, m, lab in zip(ids, mask, labels)]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def _recording(base: type) -> type:
    """``base`` keeping every micro-batch loss at full precision (the log history rounds them)."""

    class Recording(base):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            self.losses.append(float((loss[0] if return_outputs else loss).detach()))
            return loss

    return Recording


def _train(model, tmp_path, name, **extra):
    args = T.TrainingArguments(
        output_dir=str(tmp_path / name), max_steps=STEPS, per_device_train_batch_size=2, gradient_accumulation_steps=2,
        learning_rate=3e-3, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=7,
        disable_tqdm=True, **extra)
    trainer = _recording(T.Trainer)(model=model, args=args, train_dataset=_Rows())
    trainer.losses = []
    trainer.train()
    return torch.tensor(trainer.losses, dtype=torch.float64)


def test_trainer_20_steps_same_losses(tmp_path):
    logging.getLogger("transformers").setLevel(logging.ERROR)
    oracle = _train(build("llama", attn="sdpa", dtype=torch.float64), tmp_path, "oracle")
    plain = _train(build("llama", attn="sdpa"), tmp_path, "plain")
    # the documented one-liner: hand Trainer the patched model
    patched = _train(fi.apply(build("llama", attn="sdpa")), tmp_path, "patched")
    assert len(oracle) == len(plain) == len(patched) == 2 * STEPS  # 2 micro-batches a step
    assert_2x(patched, plain, oracle, atol=1e-5, what="Trainer losses")


def test_trl_sft_trainer_with_patched_model(tmp_path):
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    ids, mask, _ = batch(batch_size=16, length=12, seed=4, padding=None)
    data = Dataset.from_dict({"input_ids": ids.tolist()})

    def run(model, name):
        cfg = trl.SFTConfig(output_dir=str(tmp_path / name), max_steps=4, per_device_train_batch_size=4,
                            learning_rate=3e-3, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                            seed=7, disable_tqdm=True, dataset_kwargs={"skip_prepare_dataset": False})
        tok = T.PreTrainedTokenizerFast(tokenizer_object=_tokenizer(), pad_token="<pad>", eos_token="</s>")
        trainer = _recording(trl.SFTTrainer)(model=model, args=cfg, train_dataset=data, processing_class=tok)
        trainer.losses = []
        trainer.train()
        return torch.tensor(trainer.losses, dtype=torch.float64)

    oracle = run(build("llama", attn="sdpa", dtype=torch.float64), "oracle")
    plain = run(build("llama", attn="sdpa"), "plain")
    patched = run(fi.apply(build("llama", attn="sdpa")), "patched")
    assert len(patched) == 4
    assert_2x(patched, plain, oracle, atol=1e-5, what="SFTTrainer losses")


def _tokenizer():
    from tokenizers import Tokenizer, models

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, 96)}}
    return Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))


def test_trl_dpo_trainer_with_patched_model(tmp_path):
    """TRL's DPOTrainer with a patched policy and a patched frozen reference (same initial weights):
    the same DPO losses as the unpatched pair over 4 steps, by the 2x rule."""
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from tokenizers import pre_tokenizers

    rng = torch.Generator().manual_seed(5)

    def words(n):
        return " ".join(f"t{int(i)}" for i in torch.randint(3, 96, (n,), generator=rng))

    rows = [{"prompt": words(5), "chosen": " " + words(4), "rejected": " " + words(3)} for _ in range(16)]
    data = Dataset.from_list(rows)
    tokenizer = _tokenizer()
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()

    def run(make, name):
        model, ref_model = make(), make()
        cfg = trl.DPOConfig(output_dir=str(tmp_path / name), max_steps=4, per_device_train_batch_size=4,
                            learning_rate=3e-3, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                            seed=7, disable_tqdm=True, beta=0.1)
        tok = T.PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>")
        trainer = _recording(trl.DPOTrainer)(model=model, ref_model=ref_model, args=cfg, train_dataset=data,
                                             processing_class=tok)
        trainer.losses = []
        trainer.train()
        return torch.tensor(trainer.losses, dtype=torch.float64)

    oracle = run(lambda: build("llama", attn="sdpa", dtype=torch.float64), "oracle")
    plain = run(lambda: build("llama", attn="sdpa"), "plain")
    patched = run(lambda: fi.apply(build("llama", attn="sdpa")), "patched")
    assert len(patched) == 4
    assert not torch.allclose(patched, patched[0].expand(4))  # the policy moves away from the reference
    assert_2x(patched, plain, oracle, atol=1e-5, what="DPOTrainer losses")
