"""Evidence that preference learning aligns, on CPU with a tiny fastlm model (a few minutes).

The synthetic task of :mod:`fastlm.align.synthetic`: prompts ``"Q17:"``, completions of 8 digits
and a newline, oracle reward = fraction of even digits (0 when the format is broken).

1. SFT (``fastlm.train.recipes.finetune``, the ``fastlm finetune`` path) of a randomly initialised
   tiny model on uniform random digits: fluent, mean oracle reward ≈ 0.5.
2. Reward model (``train_reward_model``) from the SFT checkpoint on noisy oracle rankings
   (4 completions per prompt, 10% of scores replaced at random): pairwise accuracy before/after
   on the held-out rows (noisy labels, as a user would measure it) and on fresh rankings by the
   oracle itself (clean labels) — target ≥ 90%.
3. DPO (``train_dpo``, sigmoid loss, reference log-probs cached before training) from the SFT
   checkpoint on noisy oracle pairs: sampled completions (temperature 1) of held-out prompts
   before/after: mean oracle reward, fluency, the DPO model's win rate against the SFT model on
   the same prompts (oracle; ties count half), and the trained reward model's mean score.

Writes ``bench/results/align/prefs.json`` and ``prefs.md``. Usage:
``PYTHONPATH=. python bench/align/demo_prefs.py [--out-dir DIR] [--work DIR]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from fastlm import generate
from fastlm._files import atomic_write_text
from fastlm.align import synthetic as syn
from fastlm.align.dpo import DPOConfig, train_dpo
from fastlm.align.data import load_pairs
from fastlm.align.reward import pairwise_accuracy, train_reward_model
from fastlm.config import ModelConfig
from fastlm.data import ByteTokenizer
from fastlm.model import Model
from fastlm.train.recipes import finetune
from fastlm.train.trainer import TrainerConfig

ROOT = Path(__file__).resolve().parents[2]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _last_checkpoint(out: Path) -> Path:
    return sorted((out / "checkpoints").glob("step-*"))[-1]


@torch.no_grad()
def sample(model: Model, tok: ByteTokenizer, prompts: list[str], seed: int) -> list[str]:
    """One sampled completion (temperature 1, up to 12 tokens, cut at end-of-sequence) per prompt."""
    model.eval()
    ids = [[tok.bos_token_id] + tok.encode(p) for p in prompts]
    out = generate(model, ids, max_new_tokens=12, do_sample=True, temperature=1.0, top_k=None, top_p=None,
                   eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, seed=seed)
    texts = []
    for row, prompt in zip(out, ids):
        new = [int(t) for t in row.tolist()[len(prompt):]] if len(row) > len(prompt) else []
        if tok.eos_token_id in new:
            new = new[:new.index(tok.eos_token_id)]
        else:
            new = new + [-1]  # no end-of-sequence: not a finished completion
        texts.append(tok.decode([t for t in new if 0 <= t < 256]) + ("" if -1 not in new else "<unfinished>"))
    return texts


def win_rate(a: list[str], b: list[str]) -> float:
    """Oracle win rate of completions a over b on the same prompts (ties count half)."""
    wins = sum((syn.oracle_reward(x) > syn.oracle_reward(y)) + 0.5 * (syn.oracle_reward(x) == syn.oracle_reward(y))
               for x, y in zip(a, b))
    return wins / len(a)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out-dir", default=str(ROOT / "bench" / "results" / "align"), help="results folder")
    parser.add_argument("--work", default=None, help="folder for the runs (default: a temporary one)")
    parser.add_argument("--sft-steps", type=int, default=150, help="SFT steps")
    parser.add_argument("--rm-steps", type=int, default=80, help="reward-model steps")
    parser.add_argument("--dpo-steps", type=int, default=60, help="DPO steps")
    parser.add_argument("--eval-prompts", type=int, default=256, help="held-out prompts sampled before/after")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    work = Path(args.work or tempfile.mkdtemp(prefix="demo_prefs_"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    tok = ByteTokenizer()
    torch.manual_seed(0)
    config = ModelConfig(arch="llama", vocab_size=tok.vocab_size, hidden_size=64, num_layers=2, num_heads=4,
                         num_kv_heads=2, intermediate_size=128, max_position_embeddings=32,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    Model(config).save_pretrained(work / "init")
    tok.save(work / "init")
    common = dict(progress=False, weight_decay=0.0, seed=0)

    # 1. SFT on uniform random digits
    sft_data = _write_jsonl(work / "sft.jsonl", syn.sft_rows(2000, seed=1))
    finetune(TrainerConfig(out=str(work / "sft"), max_steps=args.sft_steps, batch_size=32, lr=3e-3, **common),
             data=str(sft_data), model_dir=str(work / "init"), template="plain", seq_len=24, overwrite=True)
    sft_dir = _last_checkpoint(work / "sft")
    t_sft = time.perf_counter()

    # 2. reward model on noisy rankings
    ranks = _write_jsonl(work / "ranks.jsonl", syn.ranking_rows(600, k=4, noise=0.1, seed=2))
    rm_out = train_reward_model(TrainerConfig(out=str(work / "rm"), max_steps=args.rm_steps, batch_size=16, lr=1e-3,
                                              **common),
                                data=str(ranks), model_dir=str(sft_dir), method="full", template="plain",
                                seq_len=24, val_fraction=0.1, overwrite=True)
    clean_rows = _write_jsonl(work / "clean.jsonl", syn.ranking_rows(150, k=4, noise=0.0, seed=7))
    clean, _ = load_pairs(clean_rows, tok, template="plain", max_len=24)
    clean_accuracy = pairwise_accuracy(rm_out.model, clean, pad_id=tok.pad_token_id)
    t_rm = time.perf_counter()

    # 3. DPO on noisy pairs
    pairs = _write_jsonl(work / "pairs.jsonl", syn.pair_rows(1500, noise=0.1, seed=3))
    dpo_cfg = DPOConfig(loss="sigmoid", beta=0.1)
    dpo_out = train_dpo(TrainerConfig(out=str(work / "dpo"), max_steps=args.dpo_steps, batch_size=16, lr=1e-3,
                                      **common),
                        data=str(pairs), model_dir=str(sft_dir), dpo=dpo_cfg, template="plain", seq_len=24,
                        overwrite=True)
    t_dpo = time.perf_counter()

    from fastlm.io import from_pretrained

    sft_model = from_pretrained(sft_dir, dtype=torch.float32)
    prompts = syn.prompts(args.eval_prompts, seed=99)
    before = sample(sft_model, tok, prompts, seed=5)
    after = sample(dpo_out.model, tok, prompts, seed=5)
    rm = rm_out.model
    rm_before = sum(rm.score(prompts, before, tok)) / len(prompts)
    rm_after = sum(rm.score(prompts, after, tok)) / len(prompts)
    dpo_metrics = [json.loads(line) for line in (work / "dpo" / "metrics.jsonl").read_text().splitlines()]
    s_before, s_after = syn.summarize(before), syn.summarize(after)
    results = {
        "task": "synthetic: prompts 'Q<k>:', completions of 8 digits + newline, oracle = fraction of even digits",
        "device": "cpu", "cpu_threads": torch.get_num_threads(), "torch": torch.__version__,
        "python": platform.python_version(),
        "model": {"hidden_size": 64, "num_layers": 2, "parameters": Model(config).num_parameters()},
        "sft": {"steps": args.sft_steps, "rows": 2000, "seconds": round(t_sft - t0, 1)},
        "reward_model": {"steps": args.rm_steps, "ranking_rows": 600, "k": 4, "label_noise": 0.1,
                         "held_out_accuracy_before": rm_out.accuracy_before,
                         "held_out_accuracy_after": rm_out.accuracy,
                         "oracle_pairs": len(clean), "oracle_label_accuracy_after": clean_accuracy,
                         "seconds": round(t_rm - t_sft, 1)},
        "dpo": {"steps": args.dpo_steps, "pairs": 1500, "label_noise": 0.1, "loss": "sigmoid", "beta": 0.1,
                "reference": "precompute", "seconds": round(t_dpo - t_rm, 1),
                "last_reward_accuracy": dpo_metrics[-1].get("rewards/accuracies"),
                "last_reward_margin": dpo_metrics[-1].get("rewards/margins")},
        "eval": {"prompts": len(prompts), "sampling": "temperature 1, no top-k/top-p",
                 "sft": {**s_before, "mean_reward_model_score": rm_before},
                 "dpo": {**s_after, "mean_reward_model_score": rm_after},
                 "dpo_win_rate_vs_sft": win_rate(after, before),
                 "examples": [{"prompt": p, "sft": b, "dpo": a} for p, b, a in zip(prompts[:5], before, after)]},
        "total_seconds": round(time.perf_counter() - t0, 1),
        "load_average_1min_at_end": os.getloadavg()[0],
    }
    eval_json = json.loads((work / "rm" / "reward_eval.json").read_text())
    results["reward_model"]["held_out_pairs"] = eval_json["held_out_pairs"]
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "prefs.json", json.dumps(results, indent=2) + "\n")
    e = results["eval"]
    md = [
        "# Preference learning on the synthetic even-digits task (CPU, tiny model)",
        "",
        f"Model: llama-style, hidden 64, 2 layers, {results['model']['parameters']:,} parameters, byte tokenizer. "
        f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads. Total {results['total_seconds']} s "
        f"wall clock on a shared machine (1-minute load average {results['load_average_1min_at_end']:.1f} at the "
        "end: the times are not a benchmark).",
        "",
        "| stage | steps | data | result |",
        "|---|---|---|---|",
        f"| SFT (finetune) | {args.sft_steps} | 2000 rows, uniform digits | fluency {s_before['fluency']:.1%}, "
        f"mean oracle reward {s_before['mean_reward']:.3f} |",
        f"| reward model | {args.rm_steps} | 600 rankings × 4, 10% label noise | held-out pairwise accuracy "
        f"{rm_out.accuracy_before:.1%} → **{rm_out.accuracy:.1%}** on {eval_json['held_out_pairs']} held-out pairs "
        f"(noisy labels); **{clean_accuracy:.1%}** on {len(clean)} oracle-ranked pairs |",
        f"| DPO (sigmoid, β 0.1) | {args.dpo_steps} | 1500 pairs, 10% label noise | see below |",
        "",
        f"Sampled completions of {len(prompts)} held-out prompts (temperature 1):",
        "",
        "| model | mean oracle reward | fluency | mean reward-model score | oracle win rate vs SFT |",
        "|---|---|---|---|---|",
        f"| SFT | {s_before['mean_reward']:.3f} | {s_before['fluency']:.1%} | {rm_before:.3f} | — |",
        f"| DPO | **{s_after['mean_reward']:.3f}** | {s_after['fluency']:.1%} | {rm_after:.3f} | "
        f"**{e['dpo_win_rate_vs_sft']:.1%}** |",
        "",
        "Examples (prompt → SFT | DPO): " + "; ".join(f"`{x['prompt']}` → `{x['sft'].strip()}` | `{x['dpo'].strip()}`"
                                                     for x in e["examples"][:3]),
        "",
        "Regenerate: `PYTHONPATH=. python bench/align/demo_prefs.py`.",
    ]
    atomic_write_text(out_dir / "prefs.md", "\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
