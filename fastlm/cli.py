"""The ``fastlm`` command (also ``python -m fastlm``).

Subcommands:
  demo      the main job: pretrain a tiny model and its BPE tokenizer on Python's own standard
            library sources, report validation perplexity, save it, generate text
  pretrain  causal-LM (or masked-LM) pretraining on text files, folders or jsonl
  finetune  supervised fine-tuning on prompt/completion or chat jsonl (loss on completions / assistant turns)
  generate  continue a prompt with a saved checkpoint (streaming; beams, contrastive, speculative)
  chat      interactive streaming chat with a checkpoint, through its chat template
  quantize  int8 weight-only or W8A8 post-training quantization of a checkpoint
  eval      checkpoints and their variants on local tasks, a side-by-side report
  info      versions, devices and which op backends are available

Training runs on several processes with ``torchrun --nproc-per-node N -m fastlm pretrain ...``.

Every error is one line on stderr naming the flag or file, exit status 2 (``--debug`` shows the
traceback). Ctrl-C or SIGTERM during training saves the last completed step and exits with
130 / 143. Subcommands are added by registrars (:data:`REGISTRARS`, :func:`register`): a function
that receives the subparsers object, adds its parser and sets ``func`` (and optionally
``flag_names``, a dict of API parameter name → flag for error messages).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import re
import shlex
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fastlm._naming import command_line_names, shown
from fastlm.cli_config import load_config_file, parse

__all__ = ["REGISTRARS", "add_parser", "build_parser", "console_main", "load_config_file", "main", "register"]

_TRAINER_OPTIONS = {
    # option: (type, help); defaults come from TrainerConfig
    "max_steps": (int, "optimizer steps"),
    "batch_size": (int, "sequences per micro-batch over all processes"),
    "grad_accum": (int, "micro-batches per optimizer step"),
    "lr": (float, "peak learning rate"),
    "min_lr_ratio": (float, "final learning rate as a fraction of lr"),
    "warmup_steps": (int, "linear warmup steps (default: min(100, 10%% of --max-steps), so short runs reach --lr)"),
    "schedule": (str, "learning-rate decay after warmup: cosine | linear | constant"),
    "weight_decay": (float, "AdamW weight decay (matrices only)"),
    "grad_clip": (float, "max gradient norm (0: off)"),
    "precision": (str, "fp32 | bf16 | fp16 (fp16 uses loss scaling)"),
    "seed": (int, "seed of initialization, data order and sampling"),
    "eval_every": (int, "steps between validations (0: at the end)"),
    "eval_batches": (int, "validation micro-batches"),
    "save_every": (int, "steps between checkpoints (0: at the end)"),
    "keep_last": (int, "checkpoints kept"),
    "nan_policy": (str, "stop | skip: what a NaN/inf loss does"),
    "device": (str, "cpu or cuda (default: cuda when available)"),
}
_CHOICES = {"schedule": ("cosine", "linear", "constant"), "precision": ("fp32", "bf16", "fp16"),
            "nan_policy": ("stop", "skip")}
_TRAINER_FLAGS = {
    "activation_checkpointing": "recompute blocks in backward to save memory",
    "compile": "torch.compile the model",
    "fused_loss": "fused linear + cross-entropy (no full logits)",
    "fsdp": "shard with FSDP2 instead of DDP (needs torchrun)",
}
#: API parameter names that the command line spells differently.
_FLAG_NAMES = {"model_dir": "--model", "preset_name": "--preset", "tokenizer_path": "--tokenizer",
               "max_corpus_bytes": "--max-bytes"}


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors: ``fastlm pretrain: error: ... (see fastlm pretrain --help)``."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows each option's default after its help (unless None/False or already stated)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("(default" in text or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings
                or isinstance(action, argparse._StoreFalseAction)):  # noqa: SLF001 (an off-switch: no default)
            return text
        if isinstance(action.default, list):
            return f"{text} (default: {' '.join(map(str, action.default))})"
        return text + " (default: %(default)s)"


def add_parser(sub, name: str, **kwargs) -> argparse.ArgumentParser:
    """A subcommand parser with fastlm's one-line errors and defaults shown in --help."""
    return sub.add_parser(name, formatter_class=HelpFormatter, **kwargs)


# ---- checks shared by the commands (all run before any work) ------------------------------


