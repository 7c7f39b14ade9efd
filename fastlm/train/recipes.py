"""Training recipes: causal-LM (or masked-LM) pretraining on text, and supervised fine-tuning
on prompt/completion pairs. Both build their data and model, then run the :class:`Trainer`."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from fastlm._files import atomic_write_text
from fastlm._naming import shown
from fastlm.config import PRESETS, preset
from fastlm.data import HFTokenizer, Tokenizer, default_corpus_texts, load_tokenizer, read_texts, split_train_val
from fastlm.data.chat import resolve_template
from fastlm.data.dataset import tokenize_stream
from fastlm.io import from_pretrained, load_config
from fastlm.io.validate import check_model_dir
from fastlm.model import Model
from fastlm.train import distributed, rundir
from fastlm.train.data import (
    TEMPLATES,
    TRUNCATION_SIDES,
    PackedSource,
    SFTSource,
    encode_examples,
    read_prompt_completions,
)
from fastlm.train.trainer import Trainer, TrainerConfig, TrainResult

logger = logging.getLogger(__name__)

OBJECTIVES = ("clm", "mlm")
#: Written into each fine-tuning checkpoint: the prompt template the model learned
#: (``fastlm generate --chat`` applies it).
TEMPLATE_FILE = "prompt_template.json"


@dataclass
class RecipeOutput:
    model: Model
    tokenizer: Tokenizer
    result: TrainResult


def _tokenizer_for(train_texts: list[str], out: Path, tokenizer_path: str | None, vocab_size: int,
                   resume: bool) -> Tokenizer:
    """The given tokenizer; on resume the one saved with the run; else a byte-level BPE trained
    by the main process and shared with the others (saved in ``<out>/tokenizer``)."""
    if tokenizer_path is not None:
        return load_tokenizer(tokenizer_path)
    shared = out / "tokenizer"
    if resume and shared.is_dir() and any(shared.iterdir()):
        logger.info("resuming: using the run's tokenizer in %s", shared)
        return load_tokenizer(shared)
    if int(torch.distributed.get_rank() if torch.distributed.is_initialized() else 0) == 0:
        HFTokenizer.train_bpe(train_texts, vocab_size=vocab_size).save(shared)
    distributed.barrier()
    return load_tokenizer(shared)


def _check_int(name: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{shown(name)} must be an integer >= {low}, got {value!r}")


def _trainer_settings(config: TrainerConfig) -> dict:
    return {k: v for k, v in dataclasses.asdict(config).items() if k not in ("out", "progress")}


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
    overwrite: bool = False,
    on_bad_file: str = "error",
) -> RecipeOutput:
    """Pretrain a ``preset_name`` model on text files/folders/jsonl (default: Python's stdlib).

    Every argument is checked before any work. ``config.out`` must be empty or new unless
    ``resume`` (continue the run there, with its tokenizer; changed settings are refused or
    reported, see :mod:`fastlm.train.rundir`) or ``overwrite`` (replace the run there).
    ``on_bad_file`` "error" refuses a data file that is not UTF-8 text, "skip" leaves it out.

    The texts are split by document into train/validation, tokenized, separated by the
    end-of-sequence token and packed into rows of seq_len tokens. ``document_masking`` keeps
    attention within documents (varlen attention); ``objective="mlm"`` trains a bidirectional
    masked-LM instead (the pad token serves as the mask token).
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"{shown('objective')} must be one of {OBJECTIVES}, got {objective!r}")
    if objective == "mlm" and document_masking:
        raise ValueError(f"{shown('document_masking')} applies to the causal objective only")
    if preset_name not in PRESETS:
        raise ValueError(f"unknown {shown('preset_name')} {preset_name!r}; available: {', '.join(sorted(PRESETS))}")
    _check_int("seq_len", seq_len, 1)
    _check_int("max_corpus_bytes", max_corpus_bytes, 1)
    if tokenizer_path is None:
        _check_int("vocab_size", vocab_size, 259)
    elif not Path(tokenizer_path).exists():
        raise FileNotFoundError(f"{shown('tokenizer_path')} {tokenizer_path}: no such file or directory")
    if not 0 < val_fraction < 1:
        raise ValueError(f"{shown('val_fraction')} must be in (0, 1), got {val_fraction!r}")
    context = PRESETS[preset_name].get("max_position_embeddings")
    if context is not None and seq_len > context:
        raise ValueError(f"{shown('seq_len')} {seq_len} exceeds the {preset_name!r} context of {context}")
    texts = read_texts(data, on_bad_file=on_bad_file) if data else default_corpus_texts(max_bytes=max_corpus_bytes)
    dist_info = distributed.setup(config.device)
    out = rundir.prepare_out(config.out, resume=resume, overwrite=overwrite, is_main=dist_info.is_main)
    distributed.barrier()
    train_texts, val_texts = split_train_val(texts, val_fraction=val_fraction, seed=config.seed)
    settings = dict(command="pretrain", data=[str(p) for p in data] if data else None,
                    data_fingerprint=rundir.texts_fingerprint(texts), preset=preset_name,
                    tokenizer=str(tokenizer_path) if tokenizer_path else None,
                    vocab_size=None if tokenizer_path else vocab_size, seq_len=seq_len, val_fraction=val_fraction,
                    objective=objective, document_masking=document_masking,
                    max_corpus_bytes=None if data else max_corpus_bytes, **_trainer_settings(config))
    rundir.begin_run(out, settings, resume=resume, is_main=dist_info.is_main)
    tokenizer = _tokenizer_for(train_texts, out, tokenizer_path, vocab_size, resume)
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
    overwrite: bool = False,
    truncation: str = "right",
) -> RecipeOutput:
    """Full supervised fine-tuning of the checkpoint in ``model_dir`` on a prompt/completion
    jsonl file, with the loss on completion tokens only. Examples longer than seq_len + 1
    tokens are cut as ``truncation`` says (see :data:`fastlm.train.data.TRUNCATION_SIDES`);
    how many were truncated or dropped is logged. ``resume``/``overwrite`` as in :func:`pretrain`."""
    prepared = prepare_finetune(config, data=data, model_dir=model_dir, template=template, seq_len=seq_len,
                                val_data=val_data, val_fraction=val_fraction, resume=resume, overwrite=overwrite,
                                truncation=truncation, settings=dict(command="finetune", method="full"))
    model = from_pretrained(model_dir, dtype=torch.float32)
    trainer = Trainer(model, prepared.train, config, val_source=prepared.val, extra_files=prepared.extra_files)
    return RecipeOutput(model, prepared.tokenizer, trainer.fit(resume=resume))


