"""The ``fastlm`` command (also ``python -m fastlm``).

Subcommands:
  demo      train a BPE tokenizer and a tiny model on a corpus (default: Python's own standard
            library sources), report validation perplexity, save the checkpoint, generate text
  generate  continue a prompt with a saved checkpoint
  info      versions, devices and which op backends are available
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch


def _demo(args: argparse.Namespace) -> int:
    from fastlm import generate, preset
    from fastlm.data import HFTokenizer, default_corpus_texts, read_texts, split_train_val, tokenize_stream
    from fastlm.model import Model
    from fastlm.train import TrainConfig, train

    torch.manual_seed(args.seed)
    start = time.perf_counter()
    if args.corpus:
        texts = read_texts(args.corpus)
        source = ", ".join(args.corpus)
    else:
        texts = default_corpus_texts(max_bytes=args.max_bytes)
        source = "the Python standard library's sources"
    train_texts, val_texts = split_train_val(texts, val_fraction=0.05, seed=args.seed)
    print(f"corpus: {len(texts)} documents, {sum(map(len, texts)) / 1e6:.1f} M characters from {source}")

    tokenizer = HFTokenizer.train_bpe(train_texts, vocab_size=args.vocab_size)
    train_tokens = tokenize_stream(train_texts, tokenizer)
    val_tokens = tokenize_stream(val_texts, tokenizer)
    print(f"tokenizer: byte-level BPE, {tokenizer.vocab_size} tokens; "
          f"{train_tokens.numel():,} training and {val_tokens.numel():,} validation tokens")

    config = preset(
        args.preset,
        vocab_size=tokenizer.vocab_size,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = Model(config)
    print(f"model: preset {args.preset!r} ({config.arch}), {model.num_parameters() / 1e6:.2f} M parameters")
    train_config = TrainConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
                               warmup_steps=min(20, args.steps // 10), seed=args.seed)
    result = train(model, train_tokens, train_config, val_tokens=val_tokens)
    print(f"training loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f}; "
          f"validation loss {result.val_loss:.3f}, perplexity {result.val_perplexity:.2f}")

    out = Path(args.out)
    model.save_pretrained(out)
    tokenizer.save(out)
    print(f"saved checkpoint and tokenizer to {out}")

    prompt_ids = torch.tensor([tokenizer.encode(args.prompt)])
    generator = torch.Generator().manual_seed(args.seed)
    # No eos_token_id: the end-of-document token would often end the short sample at once.
    tokens = generate(model, prompt_ids, max_new_tokens=args.max_new_tokens, do_sample=True,
                      temperature=0.8, top_k=50, generator=generator)
    print("--- sample ---")
    print(tokenizer.decode(tokens[0].tolist()))
    print("--------------")
    print(f"done in {time.perf_counter() - start:.0f} s")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from fastlm import from_pretrained, generate, load_tokenizer

    model = from_pretrained(args.model, device=args.device)
    tokenizer = load_tokenizer(args.model)
    ids = tokenizer.encode(args.prompt)
    if not ids:
        raise SystemExit("fastlm generate: the prompt encodes to no tokens; give a non-empty --prompt")
    generator = torch.Generator(device=model.device).manual_seed(args.seed)
    tokens = generate(model, torch.tensor([ids], device=model.device), max_new_tokens=args.max_new_tokens,
                      do_sample=not args.greedy, temperature=args.temperature, top_k=args.top_k,
                      top_p=args.top_p, generator=generator, eos_token_id=tokenizer.eos_token_id)
    print(tokenizer.decode(tokens[0].tolist()))
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastlm", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="train a tokenizer and a tiny model, report perplexity, generate")
    demo.add_argument("--corpus", nargs="+", metavar="PATH", help="text files or folders (default: Python's stdlib)")
    demo.add_argument("--max-bytes", type=int, default=3_000_000, help="size of the default corpus")
    demo.add_argument("--out", default="runs/demo", help="where to save the checkpoint and tokenizer")
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

    gen = sub.add_parser("generate", help="continue a prompt with a saved checkpoint")
    gen.add_argument("--model", required=True, help="checkpoint directory (config.json, safetensors, tokenizer)")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    gen.add_argument("--temperature", type=float, default=0.8)
    gen.add_argument("--top-k", type=int, default=None)
    gen.add_argument("--top-p", type=float, default=None)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--device", default=None, help="cpu or cuda (default: cpu)")
    gen.set_defaults(func=_generate)

    info = sub.add_parser("info", help="versions, devices and available backends")
    info.set_defaults(func=_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    return args.func(args)