def check_positive(args: argparse.Namespace, *names: str, low: float = 1, strict: bool = False) -> None:
    for name in names:
        value = getattr(args, name)
        if value is not None and (value <= low if strict else value < low):
            raise ValueError(f"{shown(name)} must be {'>' if strict else '>='} {low:g}, got {value}")


def check_device(device: str | None) -> None:
    if device is None:
        return
    if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise ValueError(f"{shown('device')} must be cpu, cuda or cuda:N, got {device!r}")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}"
            raise ValueError(f"{shown('device')} {device}: no CUDA GPU is available (torch {torch.__version__}, "
                             f"{build}); use {shown('device')} cpu")
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise ValueError(f"{shown('device')} {device}: only {torch.cuda.device_count()} CUDA device(s)")


def check_file(name: str, path: str | None, *, directory: bool = False) -> None:
    if path is None:
        return
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{shown(name)} {path}: no such {'directory' if directory else 'file'}")
    if not directory and p.is_dir():
        raise ValueError(f"{shown(name)} {path} is a directory; expected a file")


def check_run_options(args: argparse.Namespace) -> None:
    """The checks of the training commands' options, before anything is read or written."""
    from fastlm.train import TrainerConfig

    check_device(args.device)
    for name, allowed in _CHOICES.items():
        if getattr(args, name) not in allowed:
            raise ValueError(f"{shown(name)} must be one of {' | '.join(allowed)}, got {getattr(args, name)!r}")
    for name in ("weight_decay", "grad_clip"):
        if getattr(args, name) < 0:
            raise ValueError(f"{shown(name)} must be >= 0, got {getattr(args, name)}")
    if not 0 <= args.min_lr_ratio <= 1:
        raise ValueError(f"{shown('min_lr_ratio')} must be in [0, 1], got {args.min_lr_ratio}")
    if args.fsdp and int(os.environ.get("WORLD_SIZE", "1")) < 2:
        raise ValueError(f"{shown('fsdp')} shards the model over several processes: launch with torchrun "
                         "--nproc-per-node N -m fastlm ... (one process trains without it)")
    try:
        trainer_config(args)
    except ValueError as err:  # TrainerConfig names its fields; the user wrote flags (or file keys)
        names = [f.name for f in dataclasses.fields(TrainerConfig)]
        raise ValueError(re.sub(r"TrainerConfig\.(\w+)", lambda m: shown(m.group(1)) if m.group(1) in names
                                else m.group(0), str(err))) from None


def add_trainer_options(parser: argparse.ArgumentParser, defaults: dict[str, Any]) -> None:
    group = parser.add_argument_group("training")
    group.add_argument("--out", default=defaults["out"], help="output directory (checkpoints, metrics, plot); "
                       "must be empty or new unless --resume or --overwrite")
    group.add_argument("--resume", action="store_true", help="continue the run in --out from its newest intact "
                       "checkpoint, with its tokenizer; changed settings are refused or reported (see README)")
    group.add_argument("--overwrite", action="store_true", help="replace the run in a non-empty --out")
    group.add_argument("--config", help="TOML (or YAML) file of option values; command-line options win")
    for name, (kind, text) in _TRAINER_OPTIONS.items():
        group.add_argument("--" + name.replace("_", "-"), type=kind, default=defaults[name], help=text)
    for name, text in _TRAINER_FLAGS.items():
        group.add_argument("--" + name.replace("_", "-"), action="store_true", default=defaults[name], help=text)
    group.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def trainer_config(args: argparse.Namespace):
    from fastlm.train import TrainerConfig

    names = [f.name for f in dataclasses.fields(TrainerConfig)]
    return TrainerConfig(**{name: getattr(args, name) for name in names if hasattr(args, name)})


# ---- the training commands ------------------------------------------------------------------


def _pretrain(args: argparse.Namespace) -> int:
    from fastlm.train import pretrain

    check_run_options(args)
    check_positive(args, "seq_len")
    output = pretrain(trainer_config(args), data=args.data, preset_name=args.preset, tokenizer_path=args.tokenizer,
                      vocab_size=args.vocab_size, seq_len=args.seq_len, val_fraction=args.val_fraction,
                      objective=args.objective, document_masking=args.document_masking, resume=args.resume,
                      overwrite=args.overwrite, on_bad_file=args.on_bad_file)
    _report(output.result, args.out)
    return 0


