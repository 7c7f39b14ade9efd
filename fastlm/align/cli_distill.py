"""``fastlm distill``: knowledge distillation from a teacher checkpoint into a student
(a checkpoint or a new preset model) — token-level soft targets or sequence-level (see
:mod:`fastlm.align.distill`). The training options are those of ``fastlm pretrain``/``finetune``."""

from __future__ import annotations

import argparse
import dataclasses

from fastlm.cli import _report, add_parser, add_trainer_options, check_positive, check_run_options, trainer_config

#: API parameter names that the command line spells differently.
FLAG_NAMES = {"teacher_dir": "--teacher", "student_dir": "--student", "preset_name": "--preset",
              "model_dir": "--teacher"}


def add_distill(sub) -> None:
    """Register ``fastlm distill`` on the subparsers object ``sub``."""
    from fastlm.align.distill import DATA_FORMATS, DIVERGENCES, MODES, DistillConfig
    from fastlm.config import PRESETS
    from fastlm.train import TrainerConfig
    from fastlm.train.data import TEMPLATES

    defaults = {f.name: f.default for f in dataclasses.fields(TrainerConfig)}
    loss = DistillConfig()
    parser = add_parser(sub, "distill", help="knowledge distillation: a teacher checkpoint trains a student",
                        description="Distil a teacher checkpoint into a student (a checkpoint, or a new --preset "
                                    "model on the teacher's vocabulary). --mode logits: soft targets at temperature "
                                    "T, loss = alpha*T^2*D(teacher||student) + (1-alpha)*CE(student, labels) per "
                                    "target token; --mode sequence: the teacher completes the prompts and the "
                                    "student is fine-tuned on its completions. Teacher and student must share "
                                    "the tokenizer. The logged training loss is the distillation loss; validation "
                                    "(val_loss, perplexity) is the student's cross-entropy on held-out data.")
    parser.add_argument("--teacher", required=True, help="teacher checkpoint folder (with its tokenizer)")
    whom = parser.add_mutually_exclusive_group(required=True)
    whom.add_argument("--student", help="student checkpoint folder (same vocabulary and tokenizer as the teacher)")
    whom.add_argument("--preset", choices=sorted(PRESETS),
                      help="build a new student of this preset on the teacher's vocabulary")
    parser.add_argument("--data", nargs="+", required=True, metavar="PATH",
                        help="text files, folders or jsonl (a corpus: every next token is distilled), or one "
                             'prompt/completion jsonl ({"prompt", "completion"} or {"messages"}; the completions '
                             "are distilled); --mode sequence: one jsonl of prompts")
    parser.add_argument("--data-format", default="auto", choices=DATA_FORMATS,
                        help="auto: one .jsonl whose rows have prompt/messages is prompt-completion, anything "
                             "else text")
    parser.add_argument("--mode", default="logits", choices=MODES,
                        help="logits: token-level soft targets; sequence: fine-tune on the teacher's completions")
    parser.add_argument("--temperature", type=float, default=loss.temperature,
                        help="softmax temperature T of the soft targets (loss scaled by T^2)")
    parser.add_argument("--divergence", default=loss.divergence, choices=DIVERGENCES,
                        help="forward_kl: KL(teacher||student); reverse_kl: KL(student||teacher); jsd: generalised "
                             "Jensen-Shannon with --jsd-beta")
    parser.add_argument("--jsd-beta", type=float, default=loss.jsd_beta,
                        help="beta of the generalised JSD, in (0, 1) (--divergence jsd)")
    parser.add_argument("--alpha", type=float, default=loss.alpha,
                        help="weight of the soft-target term, in [0, 1]; 1 - alpha weighs the hard-label "
                             "cross-entropy")
    parser.add_argument("--teacher-dtype", default="fp32", choices=("fp32", "bf16", "fp16"),
                        help="dtype the teacher's weights are loaded in (bf16 halves its memory)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (text) or example")
    parser.add_argument("--val-fraction", type=float, default=0.05,
                        help="fraction of documents (or examples) held out for validation")
    parser.add_argument("--on-bad-file", default="error", choices=("error", "skip"),
                        help="a --data text file that is not UTF-8: refuse it, or skip it with a warning")
    parser.add_argument("--template", default=None, choices=("chat", *TEMPLATES),
                        help="prompt template of prompt/completion data (default: chat when the tokenizer has "
                             "one, else plain)")
    parser.add_argument("--truncation", default="right", choices=("right", "left"),
                        help="over-long examples: right cuts the completion's end, left the prompt's start")
    gen = parser.add_argument_group("sequence-level generation (--mode sequence)")
    gen.add_argument("--max-new-tokens", type=int, default=128, help="longest teacher completion in tokens")
    gen.add_argument("--do-sample", action="store_true", help="sample the completions (default: greedy)")
    gen.add_argument("--gen-temperature", type=float, default=1.0, help="sampling temperature (--do-sample)")
    gen.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens (--do-sample)")
    gen.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass (--do-sample)")
    gen.add_argument("--gen-batch-size", type=int, default=16, help="prompts completed per batch")
    add_trainer_options(parser, {**defaults, "out": "runs/distill"})
    parser.set_defaults(func=run_distill, flag_names=FLAG_NAMES)


def run_distill(args: argparse.Namespace) -> int:
    from fastlm.align.distill import DistillConfig, distill

    check_run_options(args)
    check_positive(args, "seq_len", "max_new_tokens", "gen_batch_size", "top_k")
    loss = DistillConfig(temperature=args.temperature, divergence=args.divergence, jsd_beta=args.jsd_beta,
                         alpha=args.alpha)
    sampling = [flag for flag, given in (("--do-sample", args.do_sample), ("--top-k", args.top_k is not None),
                                         ("--top-p", args.top_p is not None)) if given]
    if args.mode == "logits" and sampling:
        raise ValueError(f"{sampling[0]} applies to the teacher's completions of --mode sequence, not --mode logits")
    if not args.do_sample and sampling:
        raise ValueError(f"{sampling[0]} applies to sampled completions: add --do-sample")
    output = distill(trainer_config(args), teacher_dir=args.teacher, student_dir=args.student,
                     preset_name=args.preset, data=args.data, mode=args.mode, loss=loss,
                     data_format=args.data_format, template=args.template, seq_len=args.seq_len,
                     val_fraction=args.val_fraction, truncation=args.truncation,
                     max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
                     gen_temperature=args.gen_temperature, top_k=args.top_k, top_p=args.top_p,
                     gen_batch_size=args.gen_batch_size, teacher_dtype=args.teacher_dtype, resume=args.resume,
                     overwrite=args.overwrite, on_bad_file=args.on_bad_file)
    _report(output.result, args.out)
    return 0
