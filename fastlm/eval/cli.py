"""``fastlm eval``: evaluate checkpoints and their variants on local tasks, side by side.

    fastlm eval --model DIR [--model DIR2 ...] [--adapter DIR ...] [--quantize int8_weight_only|w8a8 ...]
                --task FILE [FILE ...] --out DIR [--samples N]

Variants (one report row each): every ``--model`` checkpoint (plain or quantized by
``fastlm quantize``); then, made from the first ``--model``, one per ``--adapter`` (a PEFT LoRA or
prompt-tuning folder) and one per ``--quantize`` mode. Tasks: see :mod:`fastlm.eval.tasks`. The
outputs: see :mod:`fastlm.eval.report`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
QUANT_MODES = ("int8_weight_only", "w8a8")


def add_parser(sub) -> None:
    """Register the ``eval`` subcommand on ``fastlm``'s subparsers."""
    p = sub.add_parser("eval", help="evaluate checkpoints and variants on local tasks; a side-by-side report",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", required=True, metavar="DIR",
                   help="checkpoint folder (repeat for several; the first is the base of --adapter/--quantize)")
    p.add_argument("--adapter", action="append", default=[], metavar="DIR",
                   help="PEFT adapter folder applied to the first --model: one more variant (repeatable)")
    p.add_argument("--quantize", action="append", default=[], choices=QUANT_MODES,
                   help="the first --model quantized this way: one more variant (repeatable)")
    p.add_argument("--task", action="extend", nargs="+", required=True, metavar="FILE",
                   help="task files: .jsonl, or .yaml/.yml/.json descriptions")
    p.add_argument("--out", required=True, help="folder for results.json, results.md, results.png, samples.*")
    p.add_argument("--samples", type=int, default=0, metavar="N",
                   help="write N prompts per task with every variant's output side by side")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--dtype", default="auto", choices=tuple(DTYPES), help="model dtype (auto: the checkpoint's)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    p.set_defaults(func=run)


def _load(directory: str, dtype, device):
    """A checkpoint folder (quantized or not) and its tokenizer; errors name the --model folder."""
    from fastlm import from_pretrained, load_tokenizer
    from fastlm.io import CheckpointError
    from fastlm.io.checkpoint import read_hf_config
    from fastlm.quant import load_quantized

    try:
        if "quantization" in read_hf_config(directory):
            model = load_quantized(directory, dtype=dtype, device=device)
        else:
            model = from_pretrained(directory, dtype=dtype, device=device)
        tokenizer = load_tokenizer(directory)
    except (OSError, ValueError, KeyError, TypeError, CheckpointError) as err:
        raise ValueError(f"--model {directory}: the checkpoint does not load: {err}") from None
    return model.eval(), tokenizer


def _unique(name: str, taken: set[str]) -> str:
    base, k = name, 2
    while name in taken:
        name, k = f"{base}#{k}", k + 1
    taken.add(name)
    return name


def build_variants(models, adapters, quant_modes, *, dtype=None, device=None):
    """The report's variants (module docstring), checked to exist before anything runs."""
    from fastlm.eval.report import Variant

    for directory in models:
        if not Path(directory, "config.json").is_file():
            raise ValueError(f"--model {directory}: not a checkpoint folder (no config.json)")
    for directory in adapters:
        if not Path(directory, "adapter_config.json").is_file():
            raise ValueError(f"--adapter {directory}: not a PEFT adapter folder (no adapter_config.json)")
    taken: set[str] = set()
    variants = [Variant(_unique(Path(d).resolve().name, taken), d, lambda d=d: _load(d, dtype, device))
                for d in models]
    base = models[0]
    base_name = variants[0].name

    def with_adapter(path):
        from fastlm import peft

        model, tokenizer = _load(base, dtype, device)
        try:
            wrapped = peft.from_pretrained(model, path)
        except (OSError, ValueError, KeyError) as err:
            raise ValueError(f"--adapter {path}: the adapter does not load onto {base}: {err}") from None
        return wrapped.eval(), tokenizer

    def quantized(mode):
        from fastlm.quant import quantize

        model, tokenizer = _load(base, dtype, device)
        return quantize(model, mode=mode).eval(), tokenizer

    for path in adapters:
        variants.append(Variant(_unique(f"{base_name}+{Path(path).resolve().name}", taken), f"{base} + {path}",
                                lambda p=path: with_adapter(p)))
    for mode in quant_modes:
        variants.append(Variant(_unique(f"{base_name}:{mode}", taken), f"{base} quantized {mode}",
                                lambda m=mode: quantized(m)))
    return variants


def run(args: argparse.Namespace) -> int:
    from fastlm.eval.report import evaluate_variants, write_report
    from fastlm.eval.tasks import load_task

    if args.samples < 0:
        raise ValueError(f"--samples must be >= 0, got {args.samples}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tasks = [load_task(path) for path in args.task]  # every task file is checked before any model runs
    from fastlm.eval.metrics import check_available

    for task in tasks:  # a missing optional package is reported before any model runs
        for metric in task.metrics:
            try:
                check_available(metric)
            except ImportError as err:
                raise ValueError(f"--task {task.path}: metric {metric!r}: {err}") from None
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise ValueError(f"--task: two tasks share a name ({', '.join(names)}); give each a distinct `name`")
    variants = build_variants(args.model, args.adapter, args.quantize, dtype=DTYPES[args.dtype], device=device)
    rows = evaluate_variants(variants, tasks, batch_size=args.batch_size, progress=None if args.progress else False,
                             log=print)
    for message in write_report(rows, tasks, args.out, samples=args.samples):
        print(message)
    print(Path(args.out, "results.md").read_text(encoding="utf-8"))
    print(f"results.json, results.md{', results.png' if Path(args.out, 'results.png').exists() else ''}"
          f"{', samples.md, samples.html' if args.samples and Path(args.out, 'samples.md').exists() else ''} "
          f"in {args.out}")
    return 0