def _finetune(args: argparse.Namespace) -> int:
    check_run_options(args)
    check_positive(args, "seq_len", "lora_r", "num_virtual_tokens")
    check_positive(args, "lora_alpha", low=0, strict=True)
    if not 0 <= args.lora_dropout < 1:
        raise ValueError(f"{shown('lora_dropout')} must be in [0, 1), got {args.lora_dropout}")
    common = dict(data=args.data, model_dir=args.model, template=args.template, seq_len=args.seq_len,
                  val_data=args.val_data, resume=args.resume, overwrite=args.overwrite, truncation=args.truncation)
    if args.method == "full":
        from fastlm.train import finetune

        output = finetune(trainer_config(args), **common)
    else:
        from fastlm.peft import LoraConfig, PromptTuningConfig
        from fastlm.peft.tuning import finetune_adapter

        targets = args.lora_targets[0] if args.lora_targets == ["all-linear"] else args.lora_targets
        lora = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                          target_modules=targets)
        prompt = PromptTuningConfig(num_virtual_tokens=args.num_virtual_tokens)
        output = finetune_adapter(trainer_config(args), method=args.method, lora=lora, prompt=prompt, **common)
    _report(output.result, args.out)
    return 0


def _report(result, out: str) -> None:
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return
    if result.losses:
        print(f"training loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f} "
              f"(steps {result.start_step + 1}-{result.steps})")
    if result.val_loss is not None:
        print(f"validation loss {result.val_loss:.3f}, perplexity {result.val_perplexity:.2f}")
    plot = " and loss_curve.png" if (Path(out) / "loss_curve.png").is_file() else ""
    print(f"checkpoints, metrics.jsonl{plot} in {out}")


def _demo(args: argparse.Namespace) -> int:
    from fastlm import generate
    from fastlm.config import PRESETS
    from fastlm.train import TrainerConfig, pretrain
    from fastlm.train import checkpoint as ckpt

    check_positive(args, "max_steps", "batch_size", "seq_len", "max_corpus_bytes", "max_new_tokens")
    check_positive(args, "vocab_size", low=259)
    check_positive(args, "lr", low=0, strict=True)
    if args.preset not in PRESETS:
        raise ValueError(f"unknown --preset {args.preset!r}; available: {', '.join(sorted(PRESETS))}")
    start = time.perf_counter()
    config = TrainerConfig(out=args.out, max_steps=args.max_steps, batch_size=args.batch_size, lr=args.lr,
                           warmup_steps=min(20, args.max_steps // 10), seed=args.seed, device="cpu",
                           eval_batches=8, keep_last=1)
    output = pretrain(config, data=args.corpus, preset_name=args.preset, vocab_size=args.vocab_size,
                      seq_len=args.seq_len, max_corpus_bytes=args.max_corpus_bytes, resume=args.resume,
                      overwrite=args.overwrite, on_bad_file=args.on_bad_file)
    result, tokenizer, model = output.result, output.tokenizer, output.model
    source = ", ".join(args.corpus) if args.corpus else "the Python standard library's sources"
    print(f"trained a {model.num_parameters() / 1e6:.2f} M-parameter {args.preset!r} model and a "
          f"{tokenizer.vocab_size}-token BPE tokenizer on {source}")
    if result.losses:
        print(f"training loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f}; "
              f"validation loss {result.val_loss:.3f}, perplexity {result.val_perplexity:.2f}")
    print(f"checkpoint with tokenizer: {ckpt.latest_checkpoint(args.out)}")
    prompt_ids = torch.tensor([tokenizer.encode(args.prompt)])
    generator = torch.Generator().manual_seed(args.seed)
    # No eos_token_id: the end-of-document token would often end the short sample at once.
    tokens = generate(model.eval(), prompt_ids, max_new_tokens=args.max_new_tokens, do_sample=True,
                      temperature=0.8, top_k=50, generator=generator)
    print("--- sample ---")
    print(tokenizer.decode(tokens[0].tolist(), skip_special_tokens=True))
    print("--------------")
    print(f"done in {time.perf_counter() - start:.0f} s")
    return 0


def _quantize(args: argparse.Namespace) -> int:
    from fastlm import from_pretrained, load_tokenizer
    from fastlm.io.validate import check_model_dir
    from fastlm.quant import model_bytes, quantize, save_quantized

    check_model_dir(args.src, "SRC")
    check_positive(args, "group_size")
    check_file("calibration", args.calibration)
    if args.calibration and args.mode != "w8a8":
        raise ValueError("--calibration applies to --mode w8a8 (SmoothQuant) only")
    dst = Path(args.dst)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())) and not args.overwrite:
        raise ValueError(f"DST {dst} exists and is not empty; choose a new folder or give --overwrite")
    if Path(args.src).resolve() == dst.resolve():
        raise ValueError("DST must differ from SRC (the checkpoint would be replaced by its quantized form)")
    model = from_pretrained(args.src, dtype=torch.float32)
    before = model_bytes(model)
    calibration = None
    if args.calibration:
        from fastlm.data import read_texts
        from fastlm.data.dataset import tokenize_stream

        with command_line_names({"data": "--calibration"}):
            tokens = tokenize_stream(read_texts([args.calibration]), load_tokenizer(args.src))
        calibration = tokens[: 16 * 128].view(-1, 128) if tokens.numel() >= 128 else tokens[None]
    quantize(model, mode=args.mode, group_size=args.group_size, include_head=args.include_head,
             calibration=calibration)
    save_quantized(model, args.dst)
    try:
        load_tokenizer(args.src).save(args.dst)
    except FileNotFoundError:
        pass  # a checkpoint without a tokenizer
    print(f"{args.mode}: {before / 2**20:.1f} MiB -> {model_bytes(model) / 2**20:.1f} MiB, saved to {args.dst}")
    return 0


