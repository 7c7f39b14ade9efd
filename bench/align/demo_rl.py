"""Evidence that PPO and GRPO align, and that the KL term prevents reward hacking (CPU, tiny model).

1. SFT a tiny fastlm model (byte tokenizer) on :mod:`fastlm.align.synthetic`'s rows: 8 uniform
   random digits then "\\n" after prompts "Q<k>:" — fluent, mean oracle reward ≈ 0.5.
2. PPO and GRPO from that model with ``reward_fn`` = the oracle (fraction of even digits of a
   fluent completion): the oracle reward should rise while the KL to the SFT reference stays
   bounded and the completions stay fluent.
3. Reward hacking: PPO on a *proxy* reward that can be hacked — the number of even digits / 8,
   any length, no format check — with the KL penalty off (β = 0) and on. Without the KL term the
   policy drifts from the format (longer completions: proxy up, fluency and oracle down); with
   it, it stays near the reference.

Each policy is evaluated before and after on held-out prompts (sampling at temperature 1):
mean oracle reward, fluency, proxy reward, mean response length, and the KL to the reference
(per completion Σ_t log π − log π_ref, averaged). Writes bench/results/align/rl.{json,md}.

    PYTHONPATH=. python bench/align/demo_rl.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

from fastlm.align import synthetic
from fastlm.align import rollout as R
from fastlm.align.grpo import GRPOTrainer
from fastlm.align.logprobs import token_logprobs
from fastlm.align.ppo import PPOTrainer, RLConfig
from fastlm.config import preset
from fastlm.data.tokenizer import ByteTokenizer
from fastlm.model import Model
from fastlm.train.data import encode_example
from fastlm.train.trainer import TrainerConfig

RESULTS = Path(__file__).resolve().parents[1] / "results" / "align"


def oracle_fn(prompts, completions):
    """The task's oracle: fraction of even digits of a fluent completion (0 otherwise)."""
    return synthetic.oracle_rewards(completions)


def proxy_fn(prompts, completions):
    """A hackable proxy: even digits anywhere in the completion / 8 — longer is better, no format check."""
    return [sum(ch in "02468" for ch in c) / synthetic.COMPLETION_DIGITS for c in completions]


def tiny_model(seed: int) -> Model:
    torch.manual_seed(seed)
    return Model(preset("tiny", vocab_size=259, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                        intermediate_size=128, max_position_embeddings=40))


def sft(model: Model, tok, *, steps: int, batch: int, seed: int) -> list[float]:
    """Plain supervised fine-tuning on synthetic.sft_rows (loss on the completion and eos)."""
    rows = synthetic.sft_rows(steps * batch, seed=seed)
    examples = [encode_example(tok, r["prompt"], r["completion"], "plain", 32) for r in rows]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    losses = []
    model.train()
    for s in range(steps):
        chunk = examples[s * batch:(s + 1) * batch]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.full((batch, width), tok.pad_token_id)
        labels = torch.full((batch, width), -100)
        for i, (x, y) in enumerate(chunk):
            ids[i, :len(x)], labels[i, :len(y)] = torch.tensor(x), torch.tensor(y)
        logits = model(ids[:, :-1], validate=False)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses


@torch.no_grad()
def evaluate(policy: Model, reference: Model, tok, prompts: list[str], *, max_new_tokens: int, seed: int) -> dict:
    settings = R.GenerationSettings(max_new_tokens=max_new_tokens)
    ids = R.encode_prompts(tok, prompts, max_len=policy.config.context_length - max_new_tokens)
    seqs = R.sample_completions(policy, tok, ids, settings, generator=torch.Generator().manual_seed(seed))
    lp = token_logprobs(policy.eval(), seqs.input_ids, attention_mask=seqs.attention_mask) * seqs.target_mask
    ref = token_logprobs(reference.eval(), seqs.input_ids, attention_mask=seqs.attention_mask) * seqs.target_mask
    summary = synthetic.summarize(seqs.completions)
    return {"oracle_reward": summary["mean_reward"], "fluency": summary["fluency"],
            "proxy_reward": sum(proxy_fn(prompts, seqs.completions)) / len(prompts),
            "response_length": float(seqs.target_mask.sum(1).mean()),
            "kl_to_reference": float((lp - ref).sum(1).mean()),
            "examples": seqs.completions[:4]}


