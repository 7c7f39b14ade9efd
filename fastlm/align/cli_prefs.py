"""``fastlm reward`` (train a reward model on rankings or pairs) and ``fastlm dpo`` (DPO, IPO or
SimPO of a causal LM on preference pairs): the options of ``fastlm finetune`` (training, LoRA,
template, sequence length) plus each method's own."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from fastlm._naming import shown
from fastlm.cli import _report, add_parser, add_trainer_options, check_positive, check_run_options, trainer_config

_DATA_HELP = ('preference jsonl: {"prompt", "completions", "ranking"} (rank 1 = best, ties allowed), '
              '{"prompt", "chosen", "rejected"} (strings, or chat message lists rendered with the chat template)')


def _trainer_defaults(out: str, **overrides) -> dict:
    from fastlm.train import TrainerConfig

    return {**{f.name: f.default for f in dataclasses.fields(TrainerConfig)}, "out": out, **overrides}


def _add_data_options(parser: argparse.ArgumentParser) -> None:
    from fastlm.train.data import TEMPLATES

    parser.add_argument("--data", required=True, help=_DATA_HELP)
    parser.add_argument("--val-data", help="held-out preference jsonl (default: hold out --val-fraction of the rows)")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="fraction of --data rows held out")
    parser.add_argument("--model", required=True, help="checkpoint folder to start from")
    parser.add_argument("--template", default=None, choices=("chat", *TEMPLATES),
                        help="chat (the model's chat template; the default when the tokenizer has one), plain (the "
                             "default otherwise), alpaca or chatml, as fastlm finetune")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per sequence (prompt + completion); longer "
                                                                  "completions are cut at the end")
    parser.add_argument("--on-bad-row", default="error", choices=("error", "skip"),
                        help="bad rows (invalid ranking, empty completion, prompt over --seq-len): refuse the file "
                             "listing them (file:line), or skip them with a warning")


def _add_lora_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lora-r", type=int, default=16, help="LoRA rank")
    parser.add_argument("--lora-alpha", type=float, default=32.0, help="LoRA scale numerator (scale = alpha / r)")
    parser.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the LoRA input")
    parser.add_argument("--lora-targets", nargs="+", default=["q_proj", "k_proj", "v_proj", "o_proj"],
                        help="module names, or all-linear")


def _lora_config(args: argparse.Namespace):
    from fastlm.peft import LoraConfig

    check_positive(args, "lora_r")
    check_positive(args, "lora_alpha", low=0, strict=True)
    if not 0 <= args.lora_dropout < 1:
        raise ValueError(f"{shown('lora_dropout')} must be in [0, 1), got {args.lora_dropout}")
    targets = args.lora_targets[0] if args.lora_targets == ["all-linear"] else args.lora_targets
    return LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                      target_modules=targets)


def _common_checks(args: argparse.Namespace) -> None:
    check_run_options(args)
    check_positive(args, "seq_len", low=2)
    if not 0 < args.val_fraction < 1:
        raise ValueError(f"{shown('val_fraction')} must be in (0, 1), got {args.val_fraction}")


def _reward(args: argparse.Namespace) -> int:
    from fastlm.align.reward import train_reward_model

    _common_checks(args)
    lora = _lora_config(args) if args.method == "lora" else None
    output = train_reward_model(trainer_config(args), data=args.data, model_dir=args.model, method=args.method,
                                lora=lora, num_labels=args.num_labels, template=args.template, seq_len=args.seq_len,
                                val_data=args.val_data, val_fraction=args.val_fraction, on_bad_row=args.on_bad_row,
                                resume=args.resume, overwrite=args.overwrite)
    _report(output.result, args.out)
    if output.accuracy is not None:
        print(f"held-out pairwise accuracy {output.accuracy_before:.1%} -> {output.accuracy:.1%} "
              f"(written to {Path(args.out) / 'reward_eval.json'})")
    return 0


def _dpo(args: argparse.Namespace) -> int:
    from fastlm.align.dpo import DPOConfig, train_dpo

    _common_checks(args)
    beta = args.beta if args.beta is not None else (2.0 if args.loss == "simpo" else 0.1)
    reference = None if args.reference == "auto" else args.reference
    dpo = DPOConfig(loss=args.loss, beta=beta, label_smoothing=args.label_smoothing, simpo_gamma=args.simpo_gamma,
                    reference=reference)
    lora = _lora_config(args) if args.method == "lora" else None
    output = train_dpo(trainer_config(args), data=args.data, model_dir=args.model, dpo=dpo, method=args.method,
                       lora=lora, template=args.template, seq_len=args.seq_len, val_data=args.val_data,
                       val_fraction=args.val_fraction, on_bad_row=args.on_bad_row, resume=args.resume,
                       overwrite=args.overwrite)
    _report(output.result, args.out)
    records = [json.loads(line) for line in (Path(args.out) / "metrics.jsonl").read_text().splitlines()
               if line.strip()] if (Path(args.out) / "metrics.jsonl").is_file() else []
    if records and "rewards/accuracies" in records[-1]:
        last = records[-1]
        print(f"last step: reward accuracy {last['rewards/accuracies']:.1%}, margin {last['rewards/margins']:.3f}")
    return 0


def add_reward(sub) -> None:
    reward = add_parser(sub, "reward", help="train a reward model on rankings or preference pairs",
                        description="Train a reward model (a scalar head on the last token) with the pairwise loss "
                                    "-log sigmoid(r_chosen - r_rejected); checkpoints are "
                                    "<Family>ForSequenceClassification folders that transformers loads.")
    _add_data_options(reward)
    reward.add_argument("--method", default="full", choices=("full", "lora", "frozen"),
                        help="train every weight, LoRA adapters on the backbone (+ the head), or the head alone")
    reward.add_argument("--num-labels", type=int, default=1, choices=(1, 2),
                        help="1: a scalar reward; 2: a two-class classifier whose class-1 logit is the reward")
    _add_lora_options(reward)
    add_trainer_options(reward, _trainer_defaults("runs/reward", lr=1e-4, weight_decay=0.0))
    reward.set_defaults(func=_reward)


def add_dpo(sub) -> None:
    dpo = add_parser(sub, "dpo", help="DPO, IPO or SimPO on preference pairs",
                     description="Offline preference optimization of a causal LM: DPO (sigmoid), IPO or SimPO "
                                 "(reference-free). The reference is the starting model: its log-probs are "
                                 "computed once before training, or with --method lora by the same model with "
                                 "its adapters off.")
    _add_data_options(dpo)
    dpo.add_argument("--method", default="full", choices=("full", "lora"),
                     help="train every weight, or a LoRA adapter (checkpoints are PEFT adapters)")
    dpo.add_argument("--loss", default="sigmoid", choices=("sigmoid", "ipo", "simpo"),
                     help="sigmoid (DPO), ipo, or simpo (reference-free, length-normalised)")
    dpo.add_argument("--beta", type=float, default=None,
                     help="beta: the inverse temperature of the implicit reward (default: 0.1; 2.0 for simpo)")
    dpo.add_argument("--label-smoothing", type=float, default=0.0,
                     help="epsilon of conservative DPO / SimPO (the probability a label is flipped), in [0, 0.5)")
    dpo.add_argument("--simpo-gamma", type=float, default=0.5, help="SimPO's target reward margin gamma")
    dpo.add_argument("--reference", default="auto", choices=("auto", "precompute", "adapters_off"),
                     help="reference log-probs: auto (adapters_off with --method lora, precompute otherwise, none "
                          "for simpo), precompute (one pass before training, cached), adapters_off (LoRA only)")
    _add_lora_options(dpo)
    add_trainer_options(dpo, _trainer_defaults("runs/dpo", lr=1e-5, weight_decay=0.0))
    dpo.set_defaults(func=_dpo)


def add_parsers(sub) -> None:
    """Register ``fastlm reward`` and ``fastlm dpo``."""
    add_reward(sub)
    add_dpo(sub)