def _info(args: argparse.Namespace) -> int:
    import fastlm
    from fastlm.ops import backend_status

    print(f"fastlm {fastlm.__version__}, torch {torch.__version__}, python {sys.version.split()[0]}")
    try:
        import triton

        print(f"triton {triton.__version__}")
    except ImportError:
        print("triton not installed")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
        print(f"{device} ({name}):")
        for backend in fastlm.ops.BACKENDS:
            ok, why = backend_status(backend, device)
            print(f"  {backend:9s} {'yes' if ok else 'no ':3s}  {why}")
    return 0


def _build_ext(args: argparse.Namespace) -> int:
    from fastlm import _extension

    _extension.load_extension()  # the prebuilt module, or a JIT build from csrc/ (RuntimeError saying why)
    print(f"fastlm CUDA extension ready: {_extension.extension_ready()[1]}")
    return 0


# ---- parsers ---------------------------------------------------------------------------------


def _add_demo(sub) -> None:
    demo = add_parser(sub, "demo", help="the main job: train a tokenizer and a tiny model, perplexity, sample",
                      description="Train a BPE tokenizer and a tiny model, report validation perplexity, save, sample.")
    demo.add_argument("--corpus", nargs="+", metavar="PATH", help="text files or folders (default: Python's stdlib)")
    demo.add_argument("--on-bad-file", default="error", choices=("error", "skip"),
                      help="a --corpus file that is not UTF-8 text: refuse it, or skip it with a warning")
    demo.add_argument("--max-bytes", dest="max_corpus_bytes", type=int, default=3_000_000,
                      help="size of the default corpus in bytes")
    demo.add_argument("--out", default="runs/demo", help="where to save checkpoints, metrics and the plot "
                      "(must be empty or new unless --resume or --overwrite)")
    demo.add_argument("--resume", action="store_true", help="continue the run in --out")
    demo.add_argument("--overwrite", action="store_true", help="replace the run in a non-empty --out")
    demo.add_argument("--preset", default="tiny", help="model preset (see fastlm.PRESETS)")
    demo.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary size (>= 259)")
    demo.add_argument("--steps", dest="max_steps", type=int, default=300, help="optimizer steps")
    demo.add_argument("--batch-size", type=int, default=16, help="sequences per step")
    demo.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
    demo.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    demo.add_argument("--seed", type=int, default=0, help="seed of initialization, data order and the sample")
    demo.add_argument("--prompt", default="def ", help="start of the generated sample")
    demo.add_argument("--max-new-tokens", type=int, default=96, help="length of the sample in tokens")
    demo.set_defaults(func=_demo, flag_names={"data": "--corpus", "max_steps": "--steps"})


