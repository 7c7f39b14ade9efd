"""The ``fastlm`` command (also ``python -m fastlm``).

Subcommands:
  demo      the main job: pretrain a tiny model and its BPE tokenizer on Python's own standard
            library sources, report validation perplexity, save it, generate text
  pretrain  causal-LM (or masked-LM) pretraining on text files, folders or jsonl
  finetune  supervised fine-tuning on prompt/completion jsonl (loss on completions only)
  generate  continue a prompt with a saved checkpoint (streaming; beams, contrastive, speculative)
  quantize  int8 weight-only or W8A8 post-training quantization of a checkpoint
  info      versions, devices and which op backends are available

Training runs on several processes with ``torchrun --nproc-per-node N -m fastlm pretrain ...``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch

_TRAINER_OPTIONS = {
    # option: (type, help); defaults come from TrainerConfig
    "max_steps": (int, "optimizer steps"),
    "batch_size": (int, "sequences per micro-batch over all processes"),
    "grad_accum": (int, "micro-batches per optimizer step"),
    "lr": (float, "peak learning rate"),
    "min_lr_ratio": (float, "final learning rate as a fraction of lr"),
    "warmup_steps": (int, "linear warmup steps"),
    "schedule": (str, "cosine | linear | constant"),
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
_TRAINER_FLAGS = {
    "activation_checkpointing": "recompute blocks in backward to save memory",
    "compile": "torch.compile the model",
    "fused_loss": "fused linear + cross-entropy (no full logits)",
    "fsdp": "shard with FSDP2 instead of DDP",
}


def _add_trainer_options(parser: argparse.ArgumentParser, defaults: dict[str, Any]) -> None:
    group = parser.add_argument_group("training")
    group.add_argument("--out", default=defaults["out"], help="output directory (checkpoints, metrics, plot)")
    group.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    group.add_argument("--config", help="TOML (or YAML) file of option values; command-line options win")
    for name, (kind, text) in _TRAINER_OPTIONS.items():
        group.add_argument("--" + name.replace("_", "-"), type=kind, default=defaults[name], help=text)
    for name, text in _TRAINER_FLAGS.items():
        group.add_argument("--" + name.replace("_", "-"), action="store_true", default=defaults[name], help=text)
    group.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def _trainer_config(args: argparse.Namespace):
    from fastlm.train import TrainerConfig

    names = [f.name for f in dataclasses.fields(TrainerConfig)]
    return TrainerConfig(**{name: getattr(args, name) for name in names if hasattr(args, name)})


def load_config_file(path: str) -> dict[str, Any]:
    """Option values from a TOML file (or YAML when PyYAML is installed); keys may use - or _."""
    file = Path(path)
    if not file.is_file():
        raise SystemExit(f"fastlm: config file not found: {path}")
    if file.suffix == ".toml":
        import tomllib

        with open(file, "rb") as f:
            values = tomllib.load(f)
    elif file.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise SystemExit("fastlm: reading YAML needs PyYAML (pip install pyyaml); or use a .toml file") from None
        values = yaml.safe_load(file.read_text()) or {}
    else:
        raise SystemExit(f"fastlm: config file must be .toml, .yaml or .yml, got {path}")
    if not isinstance(values, dict):
        raise SystemExit(f"fastlm: {path} must hold a table of option values")
    return {key.replace("-", "_"): value for key, value in values.items()}


def _apply_config_file(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse once for --config, use the file's values as defaults, then parse again."""
    args = parser.parse_args(argv)
    if getattr(args, "config", None):
        values = load_config_file(args.config)
        known = set(vars(args))
        unknown = sorted(set(values) - known)
        if unknown:
            raise SystemExit(f"fastlm: unknown option(s) in {args.config}: {', '.join(unknown)}")
        subparser = parser._subparsers._group_actions[0].choices[args.command]  # noqa: SLF001
        subparser.set_defaults(**values)
        args = parser.parse_args(argv)
    return args


