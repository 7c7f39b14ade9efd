"""``fastlm generate``: the same defaults as :func:`fastlm.generate` (greedy unless a sampling
option is given), every option checked before anything is loaded or printed, and ``--template``
/ ``--chat`` to wrap the prompt in the template a model was fine-tuned with."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from fastlm._naming import shown


def add_generate(sub) -> None:
    from fastlm.cli import add_parser
    from fastlm.train.data import TEMPLATES

    gen = add_parser(sub, "generate", help="continue a prompt with a saved checkpoint",
                     description="Continue a prompt with a saved checkpoint: greedy by default, sampling when "
                                 "--do-sample, --temperature, --top-k or --top-p is given (as fastlm.generate).")
    gen.add_argument("--model", required=True, help="checkpoint directory (config.json, safetensors, tokenizer)")
    gen.add_argument("--prompt", required=True, help="the text to continue (or the user's message with --template)")
    gen.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most")
    gen.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    gen.add_argument("--greedy", action="store_true", help="greedy decoding (the default; refuses sampling options)")
    gen.add_argument("--temperature", type=float, default=None, help="sampling temperature; implies --do-sample "
                     "(default: 1.0 when sampling)")
    gen.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens; implies "
                     "--do-sample (the candidate count with --penalty-alpha)")
    gen.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold in (0, 1]; implies "
                     "--do-sample")
    gen.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeated tokens")
    gen.add_argument("--num-beams", type=int, default=1, help="beam search with this many beams (greedy)")
    gen.add_argument("--length-penalty", type=float, default=1.0, help="beam search: exponent of the length "
                     "normalization")
    gen.add_argument("--penalty-alpha", type=float, default=None, help="contrastive search degeneration penalty "
                     "in [0, 1] (with --top-k)")
    gen.add_argument("--adapter", help="a PEFT adapter folder (LoRA or prompt tuning) for --model")
    gen.add_argument("--draft-model", help="checkpoint of a small draft model for speculative decoding")
    gen.add_argument("--num-draft-tokens", type=int, default=4, help="tokens the draft model proposes per step")
    gen.add_argument("--stop", nargs="+", metavar="TEXT", help="stop strings")
    gen.add_argument("--template", choices=("chat", *TEMPLATES),
                     help="wrap --prompt in this prompt template (chat: the tokenizer's chat template, as one user turn)")
    gen.add_argument("--chat", action="store_true", help="wrap --prompt in the template the model (or --adapter) "
                     "was fine-tuned with by fastlm finetune")
    gen.add_argument("--seed", type=int, default=0, help="seed of sampling")
    gen.add_argument("--compile", action="store_true",
                     help="compile the decode step (a CUDA graph on GPU; the first run pays the compilation)")
    gen.add_argument("--device", default=None, help="cpu or cuda (default: cpu)")
    gen.set_defaults(func=run_generate)


def _recorded_template(*directories: str | None) -> str:
    from fastlm.io.validate import read_json_file
    from fastlm.train.data import TEMPLATES
    from fastlm.train.recipes import TEMPLATE_FILE

    for directory in directories:
        if directory is not None and (Path(directory) / TEMPLATE_FILE).is_file():
            name = read_json_file(Path(directory) / TEMPLATE_FILE).get("template")
            if name != "chat" and name not in TEMPLATES:
                raise ValueError(f"{Path(directory) / TEMPLATE_FILE} names an unknown template {name!r}")
            return name
    shown_dirs = " or ".join(d for d in directories if d)
    raise ValueError(f"--chat: {shown_dirs} records no prompt template ({TEMPLATE_FILE}, written by fastlm "
                     "finetune); name one with --template")


def check_sampling_and_model(args: argparse.Namespace, *positive: str) -> None:
    """The checks ``fastlm generate`` and ``fastlm chat`` share: positive counts (``max_new_tokens``,
    ``top_k`` and the ``positive`` options), temperature / repetition penalty > 0, top-p in (0, 1],
    the device, the model directory and the adapter directory."""
    from fastlm.cli import check_device, check_positive
    from fastlm.io.validate import check_adapter_dir, check_model_dir

    check_positive(args, "max_new_tokens", "top_k", *positive)
    check_positive(args, "temperature", "repetition_penalty", low=0, strict=True)
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1], got {args.top_p}")
    check_device(args.device)
    check_model_dir(args.model, "--model")
    if args.adapter:
        check_adapter_dir(args.adapter, "--adapter")


def check_generate(args: argparse.Namespace) -> tuple[bool, str | None]:
    """Check every option before any work; returns (do_sample, template)."""
    from fastlm.io.validate import check_model_dir

    if not args.prompt:
        raise ValueError("--prompt is empty; give the text to continue")
    check_sampling_and_model(args, "num_beams", "num_draft_tokens")
    if args.penalty_alpha is not None:
        if not 0 <= args.penalty_alpha <= 1:
            raise ValueError(f"--penalty-alpha must be in [0, 1], got {args.penalty_alpha}")
        if args.top_k is None or args.top_k < 2:
            raise ValueError("--penalty-alpha (contrastive search) needs --top-k >= 2 candidates")
    sampling = [f for f, given in (("--do-sample", args.do_sample), ("--temperature", args.temperature is not None),
                                   ("--top-p", args.top_p is not None),
                                   ("--top-k", args.top_k is not None and args.penalty_alpha is None)) if given]
    if args.greedy and sampling:
        raise ValueError(f"--greedy excludes the sampling option(s) {', '.join(sampling)}")
    strategies = [name for name, on in (("--num-beams", args.num_beams > 1), ("--penalty-alpha",
                  args.penalty_alpha is not None), ("--draft-model", args.draft_model is not None)) if on]
    if len(strategies) > 1:
        raise ValueError(f"choose one decoding strategy, got {' and '.join(strategies)}")
    if strategies and strategies[0] != "--draft-model" and sampling:
        raise ValueError(f"{strategies[0]} is a greedy strategy; drop {', '.join(sampling)}")
    if args.compile and strategies:
        raise ValueError(f"--compile works with greedy and sampling decoding, not with {strategies[0]}")
    if strategies and args.stop:
        raise ValueError(f"--stop works with greedy and sampling decoding, not with {strategies[0]}")
    if args.template and args.chat:
        raise ValueError("--template and --chat exclude each other (--chat uses the template recorded with the model)")
    if args.draft_model:
        check_model_dir(args.draft_model, "--draft-model")
    template = _recorded_template(args.adapter, args.model) if args.chat else args.template
    return bool(sampling), template


def _load_model(directory: str, device: str | None):
    """A checkpoint directory, quantized (config.json has "quantization") or not."""
    from fastlm import from_pretrained
    from fastlm.io.checkpoint import read_hf_config
    from fastlm.quant import load_quantized

    if "quantization" in read_hf_config(directory):
        return load_quantized(directory, device=device)
    return from_pretrained(directory, device=device)


def run_generate(args: argparse.Namespace) -> int:
    from fastlm import generate, generate_stream, load_tokenizer
    from fastlm.chat import stop_ids  # generation_config.json's eos ids (all of them), else the tokenizer's
    from fastlm.train.data import TEMPLATES

    do_sample, template = check_generate(args)
    tokenizer = load_tokenizer(args.model)
    if template == "chat":  # the model's own chat template, one user turn, as fine-tuning rendered it
        ids = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True)
    elif template:
        ids = tokenizer.encode(TEMPLATES[template][0].format(prompt=args.prompt),  # as in training
                               add_bos=tokenizer.bos_token_id is not None, split_special_tokens=False if template == "chatml" else None)
    else:
        ids = tokenizer.encode(args.prompt)
    if not ids:
        raise ValueError(f"{shown('prompt')} encodes to no tokens; give a non-empty prompt")
    model = _load_model(args.model, args.device)
    if args.adapter:
        from fastlm import peft

        model = peft.from_pretrained(model, args.adapter)
    options = dict(max_new_tokens=args.max_new_tokens, do_sample=do_sample,
                   temperature=1.0 if args.temperature is None else args.temperature, top_k=args.top_k,
                   top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                   eos_token_id=stop_ids(model, tokenizer), seed=args.seed, compile=args.compile)
    special = dict(num_beams=args.num_beams, length_penalty=args.length_penalty, penalty_alpha=args.penalty_alpha)
    if args.draft_model:
        special.update(draft_model=_load_model(args.draft_model, args.device),
                       num_draft_tokens=args.num_draft_tokens)
    prompt = torch.tensor([ids], device=model.device)
    shown_prompt = "" if template else args.prompt
    if args.num_beams > 1 or args.penalty_alpha is not None or args.draft_model:
        tokens = generate(model, prompt, **options, **special)
        out = tokenizer.decode(tokens[0].tolist(), skip_special_tokens=True)
        print(out if not template else tokenizer.decode(tokens[0, len(ids):].tolist(), skip_special_tokens=True))
        return 0
    # Stream: print the text as tokens arrive (holding back an incomplete UTF-8 character).
    print(shown_prompt, end="", flush=True)
    generated: list[int] = []
    shown_text = ""
    for token in generate_stream(model, prompt, stop_strings=args.stop, tokenizer=tokenizer, **options):
        generated.append(int(token[0]))
        decoded = tokenizer.decode(generated, skip_special_tokens=True)
        if not decoded.endswith("\ufffd"):
            print(decoded[len(shown_text):], end="", flush=True)
            shown_text = decoded
    print(tokenizer.decode(generated, skip_special_tokens=True)[len(shown_text):])
    return 0

