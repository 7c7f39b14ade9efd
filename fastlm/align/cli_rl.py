"""``fastlm ppo`` and ``fastlm grpo``: online RL from a prompt set and a reward (model or function).

    fastlm grpo --prompts prompts.jsonl --model DIR --reward-fn mypkg.rewards:score --out runs/grpo
    fastlm ppo  --prompts prompts.jsonl --model DIR --reward-model RM_DIR --method lora --out runs/ppo

``--prompts``: jsonl, one ``{"prompt": "..."}`` per line (other keys are ignored). The reward is a
reward model directory (``fastlm.align.load_reward_model``: a ``…ForSequenceClassification``
checkpoint written by ``fastlm reward``, transformers or TRL) or a Python function
``module:function`` taking (prompts, completions) and returning one float per completion.
:func:`train_rl` is the same recipe as a Python function.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fastlm._naming import shown
from fastlm.align.data import read_prompts
from fastlm.align.gae import GROUP_SCALINGS, KL_ESTIMATORS
from fastlm.align import rollout as R
from fastlm.align.ppo import RLConfig, check_steps
from fastlm.train.trainer import TrainerConfig, TrainResult

logger = logging.getLogger(__name__)

METHODS = ("full", "lora")


@dataclass
class RLOutput:
    policy: Any
    tokenizer: Any
    result: TrainResult


def train_rl(algorithm: str, config: TrainerConfig, rl: RLConfig, *, prompts: str, model_dir: str,
             reward_model: str | None = None, reward_fn: str | None = None, method: str = "full",
             lora=None, resume: bool = False, overwrite: bool = False) -> RLOutput:
    """PPO (``algorithm="ppo"``) or GRPO (``"grpo"``) of the checkpoint in ``model_dir`` on the
    prompts of a jsonl file, full or LoRA (``method``; ``lora`` a :class:`fastlm.peft.LoraConfig`).
    Checkpoints (``<out>/checkpoints/step-*``) hold the policy (HF directory or PEFT adapter), the
    value head (PPO), the tokenizer and the trainer state; ``metrics.jsonl`` the per-step metrics."""
    from fastlm.data.tokenizer import load_tokenizer
    from fastlm.io import from_pretrained
    from fastlm.train import distributed, rundir

    if algorithm not in ("ppo", "grpo"):
        raise ValueError(f"algorithm must be ppo or grpo, got {algorithm!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if (reward_model is None) == (reward_fn is None):
        raise ValueError(f"give exactly one of {shown('reward_model')} and {shown('reward_fn')}")
    check_steps(config, rl)
    texts = read_prompts(prompts)
    fn = R.load_reward_fn(reward_fn) if reward_fn is not None else None
    tokenizer = load_tokenizer(model_dir)
    info = distributed.setup(config.device)
    out = rundir.prepare_out(config.out, resume=resume, overwrite=overwrite, is_main=info.is_main)
    distributed.barrier()
    settings = dict(command=algorithm, method=method, prompts=str(prompts), prompts_fingerprint=rundir.file_fingerprint(
        prompts), model=str(model_dir), reward_model=reward_model, reward_fn=reward_fn,
        rl={k: v for k, v in dataclasses.asdict(rl).items()})
    rundir.begin_run(out, settings, resume=resume, is_main=info.is_main)
    base = from_pretrained(model_dir, dtype=torch.float32)
    torch.manual_seed(config.seed)  # the same adapter / value head initialization in every process and run
    if method == "lora":
        from fastlm.peft import LoraConfig, LoraModel

        lora = dataclasses.replace(lora or LoraConfig(lora_dropout=0.0),
                                   base_model_name_or_path=str(Path(model_dir).resolve()))
        policy = LoraModel(base, lora)
    else:
        policy = base
    if reward_model is not None:
        from fastlm.align.reward import load_reward_model

        device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
        rm = load_reward_model(reward_model, dtype=torch.float32, device=device).eval()
        has_own = any((Path(reward_model) / name).is_file() for name in ("tokenizer.json", "fastlm_tokenizer.json"))
        reward = R.RewardSource(reward_model=rm, tokenizer=load_tokenizer(reward_model) if has_own else tokenizer)
    else:
        reward = R.RewardSource(reward_fn=fn)
    if algorithm == "ppo":
        from fastlm.align.ppo import PPOTrainer as cls
    else:
        from fastlm.align.grpo import GRPOTrainer as cls
    trainer = cls(policy, tokenizer, texts, reward, config, rl, extra_files=tokenizer.save)
    result = trainer.fit(resume=resume)
    return RLOutput(policy, tokenizer, result)


# ---- the commands ---------------------------------------------------------------------------------


def _run(args: argparse.Namespace) -> int:
    from fastlm.cli import check_file, check_positive, check_run_options, trainer_config

    check_run_options(args)
    check_file("prompts", args.prompts)
    check_file("model", args.model, directory=True)
    check_file("reward_model", args.reward_model, directory=True)
    check_positive(args, "max_new_tokens", "lora_r", "num_minibatches", "epochs",
                   *(["group_size"] if args.algorithm == "grpo" else []))
    check_positive(args, "temperature", "clip_range", low=0, strict=True)
    check_positive(args, "kl_coef", "ent_coef", low=0)
    if not 0 <= args.lora_dropout < 1:
        raise ValueError(f"{shown('lora_dropout')} must be in [0, 1), got {args.lora_dropout}")
    generation = R.GenerationSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                      top_k=args.top_k, top_p=args.top_p, stop_token_ids=tuple(args.stop_token_ids),
                                      compile=args.compile_rollouts, cache_implementation=args.cache)
    fields = {f.name for f in dataclasses.fields(RLConfig)} - {"generation"}
    rl = RLConfig(generation=generation, **{k: getattr(args, k) for k in fields if hasattr(args, k)})
    lora = None
    if args.method == "lora":
        from fastlm.peft import LoraConfig

        targets = args.lora_targets[0] if args.lora_targets == ["all-linear"] else args.lora_targets
        lora = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                          target_modules=targets)
    output = train_rl(args.algorithm, trainer_config(args), rl, prompts=args.prompts, model_dir=args.model,
                      reward_model=args.reward_model, reward_fn=args.reward_fn, method=args.method, lora=lora,
                      resume=args.resume, overwrite=args.overwrite)
    _report(output.result, args.out)
    return 0


def _report(result: TrainResult, out: str) -> None:
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_rank() != 0:
        return
    path = Path(out) / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    if rows:
        first, last = rows[0], rows[-1]
        print(f"mean reward {first.get('reward', float('nan')):.4f} -> {last.get('reward', float('nan')):.4f}, "
              f"KL to reference {last.get('kl', float('nan')):.4f} (steps {result.start_step + 1}-{result.steps})")
    print(f"checkpoints, metrics.jsonl in {out}")


def _add(sub, algorithm: str) -> None:
    from fastlm.cli import add_parser, add_trainer_options

    defaults = {f.name: f.default for f in dataclasses.fields(TrainerConfig)}
    title = {"ppo": "PPO with a value head and a per-token KL penalty to the reference",
             "grpo": "GRPO: group-normalised advantages, KL to the reference in the loss"}[algorithm]
    p = add_parser(sub, algorithm, help=f"online RL: {title}",
                   description=f"{title}; rollouts through fastlm.generate. Each rollout has batch-size × "
                               "grad-accum × num-minibatches completions and is trained on for epochs × "
                               "num-minibatches optimizer steps (--max-steps counts optimizer steps).")
    p.add_argument("--prompts", required=True, help='jsonl with {"prompt": ...} per line')
    p.add_argument("--model", required=True, help="checkpoint folder of the policy to start from (also the reference)")
    reward = p.add_mutually_exclusive_group(required=True)
    reward.add_argument("--reward-model", help="reward model folder (…ForSequenceClassification, e.g. from "
                                               "`fastlm reward`)")
    reward.add_argument("--reward-fn", help="Python reward function module:function, called as "
                                            "fn(prompts, completions) -> list[float]")
    p.add_argument("--method", default="full", choices=METHODS,
                   help="train the whole policy, or a LoRA adapter (the reference is then the base with adapters off)")
    p.add_argument("--lora-r", type=int, default=16, help="LoRA rank")
    p.add_argument("--lora-alpha", type=float, default=32.0, help="LoRA scale numerator (scale = alpha / r)")
    p.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the LoRA input (0 keeps the "
                                                                   "rollout and training log-probs equal)")
    p.add_argument("--lora-targets", nargs="+", default=["q_proj", "k_proj", "v_proj", "o_proj"],
                   help="module names, or all-linear (lm_head cannot be a target)")
    g = p.add_argument_group("rollouts")
    g.add_argument("--max-new-tokens", type=int, default=64, help="maximum response length in tokens")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (also divides the "
                                                                  "logits when scoring log-probs)")
    g.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens (default: all)")
    g.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass (default: off)")
    g.add_argument("--stop-token-ids", type=int, nargs="*", default=[],
                   help="token ids that end a response besides the tokenizer's eos (kept in the response)")
    g.add_argument("--compile-rollouts", action="store_true",
                   help="decode through the compiled step (static cache; a LoRA adapter is merged for the rollout)")
    g.add_argument("--cache", default="static", choices=("static", "paged"), help="KV cache of the rollouts")
    o = p.add_argument_group("optimization")
    o.add_argument("--num-minibatches", type=int, default=1, help="optimizer steps per pass over a rollout")
    o.add_argument("--epochs", type=int, default=4 if algorithm == "ppo" else 1,
                   help="passes over each rollout (PPO epochs; GRPO's num_iterations)")
    o.add_argument("--kl-coef", type=float, default=0.05 if algorithm == "ppo" else 0.04,
                   help="β of the KL penalty to the reference (0: off); initial β with --target-kl")
    o.add_argument("--kl-estimator", default="k1" if algorithm == "ppo" else "k3", choices=KL_ESTIMATORS,
                   help="per-token KL estimator: k1 = log π − log π_ref, k3 = exp(−k1) + k1 − 1, ...")
    o.add_argument("--target-kl", type=float, default=None, help="adapt β towards this KL per response "
                                                                 "(Ziegler et al.; default: fixed β)")
    o.add_argument("--kl-horizon", type=float, default=10000.0, help="adaptive-β horizon in responses")
    o.add_argument("--clip-range", type=float, default=0.2, help="ε of the clipped policy ratio")
    o.add_argument("--clip-range-high", type=float, default=None, help="upper ε (default: --clip-range)")
    o.add_argument("--ent-coef", type=float, default=0.0, help="entropy bonus coefficient")
    if algorithm == "ppo":
        o.add_argument("--gamma", type=float, default=1.0, help="GAE discount γ")
        o.add_argument("--lam", type=float, default=0.95, help="GAE λ")
        o.add_argument("--vf-coef", type=float, default=0.1, help="weight of the value loss")
        o.add_argument("--clip-range-value", type=float, default=0.2, help="ε of the clipped value loss")
        o.add_argument("--no-whiten-advantages", dest="whiten_advantages", action="store_false",
                       help="do not whiten the advantages over each rollout")
    else:
        o.add_argument("--group-size", type=int, default=8, help="completions per prompt (G)")
        o.add_argument("--scale-rewards", default="group", choices=GROUP_SCALINGS,
                       help="divide group-centred rewards by the group's std, the batch's, or not at all")
    add_trainer_options(p, {**defaults, "out": f"runs/{algorithm}", "lr": 1e-5, "max_steps": 100,
                            "batch_size": 8 if algorithm == "ppo" else 16, "weight_decay": 0.0})
    p.set_defaults(func=_run, algorithm=algorithm)


def add_rl(sub) -> None:
    """The registrar of ``fastlm ppo`` and ``fastlm grpo`` (see fastlm.cli.REGISTRARS)."""
    _add(sub, "ppo")
    _add(sub, "grpo")