@dataclass
class PreparedFinetune:
    tokenizer: Tokenizer
    train: SFTSource
    val: SFTSource | None
    extra_files: Callable[[Path], None]


def check_jsonl_run(model_dir: str, seq_len: int, data: str, val_data: str | None, reserved: int = 0):
    """The checks of a run on jsonl rows and a model directory, before any work: the directory
    holds a model whose context (less ``reserved`` positions) fits ``seq_len``, the data files
    exist, the tokenizer can pad. Returns (tokenizer, pad id: pad, else end-of-sequence)."""
    check_model_dir(model_dir, shown("model_dir"))
    context = load_config(model_dir).max_position_embeddings - reserved
    if seq_len > context:
        extra = f" (after {reserved} virtual tokens)" if reserved else ""
        raise ValueError(f"{shown('seq_len')} {seq_len} exceeds the model's context of {context}{extra}")
    for name, path in (("data", data), ("val_data", val_data)):
        if path is not None and not Path(path).is_file():
            raise FileNotFoundError(f"{shown(name)} {path}: no such file" if not Path(path).is_dir()
                                    else f"{shown(name)} {path} is a directory; expected a jsonl file")
    tokenizer = load_tokenizer(model_dir)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an end-of-sequence token to pad batches with")
    return tokenizer, pad


def prepare_finetune(config: TrainerConfig, *, data: str, model_dir: str, template: str, seq_len: int,
                     val_data: str | None, val_fraction: float, resume: bool, overwrite: bool, truncation: str,
                     settings: dict, reserved: int = 0) -> PreparedFinetune:
    """What every fine-tuning recipe does before building its model: check the arguments (all
    before any work), prepare ``config.out`` (:func:`rundir.prepare_out`), record or compare
    the run's settings, read and encode the examples (reporting truncated and dropped ones).
    Checkpoints get the tokenizer and ``prompt_template.json`` (``fastlm generate --chat``).
    ``reserved`` positions of the model's context are taken by something else (virtual tokens)."""
    _check_int("seq_len", seq_len, 1)
    if template is not None and template != "chat" and template not in TEMPLATES:
        raise ValueError(f"unknown {shown('template')} {template!r}; available: chat, {', '.join(TEMPLATES)}")
    if truncation not in TRUNCATION_SIDES:
        raise ValueError(f"{shown('truncation')} must be one of {TRUNCATION_SIDES}, got {truncation!r}")
    if not 0 < val_fraction < 1:
        raise ValueError(f"{shown('val_fraction')} must be in (0, 1), got {val_fraction!r}")
    tokenizer, pad = check_jsonl_run(model_dir, seq_len, data, val_data, reserved)
    template = resolve_template(tokenizer, template, tuple(TEMPLATES))  # None: chat if the tokenizer has one
    pairs = read_prompt_completions(data)
    if val_data is not None:
        train_pairs, val_pairs = pairs, read_prompt_completions(val_data)
    else:
        cut = max(1, round(len(pairs) * val_fraction)) if len(pairs) > 1 else 0
        train_pairs, val_pairs = pairs[cut:], pairs[:cut]
    train_examples, _ = encode_examples(tokenizer, train_pairs, template, seq_len, truncation=truncation,
                                        source=f"{data} (training)")
    val_examples = None
    if val_pairs:
        val_examples, _ = encode_examples(tokenizer, val_pairs, template, seq_len, truncation=truncation,
                                          source=f"{val_data or data} (validation)")
    info = distributed.setup(config.device)
    out = rundir.prepare_out(config.out, resume=resume, overwrite=overwrite, is_main=info.is_main)
    distributed.barrier()
    fingerprint = rundir.file_fingerprint(data) + (rundir.file_fingerprint(val_data) if val_data else "")
    settings = dict(settings, data=str(data), data_fingerprint=fingerprint, model=str(model_dir), template=template,
                    seq_len=seq_len, truncation=truncation, val_data=val_data, val_fraction=val_fraction,
                    **_trainer_settings(config))
    rundir.begin_run(out, settings, resume=resume, is_main=info.is_main)
    train = SFTSource(train_examples, batch_size=config.batch_size, pad_id=pad, seed=config.seed)
    val = None
    if val_examples:
        val = SFTSource(val_examples, batch_size=config.batch_size, pad_id=pad, seed=config.seed + 1)

    def extra_files(directory: Path) -> None:
        tokenizer.save(directory)
        atomic_write_text(directory / TEMPLATE_FILE, json.dumps({"template": template}) + "\n")

    return PreparedFinetune(tokenizer, train, val, extra_files)
