"""Evidence that distillation works: a student trained with the teacher's soft targets beats an
identical student trained on the hard labels alone, at the same steps (CPU, a few minutes).

1. A 4-layer teacher (plus its byte-level BPE) is trained on Python standard-library sources
   (the corpus ``fastlm demo``/``pretrain`` use by default).
2. Identical 2-layer students (same initial weights, same data order, same schedule, same
   steps) are trained on the teacher's training text (or a slice of it, ``--transfer-tokens``):
   one on the hard labels alone (cross-entropy, the plain Trainer), the others with soft targets
   (:class:`fastlm.align.distill.DistillTrainer`, forward KL at temperature T mixed with the
   cross-entropy by α; each ``--soft`` setting is compared with the hard-label student).
3. On held-out documents neither saw: perplexity against the true next tokens, top-1
   agreement with the teacher's argmax, and KL(teacher‖student) at T = 1.

    PYTHONPATH=. python bench/align/demo_distill.py    # writes bench/results/align/distill.{json,md}
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.common import environment, write_results  # noqa: E402
from fastlm import Model, ModelConfig  # noqa: E402
from fastlm.align.distill import DistillConfig, DistillTrainer  # noqa: E402
from fastlm.data import HFTokenizer, default_corpus_texts, split_train_val, tokenize_stream  # noqa: E402
from fastlm.train import PackedSource, Trainer, TrainerConfig  # noqa: E402


def _config(tokenizer, hidden, layers, heads, context):
    return ModelConfig(arch="llama", vocab_size=tokenizer.vocab_size, hidden_size=hidden, num_layers=layers,
                       num_heads=heads, num_kv_heads=heads, intermediate_size=hidden * 8 // 3,
                       max_position_embeddings=context, tie_word_embeddings=True,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)


@torch.no_grad()
def held_out(student: Model, teacher: Model, windows: torch.Tensor) -> dict:
    """Perplexity (true next tokens), top-1 agreement with the teacher and KL(teacher‖student)
    over every position of the held-out windows (M, seq_len + 1)."""
    student.eval()
    teacher.eval()
    nll = agree = kl = 0.0
    count = 0
    for chunk in windows.split(16):
        ids, labels = chunk[:, :-1], chunk[:, 1:]
        zs, zt = student(ids).float(), teacher(ids).float()
        nll += F.cross_entropy(zs.flatten(0, 1), labels.flatten(), reduction="sum").item()
        agree += (zs.argmax(-1) == zt.argmax(-1)).sum().item()
        lt, ls = F.log_softmax(zt, -1), F.log_softmax(zs, -1)
        kl += (lt.exp() * (lt - ls)).sum().item()
        count += labels.numel()
    return {"held_out_ppl": math.exp(nll / count), "top1_agreement": agree / count, "kl_teacher_student": kl / count}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus-bytes", type=int, default=600_000, help="size of the stdlib corpus")
    parser.add_argument("--vocab-size", type=int, default=512, help="BPE vocabulary")
    parser.add_argument("--seq-len", type=int, default=64, help="tokens per training sequence")
    parser.add_argument("--teacher-steps", type=int, default=250, help="teacher optimizer steps")
    parser.add_argument("--student-steps", type=int, default=150, help="optimizer steps of each student")
    parser.add_argument("--transfer-tokens", type=int, default=0,
                        help="tokens of the students' transfer set, a slice of the teacher's training text "
                             "(0: all of it)")
    parser.add_argument("--soft", nargs="+", default=["1:0.5", "2:0.5"], metavar="T:ALPHA",
                        help="soft-target students as temperature:alpha (the first: the API's defaults)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "align"), help="results folder")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1: the tiny matmuls gain nothing from more on a shared machine)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    start, cpu = time.perf_counter(), time.process_time()

    texts = default_corpus_texts(max_bytes=args.corpus_bytes)
    train_texts, val_texts = split_train_val(texts, val_fraction=0.1, seed=0)
    tokenizer = HFTokenizer.train_bpe(train_texts, vocab_size=args.vocab_size)
    train_tokens = tokenize_stream(train_texts, tokenizer)
    val_tokens = tokenize_stream(val_texts, tokenizer)
    L = args.seq_len
    windows = val_tokens[: (val_tokens.numel() - 1) // L * L + 1]
    held = torch.stack([windows[i:i + L + 1] for i in range(0, windows.numel() - L - 1, L)])[:128]
    transfer = train_tokens[: args.transfer_tokens] if args.transfer_tokens else train_tokens
    soft = [tuple(float(x) for x in item.split(":")) for item in args.soft]
    common = dict(batch_size=16, device="cpu", progress=False, eval_batches=4, keep_last=1, weight_decay=0.1)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)
        teacher = Model(_config(tokenizer, 128, 4, 4, 2 * L))
        source = PackedSource(train_tokens, seq_len=L, batch_size=16, seed=0)
        t0 = time.perf_counter()
        Trainer(teacher, source, TrainerConfig(out=str(tmp / "teacher"), max_steps=args.teacher_steps, lr=3e-3,
                                               **common)).fit()
        teacher_seconds = time.perf_counter() - t0
        teacher_eval = held_out(teacher, teacher, held)

        students = {}
        for n, setting in enumerate([None, *soft]):
            torch.manual_seed(1)  # the same initial student
            student = Model(_config(tokenizer, 64, 2, 4, 2 * L))
            source = PackedSource(transfer, seq_len=L, batch_size=16, seed=0)
            config = TrainerConfig(out=str(tmp / f"student{n}"), max_steps=args.student_steps, lr=3e-3, **common)
            t0 = time.perf_counter()
            if setting is None:
                Trainer(student, source, config).fit()
            else:
                loss = DistillConfig(temperature=setting[0], divergence="forward_kl", alpha=setting[1])
                DistillTrainer(student, teacher, source, config, loss).fit()
            students[setting] = dict(held_out(student, teacher, held), train_seconds=time.perf_counter() - t0,
                                     parameters=student.num_parameters())

    records = [{"model": "teacher (4 layers, hidden 128)", "objective": "pretraining", "steps": args.teacher_steps,
                **teacher_eval, "train_seconds": teacher_seconds, "parameters": teacher.num_parameters()}]
    records[0]["top1_agreement"] = 1.0
    for setting, figures in students.items():
        name, objective = ("hard labels only", "cross-entropy") if setting is None else (
            f"soft targets T={setting[0]:g}, α={setting[1]:g}",
            f"{setting[1]:g}·T²·KL(teacher‖student) + {1 - setting[1]:g}·CE")
        records.append({"model": f"student (2 layers, hidden 64): {name}", "objective": objective,
                        "steps": args.student_steps, **figures})
    hard = students[None]
    lines, won = [], {}
    for setting in soft:
        s = students[setting]
        wins = {"held-out perplexity": s["held_out_ppl"] < hard["held_out_ppl"],
                "top-1 agreement": s["top1_agreement"] > hard["top1_agreement"]}
        won[f"T={setting[0]:g},alpha={setting[1]:g}"] = wins
        verdict = ("wins on both" if all(wins.values()) else
                   "wins on " + " and ".join(k for k, v in wins.items() if v) if any(wins.values()) else
                   "LOSES on both")
        lines.append(f"- T={setting[0]:g}, α={setting[1]:g}: held-out perplexity {s['held_out_ppl']:.2f} vs "
                     f"{hard['held_out_ppl']:.2f} (hard labels), top-1 agreement with the teacher "
                     f"{s['top1_agreement']:.3f} vs {hard['top1_agreement']:.3f}, KL(teacher‖student) "
                     f"{s['kl_teacher_student']:.3f} vs {hard['kl_teacher_student']:.3f}: {verdict}")
    notes = (f"Teacher held-out perplexity {teacher_eval['held_out_ppl']:.2f}. Soft-target students vs the "
             "hard-label student (same initial weights, data order and steps), as measured:\n" + "\n".join(lines)
             + f"\n\nWhole demo: {time.perf_counter() - start:.0f} s wall, {time.process_time() - cpu:.0f} s CPU "
             "(one thread; the machine was shared with other jobs).")
    meta = {"corpus": f"Python stdlib sources, {args.corpus_bytes} bytes, 10% of documents held out",
            "tokenizer": f"byte-level BPE, {tokenizer.vocab_size} tokens", "seq_len": L,
            "transfer_set_tokens": int(transfer.numel()), "teacher_training_tokens": int(train_tokens.numel()),
            "held_out_tokens": int(held[:, 1:].numel()), "batch_size": 16, "lr": 3e-3,
            "soft_targets_won": won}
    paths = write_results("distill", records, args.out, device="cpu", env=environment("cpu"), meta=meta, notes=notes)
    print(notes)
    print("wrote", ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
