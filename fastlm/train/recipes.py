"""Training recipes: causal-LM (or masked-LM) pretraining on text, and supervised fine-tuning
on prompt/completion pairs. Both build their data and model, then run the :class:`Trainer`."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from fastlm.config import preset
from fastlm.data import HFTokenizer, Tokenizer, default_corpus_texts, load_tokenizer, read_texts, split_train_val
from fastlm.data.dataset import tokenize_stream
from fastlm.io import from_pretrained
from fastlm.model import Model
from fastlm.train import distributed
from fastlm.train.data import PackedSource, SFTSource, encode_examples, read_prompt_completions
from fastlm.train.trainer import Trainer, TrainerConfig, TrainResult

logger = logging.getLogger(__name__)

OBJECTIVES = ("clm", "mlm")


@dataclass
class RecipeOutput:
    model: Model
    tokenizer: Tokenizer
    result: TrainResult


def _tokenizer_for(train_texts: list[str], out: Path, tokenizer_path: str | None, vocab_size: int) -> Tokenizer:
    """The given tokenizer, or a byte-level BPE trained by the main process and shared with the others."""
    if tokenizer_path is not None:
        return load_tokenizer(tokenizer_path)
    shared = out / "tokenizer"
    if int(torch.distributed.get_rank() if torch.distributed.is_initialized() else 0) == 0:
        HFTokenizer.train_bpe(train_texts, vocab_size=vocab_size).save(shared)
    distributed.barrier()
    return load_tokenizer(shared)


def pretrain_texts(
    data: Sequence[str] | None = None,
    *,
    max_corpus_bytes: int = 3_000_000,
    val_fraction: float = 0.05,
    seed: int = 0,
) -> tuple[list[str], list[str]]:
    """The (train, validation) documents :func:`pretrain` uses for these arguments (``seed`` is
    the TrainerConfig's): text files/folders/jsonl, or the default corpus of ``max_corpus_bytes``,
    split by document. Evaluating a trained model on the validation documents measures it on
    text it never saw (e.g. bench/quant_accuracy.py)."""
    texts = read_texts(data) if data else default_corpus_texts(max_bytes=max_corpus_bytes)
    return split_train_val(texts, val_fraction=val_fraction, seed=seed)


def pretrain(
    config: TrainerConfig,
    *,
    data: Sequence[str] | None = None,
    preset_name: str = "tiny",
    tokenizer_path: str | None = None,
    vocab_size: int = 4096,
    seq_len: int = 256,
    val_fraction: float = 0.05,
    objective: str = "clm",
    document_masking: bool = False,
    max_corpus_bytes: int = 3_000_000,
    resume: bool = False,
) -> RecipeOutput:
    """Pretrain a ``preset_name`` model on text files/folders/jsonl (default: Python's stdlib).

    The texts are split by document into train/validation, tokenized, separated by the
    end-of-sequence token and packed into rows of seq_len tokens. ``document_masking`` keeps
    attention within documents (varlen attention); ``objective="mlm"`` trains a bidirectional
    masked-LM instead (the pad token serves as the mask token).
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    if objective == "mlm" and document_masking:
        raise ValueError("document_masking applies to the causal objective only")
    dist_info = distributed.setup(config.device)
    train_texts, val_texts = pretrain_texts(data, max_corpus_bytes=max_corpus_bytes, val_fraction=val_fraction,
                                            seed=config.seed)
    out = Path(config.out)
    tokenizer = _tokenizer_for(train_texts, out, tokenizer_path, vocab_size)
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no end-of-sequence token to separate documents")
    mask_id = tokenizer.pad_token_id if objective == "mlm" else None
    if objective == "mlm" and mask_id is None:
        raise ValueError("masked-LM needs a tokenizer with a pad token (used as the mask token)")
    common = dict(seq_len=seq_len, separator=tokenizer.eos_token_id, document_masking=document_masking,
                  mlm_mask_id=mask_id, vocab_size=tokenizer.vocab_size)
    train = PackedSource(tokenize_stream(train_texts, tokenizer), batch_size=config.batch_size, seed=config.seed,
                         **common)
    val = PackedSource(tokenize_stream(val_texts, tokenizer), batch_size=config.batch_size, seed=config.seed + 1,
                       **common)
    model_config = preset(preset_name, vocab_size=tokenizer.vocab_size, bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    if seq_len > model_config.max_position_embeddings:
        raise ValueError(f"seq_len {seq_len} exceeds the {preset_name!r} context of {model_config.max_position_embeddings}")
    torch.manual_seed(config.seed)  # the same initial weights in every process
    model = Model(model_config)
    if dist_info.is_main:
        logger.info("pretraining %s (%.2f M parameters) on %d training tokens, %d processes",
                    preset_name, model.num_parameters() / 1e6, train.tokens.numel(), dist_info.world_size)
    trainer = Trainer(model, train, config, val_source=val, extra_files=tokenizer.save)
    return RecipeOutput(model, tokenizer, trainer.fit(resume=resume))


def finetune(
    config: TrainerConfig,
    *,
    data: str,
    model_dir: str,
    template: str | None = None,
    seq_len: int = 512,
    val_data: str | None = None,
    val_fraction: float = 0.05,
    resume: bool = False,
) -> RecipeOutput:
    """Full supervised fine-tuning of the checkpoint in ``model_dir`` on a prompt/completion
    jsonl file, with the loss on completion tokens only."""
    distributed.setup(config.device)
    model = from_pretrained(model_dir, dtype=torch.float32)
    if seq_len > model.config.max_position_embeddings:
        raise ValueError(f"seq_len {seq_len} exceeds the model's context of {model.config.max_position_embeddings}")
    tokenizer = load_tokenizer(model_dir)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an end-of-sequence token to pad batches with")

    def encode(pairs):
        return encode_examples(tokenizer, pairs, template, seq_len)

    pairs = read_prompt_completions(data)
    if val_data is not None:
        train_pairs, val_pairs = pairs, read_prompt_completions(val_data)
    else:
        cut = max(1, round(len(pairs) * val_fraction)) if len(pairs) > 1 else 0
        train_pairs, val_pairs = pairs[cut:], pairs[:cut]
    train = SFTSource(encode(train_pairs), batch_size=config.batch_size, pad_id=pad, seed=config.seed)
    val = SFTSource(encode(val_pairs), batch_size=config.batch_size, pad_id=pad, seed=config.seed + 1) if val_pairs else None
    trainer = Trainer(model, train, config, val_source=val, extra_files=tokenizer.save)
    return RecipeOutput(model, tokenizer, trainer.fit(resume=resume))