def _add_pretrain(sub) -> None:
    from fastlm.train import TrainerConfig

    defaults = {f.name: f.default for f in dataclasses.fields(TrainerConfig)}
    pre = add_parser(sub, "pretrain", help="pretrain on text files, folders or jsonl",
                     description="Causal-LM (or masked-LM) pretraining of a preset model.")
    pre.add_argument("--data", nargs="+", metavar="PATH", help="text files, folders or jsonl (default: Python's stdlib)")
    pre.add_argument("--on-bad-file", default="error", choices=("error", "skip"),
                     help="a --data file that is not UTF-8 text: refuse it, or skip it with a warning")
    pre.add_argument("--preset", default="tiny", help="model preset (see fastlm.PRESETS)")
    pre.add_argument("--tokenizer", help="tokenizer.json or checkpoint folder (default: train a BPE on the data)")
    pre.add_argument("--vocab-size", type=int, default=4096, help="vocabulary of the BPE trained when no --tokenizer")
    pre.add_argument("--seq-len", type=int, default=256, help="tokens per training sequence")
    pre.add_argument("--val-fraction", type=float, default=0.05, help="fraction of documents held out for validation")
    pre.add_argument("--objective", default="clm", choices=("clm", "mlm"), help="causal LM or masked LM")
    pre.add_argument("--document-masking", action="store_true", help="no attention across packed documents")
    add_trainer_options(pre, {**defaults, "out": "runs/pretrain"})
    pre.set_defaults(func=_pretrain)


def _add_finetune(sub) -> None:
    from fastlm.train import TrainerConfig
    from fastlm.train.data import TEMPLATES

    defaults = {f.name: f.default for f in dataclasses.fields(TrainerConfig)}
    fine = add_parser(sub, "finetune", help="supervised fine-tuning on prompt/completion jsonl",
                      description="Supervised fine-tuning (full, LoRA or soft prompt), loss on completions only.")
    fine.add_argument("--data", required=True,
                      help='jsonl with {"prompt": ..., "completion": ...} or {"messages": [...]} per line')
    fine.add_argument("--val-data", help="validation jsonl (default: hold out 5%% of --data)")
    fine.add_argument("--model", required=True, help="checkpoint folder to start from")
    fine.add_argument("--template", default=None, choices=("chat", *TEMPLATES),
                      help="chat (the model's chat template, loss on assistant turns; the default when the tokenizer "
                           "has one), plain (the default otherwise), alpaca or chatml")
    fine.add_argument("--seq-len", type=int, default=512, help="tokens per example (prompt + completion)")
    fine.add_argument("--truncation", default="right", choices=("right", "left"),
                      help="over-long examples: right cuts the completion's end (examples left without a "
                           "completion token are dropped); left cuts the prompt's start so the completion fits")
    fine.add_argument("--method", default="full", choices=("full", "lora", "prompt"),
                      help="full fine-tuning, LoRA, or soft-prompt tuning (checkpoints are PEFT adapters)")
    fine.add_argument("--lora-r", type=int, default=16, help="LoRA rank")
    fine.add_argument("--lora-alpha", type=float, default=32.0, help="LoRA scale numerator (scale = alpha / r)")
    fine.add_argument("--lora-dropout", type=float, default=0.05, help="dropout on the LoRA input")
    fine.add_argument("--lora-targets", nargs="+", default=["q_proj", "k_proj", "v_proj", "o_proj"],
                      help="module names, or all-linear")
    fine.add_argument("--num-virtual-tokens", type=int, default=20, help="soft-prompt length")
    add_trainer_options(fine, {**defaults, "out": "runs/finetune", "lr": 1e-4})
    fine.set_defaults(func=_finetune)


def _add_quantize(sub) -> None:
    quant = add_parser(sub, "quantize", help="post-training int8 quantization of a checkpoint",
                       description="Post-training int8 quantization (weight-only or W8A8) of a checkpoint.")
    quant.add_argument("src", help="checkpoint folder")
    quant.add_argument("dst", help="new folder for the quantized checkpoint")
    quant.add_argument("--mode", default="int8_weight_only", choices=("int8_weight_only", "w8a8"),
                       help="int8 weights only, or int8 weights and activations (SmoothQuant)")
    quant.add_argument("--group-size", type=int, default=None, help="group-wise scales (default: per channel)")
    quant.add_argument("--include-head", action="store_true", help="quantize the output head too")
    quant.add_argument("--calibration", help="text file for SmoothQuant calibration (w8a8)")
    quant.add_argument("--overwrite", action="store_true", help="write into a non-empty DST")
    quant.set_defaults(func=_quantize, flag_names={"src": "SRC", "dst": "DST"})


def _add_generate(sub) -> None:
    from fastlm.cli_generate import add_generate

    add_generate(sub)


def _add_eval(sub) -> None:
    from fastlm.eval.cli import add_parser as add_eval_parser  # `fastlm eval`: fastlm/eval/cli.py

    add_eval_parser(sub)