def _pretrain(args: argparse.Namespace) -> int:
    from fastlm.train import pretrain

    output = pretrain(_trainer_config(args), data=args.data, preset_name=args.preset, tokenizer_path=args.tokenizer,
                      vocab_size=args.vocab_size, seq_len=args.seq_len, val_fraction=args.val_fraction,
                      objective=args.objective, document_masking=args.document_masking, resume=args.resume)
    _report(output.result, args.out)
    return 0


def _finetune(args: argparse.Namespace) -> int:
    common = dict(data=args.data, model_dir=args.model, template=args.template, seq_len=args.seq_len,
                  val_data=args.val_data, resume=args.resume)
    if args.method == "full":
        from fastlm.train import finetune

        output = finetune(_trainer_config(args), **common)
    else:
        from fastlm.peft import LoraConfig, PromptTuningConfig
        from fastlm.peft.tuning import finetune_adapter

        targets = args.lora_targets[0] if args.lora_targets == ["all-linear"] else args.lora_targets
        lora = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                          target_modules=targets)
        prompt = PromptTuningConfig(num_virtual_tokens=args.num_virtual_tokens)
        output = finetune_adapter(_trainer_config(args), method=args.method, lora=lora, prompt=prompt, **common)
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
    print(f"checkpoints, metrics.jsonl and loss_curve.png in {out}")