def run_rl(name, trainer_cls, sft_state, tok, train_prompts, eval_prompts, reward_fn, rl, *, steps, batch, lr,
           minibatches, out_root, seed):
    policy = tiny_model(seed)
    policy.load_state_dict(sft_state)
    reference = tiny_model(seed)
    reference.load_state_dict(sft_state)
    config = TrainerConfig(out=str(out_root / name), max_steps=steps, batch_size=batch // minibatches, lr=lr,
                           warmup_steps=0, schedule="constant", weight_decay=0.0, device="cpu", progress=False,
                           seed=seed)
    trainer = trainer_cls(policy, tok, train_prompts, R.RewardSource(reward_fn=reward_fn), config, rl,
                          reference=reference)
    start = time.perf_counter()
    trainer.fit()
    seconds = time.perf_counter() - start
    metrics = [json.loads(line) for line in (out_root / name / "metrics.jsonl").read_text().splitlines()]
    after = evaluate(policy, reference, tok, eval_prompts, max_new_tokens=rl.generation.max_new_tokens, seed=seed + 1)
    keep = ("step", "reward", "kl", "entropy", "clip_fraction", "value_loss", "response_length", "kl_coef",
            "rollout_tokens_per_s", "train_tokens_per_s")
    return {"method": trainer_cls.__name__.replace("Trainer", ""), "kl_coef": rl.kl_coef,
            "reward": reward_fn.__name__, "lr": lr, "optimizer_steps": steps, "rollouts": steps // trainer.steps_per_rollout,
            "rollout_size": batch, "seconds": seconds, "after": after,
            "curve": [{k: m[k] for k in keep if k in m} for m in metrics]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few steps of each (a smoke test)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the models, data and sampling")
    parser.add_argument("--no-write", action="store_true", help="print the results, write nothing")
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny matmuls: one thread avoids spin-waits on a shared CPU
    random.seed(args.seed)
    q = args.quick
    tok = ByteTokenizer()
    t0 = time.perf_counter()
    model = tiny_model(args.seed)
    sft_losses = sft(model, tok, steps=20 if q else 200, batch=64, seed=args.seed)
    sft_state = {k: v.clone() for k, v in model.state_dict().items()}
    train_prompts = synthetic.prompts(200, seed=args.seed + 10)
    eval_prompts = synthetic.prompts(32 if q else 128, seed=args.seed + 20)
    reference = tiny_model(args.seed)
    reference.load_state_dict(sft_state)
    before = evaluate(model, reference, tok, eval_prompts, max_new_tokens=12, seed=args.seed + 1)
    before_long = evaluate(model, reference, tok, eval_prompts, max_new_tokens=24, seed=args.seed + 1)
    rollouts = 3 if q else 25
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        common = dict(sft_state=sft_state, tok=tok, train_prompts=train_prompts, eval_prompts=eval_prompts,
                      out_root=root, seed=args.seed)
        gen12, gen24 = R.GenerationSettings(max_new_tokens=12), R.GenerationSettings(max_new_tokens=24)
        # learning rates chosen on this task (GRPO at 2e-3 or PPO at 1e-3 on the oracle diverged); per method,
        # the proxy pair differs only in β
        runs["grpo_oracle"] = run_rl("grpo_oracle", GRPOTrainer, reward_fn=oracle_fn, steps=rollouts, batch=64,
                                     lr=1e-3, minibatches=1, rl=RLConfig(generation=gen12, group_size=8,
                                                                         kl_coef=0.04), **common)
        runs["ppo_oracle"] = run_rl("ppo_oracle", PPOTrainer, reward_fn=oracle_fn, steps=rollouts * 4, batch=64,
                                    lr=3e-4, minibatches=2, rl=RLConfig(generation=gen12, epochs=2, num_minibatches=2,
                                                                        kl_coef=0.05, vf_coef=0.5), **common)
        for beta, name in ((0.0, "ppo_proxy_no_kl"), (0.2, "ppo_proxy_kl")):
            runs[name] = run_rl(name, PPOTrainer, reward_fn=proxy_fn, steps=rollouts * 4, batch=64, lr=1e-3,
                                minibatches=2, rl=RLConfig(generation=gen24, epochs=2, num_minibatches=2,
                                                           kl_coef=beta, vf_coef=0.5), **common)
        for beta, name in ((0.0, "grpo_proxy_no_kl"), (0.2, "grpo_proxy_kl")):
            runs[name] = run_rl(name, GRPOTrainer, reward_fn=proxy_fn, steps=rollouts, batch=64, lr=1e-3,
                                minibatches=1, rl=RLConfig(generation=gen24, group_size=8, kl_coef=beta), **common)
    result = {
        "device": "cpu", "torch": torch.__version__, "python": platform.python_version(), "quick": q,
        "model": {"hidden_size": 64, "num_layers": 2, "vocab": 259, "parameters": model.num_parameters()},
        "sft": {"steps": len(sft_losses), "loss_first": sft_losses[0], "loss_last": sft_losses[-1]},
        "before": before, "before_24_new_tokens": before_long, "runs": runs,
        "seconds_total": time.perf_counter() - t0,
    }
    table = ["| run | reward fn | β | lr | rollouts | oracle reward | fluency | proxy | length | KL to ref | "
             "max KL in training | seconds |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def row(name, r, e):
        max_kl = max((c["kl"] for c in r.get("curve", [])), default=0.0)
        return (f"| {name} | {r.get('reward', '-')} | {r.get('kl_coef', '-')} | {r.get('lr', '-')} | "
                f"{r.get('rollouts', '-')} | {e['oracle_reward']:.3f} | {e['fluency']:.3f} | {e['proxy_reward']:.3f} | "
                f"{e['response_length']:.1f} | {e['kl_to_reference']:.3f} | {max_kl:.3f} | {r.get('seconds', 0):.0f} |")

    table.append(row("SFT (before), ≤12 new tokens", {}, before))
    table.append(row("SFT (before), ≤24 new tokens", {}, before_long))
    for name, r in runs.items():
        table.append(row(name, r, r["after"]))
    findings = []
    for name in ("grpo_oracle", "ppo_oracle"):
        a = runs[name]["after"]
        findings.append(f"- {name}: oracle reward {before['oracle_reward']:.3f} → {a['oracle_reward']:.3f}, fluency "
                        f"{before['fluency']:.3f} → {a['fluency']:.3f}, KL to the reference {a['kl_to_reference']:.2f} "
                        f"nats per completion (at most {max(c['kl'] for c in runs[name]['curve']):.2f} in training).")
    for method in ("ppo", "grpo"):
        off, on = runs[f"{method}_proxy_no_kl"]["after"], runs[f"{method}_proxy_kl"]["after"]
        findings.append(
            f"- {method} on the proxy: β = 0 → proxy {off['proxy_reward']:.2f}, oracle {off['oracle_reward']:.3f}, "
            f"fluency {off['fluency']:.3f}, length {off['response_length']:.1f}, KL {off['kl_to_reference']:.1f}; "
            f"β = {runs[f'{method}_proxy_kl']['kl_coef']} → proxy {on['proxy_reward']:.2f}, oracle "
            f"{on['oracle_reward']:.3f}, fluency {on['fluency']:.3f}, length {on['response_length']:.1f}, KL "
            f"{on['kl_to_reference']:.1f} (before: proxy {before_long['proxy_reward']:.2f}, fluency "
            f"{before_long['fluency']:.3f}).")
    md = "\n".join([
        "# Online RL on the synthetic task (CPU, tiny model)", "",
        f"torch {torch.__version__}, CPU; {model.num_parameters()} parameters; SFT {len(sft_losses)} steps "
        f"(loss {sft_losses[0]:.2f} → {sft_losses[-1]:.2f}); evaluation on {len(eval_prompts)} held-out prompts, "
        "sampling at temperature 1; KL = mean over completions of Σ_t (log π − log π_ref). Rollouts of 64 "
        "completions (GRPO: 8 prompts × 8); PPO: 2 epochs × 2 minibatches per rollout, GRPO: one step per rollout.",
        "", *table, "",
        "Oracle runs use reward_fn = the oracle (fraction of even digits of a fluent completion). Proxy runs use "
        "'even digits / 8, any length, no format check' (≤ 24 new tokens), with the KL penalty off (β = 0) and on.",
        "", *findings, "",
        f"Total time {result['seconds_total']:.0f} s on a shared 2-core machine (timings indicative only).", ""])
    print(md)
    if not args.no_write:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "rl.json").write_text(json.dumps(result, indent=1) + "\n")
        (RESULTS / "rl.md").write_text(md)
        print(f"wrote {RESULTS / 'rl.json'} and rl.md", file=sys.stderr)


if __name__ == "__main__":
    main()