def _add_chat(sub) -> None:
    from fastlm.chat import add_chat_parser  # `fastlm chat`: fastlm/chat.py

    add_chat_parser(sub)


def _add_rl(sub) -> None:
    from fastlm.align.cli_rl import add_rl  # `fastlm ppo` / `fastlm grpo`: fastlm/align/cli_rl.py

    add_rl(sub)


def _add_build_ext(sub) -> None:
    ext = add_parser(sub, "build-ext", help="build (JIT) and load the C++/CUDA extension, so that automatic "
                                            "backend selection can use it",
                     description="Build the C++/CUDA extension from csrc/ (nvcc) and load it.")
    ext.set_defaults(func=_build_ext)


def _add_info(sub) -> None:
    info = add_parser(sub, "info", help="versions, devices and available backends",
                      description="Versions, devices and which op backends are available.")
    info.set_defaults(func=_info)


def _add_prefs(sub) -> None:
    from fastlm.align.cli_prefs import add_parsers  # `fastlm reward`, `fastlm dpo`: fastlm/align/cli_prefs.py

    add_parsers(sub)


def _add_distill(sub) -> None:
    from fastlm.align.cli_distill import add_distill  # `fastlm distill`: fastlm/align/cli_distill.py

    add_distill(sub)


#: Functions that add a subcommand (see the module docstring); other modules append theirs
#: with :func:`register`.
REGISTRARS: list[Callable[[Any], None]] = [_add_demo, _add_pretrain, _add_finetune, _add_generate, _add_quantize,
                                           _add_chat, _add_eval, _add_build_ext, _add_info,
                                           _add_prefs, _add_distill, _add_rl]


def register(registrar: Callable[[Any], None]) -> Callable[[Any], None]:
    """Add a subcommand registrar (usable as a decorator)."""
    REGISTRARS.append(registrar)
    return registrar


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="fastlm", description="Train, fine-tune, run and quantize language models "
                            "(fastlm COMMAND --help shows each command's options).", formatter_class=HelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for registrar in REGISTRARS:
        registrar(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a subcommand; errors propagate as exceptions (see :func:`console_main`)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser()
    with command_line_names():  # errors of the config file itself name --config
        args = parse(parser, argv)
    names = {**_FLAG_NAMES, **getattr(args, "flag_names", {}), **args.from_file}
    try:
        with command_line_names(names):
            return args.func(args)
    finally:
        from fastlm.train import distributed

        distributed.teardown()


class _Terminated(Exception):
    """SIGTERM outside a training loop (which handles it itself)."""


def _on_sigterm(signum, frame) -> None:
    raise _Terminated()


def _one_line(text: str) -> str:
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def console_main(argv: list[str] | None = None) -> int:
    """The ``fastlm`` command: any error ends with one line on stderr and exit status 2 instead of
    a traceback (``--debug`` or FASTLM_DEBUG=1 shows the traceback). A training run stopped by
    SIGINT/SIGTERM saves its last step and exits with 130/143 after one line on how to resume."""
    from fastlm.io import CheckpointError
    from fastlm.train.interrupt import TrainingInterrupted

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("FASTLM_DEBUG") == "1"
    if not debug:
        os.environ.setdefault("TORCHDYNAMO_VERBOSE", "0")
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return main(argv)
    except TrainingInterrupted as stop:
        again = [a for a in argv if a not in ("--resume", "--overwrite", "--debug")] + ["--resume"]
        print(f"fastlm: stopped by {signal.Signals(stop.signum).name} after step {stop.step}, saved in "
              f"{stop.checkpoint}; resume with: fastlm {shlex.join(again)}", file=sys.stderr)
        return stop.exit_code
    except KeyboardInterrupt:
        print("fastlm: interrupted (nothing to resume was being trained)", file=sys.stderr)
        return 130
    except _Terminated:
        print("fastlm: terminated (nothing to resume was being trained)", file=sys.stderr)
        return 143
    except (ValueError, TypeError, OSError, NotImplementedError, CheckpointError, FloatingPointError) as err:
        if debug:
            raise
        print(f"fastlm: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except Exception as err:  # the command line's last resort: one line, the traceback with --debug
        if debug:
            raise
        print(f"fastlm: error: {type(err).__name__}: {_one_line(err)} (--debug shows the traceback)",
              file=sys.stderr)
        return 2
    finally:
        signal.signal(signal.SIGTERM, previous)