def _demo(args: argparse.Namespace) -> int:
    from fastlm import generate
    from fastlm.train import TrainerConfig, pretrain

    start = time.perf_counter()
    config = TrainerConfig(out=args.out, max_steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                           warmup_steps=min(20, args.steps // 10), seed=args.seed, device="cpu",
                           eval_batches=8, keep_last=1)
    output = pretrain(config, data=args.corpus, preset_name=args.preset, vocab_size=args.vocab_size,
                      seq_len=args.seq_len, max_corpus_bytes=args.max_bytes)
    result, tokenizer, model = output.result, output.tokenizer, output.model
    source = ", ".join(args.corpus) if args.corpus else "the Python standard library's sources"
    print(f"trained a {model.num_parameters() / 1e6:.2f} M-parameter {args.preset!r} model and a "
          f"{tokenizer.vocab_size}-token BPE tokenizer on {source}")
    print(f"training loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f}; "
          f"validation loss {result.val_loss:.3f}, perplexity {result.val_perplexity:.2f}")
    print(f"checkpoint with tokenizer: {sorted(Path(args.out, 'checkpoints').glob('step-*'))[-1]}")
    prompt_ids = torch.tensor([tokenizer.encode(args.prompt)])
    generator = torch.Generator().manual_seed(args.seed)
    # No eos_token_id: the end-of-document token would often end the short sample at once.
    tokens = generate(model.eval(), prompt_ids, max_new_tokens=args.max_new_tokens, do_sample=True,
                      temperature=0.8, top_k=50, generator=generator)
    print("--- sample ---")
    print(tokenizer.decode(tokens[0].tolist()))
    print("--------------")
    print(f"done in {time.perf_counter() - start:.0f} s")
    return 0


def _load_model(directory: str, device: str | None):
    """A checkpoint directory, quantized (config.json has "quantization") or not."""
    from fastlm import from_pretrained
    from fastlm.io.checkpoint import read_hf_config
    from fastlm.quant import load_quantized

    if "quantization" in read_hf_config(directory):
        return load_quantized(directory, device=device)
    return from_pretrained(directory, device=device)


def _quantize(args: argparse.Namespace) -> int:
    from fastlm import from_pretrained, load_tokenizer
    from fastlm.quant import model_bytes, quantize, save_quantized

    model = from_pretrained(args.src, dtype=torch.float32)
    before = model_bytes(model)
    calibration = None
    if args.calibration:
        from fastlm.data import read_texts
        from fastlm.data.dataset import tokenize_stream

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


def _generate(args: argparse.Namespace) -> int:
    from fastlm import generate, generate_stream, load_tokenizer

    model = _load_model(args.model, args.device)
    if args.adapter:
        from fastlm import peft

        model = peft.from_pretrained(model, args.adapter)
    tokenizer = load_tokenizer(args.model)
    ids = tokenizer.encode(args.prompt)
    if not ids:
        raise ValueError("the prompt encodes to no tokens; give a non-empty --prompt")
    options = dict(max_new_tokens=args.max_new_tokens, do_sample=not args.greedy, temperature=args.temperature,
                   top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                   eos_token_id=tokenizer.eos_token_id, seed=args.seed, compile=args.compile)
    special = dict(num_beams=args.num_beams, length_penalty=args.length_penalty, penalty_alpha=args.penalty_alpha)
    if args.draft_model:
        special.update(draft_model=_load_model(args.draft_model, args.device),
                       num_draft_tokens=args.num_draft_tokens)
    prompt = torch.tensor([ids], device=model.device)
    if args.num_beams > 1 or args.penalty_alpha is not None or args.draft_model:
        tokens = generate(model, prompt, **options, **special)
        print(tokenizer.decode(tokens[0].tolist()))
        return 0
    # Stream: print the text as tokens arrive (holding back an incomplete UTF-8 character).
    print(args.prompt, end="", flush=True)
    generated: list[int] = []
    shown = ""
    for token in generate_stream(model, prompt, stop_strings=args.stop, tokenizer=tokenizer, **options):
        generated.append(int(token[0]))
        text = tokenizer.decode(generated)
        if not text.endswith("\ufffd"):
            print(text[len(shown):], end="", flush=True)
            shown = text
    print(tokenizer.decode(generated)[len(shown):])
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


def build_parser() -> argparse.ArgumentParser:
    from fastlm.train import TrainerConfig

    defaults = {f.name: f.default for f in dataclasses.fields(TrainerConfig)}
    parser = argparse.ArgumentParser(prog="fastlm", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="the main job: train a tokenizer and a tiny model, perplexity, sample")
    demo.add_argument("--corpus", nargs="+", metavar="PATH", help="text files or folders (default: Python's stdlib)")
    demo.add_argument("--max-bytes", type=int, default=3_000_000, help="size of the default corpus")
    demo.add_argument("--out", default="runs/demo", help="where to save checkpoints, metrics and the plot")
    demo.add_argument("--preset", default="tiny")
    demo.add_argument("--vocab-size", type=int, default=4096)
    demo.add_argument("--steps", type=int, default=300)
    demo.add_argument("--batch-size", type=int, default=16)
    demo.add_argument("--seq-len", type=int, default=128)
    demo.add_argument("--lr", type=float, default=3e-3)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--prompt", default="def ")
    demo.add_argument("--max-new-tokens", type=int, default=96)
    demo.set_defaults(func=_demo)

    pre = sub.add_parser("pretrain", help="pretrain on text files, folders or jsonl")
    pre.add_argument("--data", nargs="+", metavar="PATH", help="text files, folders or jsonl (default: Python's stdlib)")
    pre.add_argument("--preset", default="tiny", help="model preset (see fastlm.PRESETS)")
    pre.add_argument("--tokenizer", help="tokenizer.json or checkpoint folder (default: train a BPE on the data)")
    pre.add_argument("--vocab-size", type=int, default=4096, help="vocabulary of the BPE trained when no --tokenizer")
    pre.add_argument("--seq-len", type=int, default=256)
    pre.add_argument("--val-fraction", type=float, default=0.05)
    pre.add_argument("--objective", default="clm", choices=("clm", "mlm"), help="causal LM or masked LM")
    pre.add_argument("--document-masking", action="store_true", help="no attention across packed documents")
    _add_trainer_options(pre, {**defaults, "out": "runs/pretrain"})
    pre.set_defaults(func=_pretrain)

    fine = sub.add_parser("finetune", help="supervised fine-tuning on prompt/completion jsonl")
    fine.add_argument("--data", required=True, help='jsonl with {"prompt": ..., "completion": ...} per line')
    fine.add_argument("--val-data", help="validation jsonl (default: hold out 5%% of --data)")
    fine.add_argument("--model", required=True, help="checkpoint folder to start from")
    fine.add_argument("--template", default="plain", help="prompt template: plain, alpaca or chatml")
    fine.add_argument("--seq-len", type=int, default=512)
    fine.add_argument("--method", default="full", choices=("full", "lora", "prompt"),
                      help="full fine-tuning, LoRA, or soft-prompt tuning (checkpoints are PEFT adapters)")
    fine.add_argument("--lora-r", type=int, default=16)
    fine.add_argument("--lora-alpha", type=float, default=32.0)
    fine.add_argument("--lora-dropout", type=float, default=0.05)
    fine.add_argument("--lora-targets", nargs="+", default=["q_proj", "k_proj", "v_proj", "o_proj"],
                      help="module names, or all-linear")
    fine.add_argument("--num-virtual-tokens", type=int, default=20, help="soft-prompt length")
    _add_trainer_options(fine, {**defaults, "out": "runs/finetune", "warmup_steps": 10, "lr": 1e-4})
    fine.set_defaults(func=_finetune)

    gen = sub.add_parser("generate", help="continue a prompt with a saved checkpoint")
    gen.add_argument("--model", required=True, help="checkpoint directory (config.json, safetensors, tokenizer)")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    gen.add_argument("--temperature", type=float, default=0.8)
    gen.add_argument("--top-k", type=int, default=None)
    gen.add_argument("--top-p", type=float, default=None)
    gen.add_argument("--repetition-penalty", type=float, default=1.0)
    gen.add_argument("--num-beams", type=int, default=1, help="beam search (with --greedy)")
    gen.add_argument("--length-penalty", type=float, default=1.0)
    gen.add_argument("--penalty-alpha", type=float, default=None, help="contrastive search (with --top-k)")
    gen.add_argument("--adapter", help="a PEFT adapter folder (LoRA or prompt tuning) for --model")
    gen.add_argument("--draft-model", help="checkpoint of a small draft model for speculative decoding")
    gen.add_argument("--num-draft-tokens", type=int, default=4)
    gen.add_argument("--stop", nargs="+", metavar="TEXT", help="stop strings")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--compile", action="store_true",
                     help="compile the decode step (a CUDA graph on GPU; the first run pays the compilation)")
    gen.add_argument("--device", default=None, help="cpu or cuda (default: cpu)")
    gen.set_defaults(func=_generate)

    quant = sub.add_parser("quantize", help="post-training int8 quantization of a checkpoint")
    quant.add_argument("src", help="checkpoint folder")
    quant.add_argument("dst", help="folder for the quantized checkpoint")
    quant.add_argument("--mode", default="int8_weight_only", choices=("int8_weight_only", "w8a8"))
    quant.add_argument("--group-size", type=int, default=None, help="group-wise scales (default: per channel)")
    quant.add_argument("--include-head", action="store_true", help="quantize the output head too")
    quant.add_argument("--calibration", help="text file for SmoothQuant calibration (w8a8)")
    quant.set_defaults(func=_quantize)

    info = sub.add_parser("info", help="versions, devices and available backends")
    info.set_defaults(func=_info)

    ext = sub.add_parser("build-ext", help="build (JIT) and load the C++/CUDA extension, so that automatic "
                                           "backend selection can use it")
    ext.set_defaults(func=_build_ext)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a subcommand; errors propagate as exceptions (see :func:`console_main`)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = _apply_config_file(build_parser(), argv)
    try:
        return args.func(args)
    finally:
        from fastlm.train import distributed

        distributed.teardown()


def console_main() -> int:
    """The ``fastlm`` command: a bad input or missing file ends with a one-line message and exit
    status 2 instead of a traceback (set FASTLM_DEBUG=1 for the traceback)."""
    import os

    from fastlm.io import CheckpointError

    try:
        return main()
    except (ValueError, TypeError, FileNotFoundError, NotImplementedError, CheckpointError, FloatingPointError) as err:
        if os.environ.get("FASTLM_DEBUG") == "1":
            raise
        print(f"fastlm: error: {err}", file=sys.stderr)
        return 2
