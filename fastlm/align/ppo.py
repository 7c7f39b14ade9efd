"""PPO with a KL penalty to a frozen reference, on fastlm's training engine.

:class:`OnlineRLTrainer` (shared with GRPO, :mod:`fastlm.align.grpo`) is a
:class:`fastlm.train.trainer.Trainer` whose optimizer steps consume *rollouts*: every
``K = epochs × num_minibatches`` optimizer steps it samples a rollout of
``R = batch_size × grad_accum × num_minibatches`` completions (over all processes) with the
policy's current weights (:mod:`fastlm.align.rollout`), scores them, and then runs ``epochs``
passes over it in ``num_minibatches`` shuffled minibatches (one optimizer step each, of
``grad_accum`` micro-batches of ``batch_size`` rows). So ``max_steps`` counts optimizer steps and
a run makes ``max_steps / K`` rollouts. The engine brings checkpoints, exact resume, kill -9
safety, metrics.jsonl, the progress bar and torchrun DDP (each process rolls out its share of
the prompts; FSDP is refused).

Exact resume: the sampling generator of rollout c on rank r is seeded from (seed, c, r) and the
minibatch order from (seed, c, epoch, r), so neither needs saved RNG state; the current rollout
(its tensors, texts and statistics; gathered from every process) and the KL controller are
saved in each checkpoint's trainer state, so a run stopped in the middle of a rollout's epochs
continues on the same rollout. Checkpoints hold the policy (a Hugging Face directory, or a PEFT
adapter with LoRA), ``value_head.safetensors`` (PPO), the tokenizer and the trainer state.

PPO (Ziegler et al. 2019; Ouyang et al. 2022; TRL's PPOTrainer): per-token rewards
r_t = −β·KL_t (KL estimator k1 by default) plus the scalar score on the completion's last token;
values V_t from a linear value head on the policy's final hidden states; GAE(γ, λ) advantages,
whitened over the rollout; per token loss = clipped surrogate + vf_coef·clipped value loss −
ent_coef·entropy, averaged over the completion tokens of the optimizer step. β is fixed or
adapted towards a target KL (:class:`fastlm.align.gae.AdaptiveKLController`).

Logged per step (metrics.jsonl, progress bar): reward (mean score of the current rollout), kl
(mean per completion of Σ_t log π_old − log π_ref at rollout time), kl_coef, response_length,
rollout_tokens_per_s (generated tokens / generation + scoring time), entropy, clip_fraction,
value_loss (PPO) and train_tokens_per_s (completion tokens / training time of the step), besides
the engine's loss, lr, grad_norm, tokens_per_s. Host reads: a rollout reads its tokens (to decode
them for the reward) and its statistics once; a training step reads the engine's one summary and
the RL statistics once (nothing to assemble a minibatch).

Rollouts under DDP are each process's own; PPO's advantages are whitened with the mean and
variance over every process's rollout (GRPO's are normalised within each prompt's group, which
lives in one process; its ``scale_rewards="batch"`` std is each process's batch); the rollout
statistics are summed over processes.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn

from fastlm.align.gae import (
    AdaptiveKLController, FixedKLController, GROUP_SCALINGS, KL_ESTIMATORS, clipped_policy_loss,
    clipped_value_loss, gae, kl_penalty, masked_whiten,
)
from fastlm.align import rollout as R
from fastlm.io.checkpoint import read_safetensors
from fastlm.io.hf_format import state_dict_from_hf
from fastlm.train import distributed
from fastlm.train.trainer import Trainer, TrainerConfig

logger = logging.getLogger(__name__)

VALUE_HEAD_FILE = "value_head.safetensors"
_ROLLOUT_KEYS = ("input_ids", "attention_mask", "target_mask", "logprobs", "ref_logprobs", "values", "advantages",
                 "returns", "scores")


@dataclass
class RLConfig:
    """Settings of an online RL run besides the engine's (:class:`TrainerConfig`)."""

    generation: R.GenerationSettings = dataclasses.field(default_factory=R.GenerationSettings)
    num_minibatches: int = 1  # optimizer steps per pass over a rollout
    epochs: int = 1  # passes over each rollout (PPO epochs; GRPO's num_iterations)
    kl_coef: float = 0.05  # β: KL penalty coefficient (initial value when adaptive)
    kl_estimator: str | None = None  # per-token KL estimator k1 | k2 | k3 | abs (None: k1 for PPO, k3 for GRPO)
    target_kl: float | None = None  # adaptive β towards this KL per sequence (None: fixed β)
    kl_horizon: float = 10000.0  # adaptive controller horizon, in samples
    clip_range: float = 0.2  # ε of the clipped surrogate (low side)
    clip_range_high: float | None = None  # high side (None: clip_range)
    ent_coef: float = 0.0  # entropy bonus coefficient
    # PPO only
    gamma: float = 1.0
    lam: float = 0.95
    vf_coef: float = 0.1
    clip_range_value: float = 0.2
    whiten_advantages: bool = True
    # GRPO only
    group_size: int = 4  # completions per prompt
    scale_rewards: str = "group"  # group | batch | none

    def __post_init__(self) -> None:
        for name in ("num_minibatches", "epochs", "group_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"RLConfig.{name} must be a positive integer, got {value!r}")
        if self.kl_estimator is not None and self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"RLConfig.kl_estimator must be one of {KL_ESTIMATORS}, got {self.kl_estimator!r}")
        if self.scale_rewards not in GROUP_SCALINGS:
            raise ValueError(f"RLConfig.scale_rewards must be one of {GROUP_SCALINGS}, got {self.scale_rewards!r}")
        for name in ("kl_coef", "ent_coef", "vf_coef"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"RLConfig.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("clip_range", "clip_range_value", "kl_horizon"):
            if not getattr(self, name) > 0:
                raise ValueError(f"RLConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.clip_range_high is not None and not self.clip_range_high > 0:
            raise ValueError(f"RLConfig.clip_range_high must be > 0, got {self.clip_range_high}")
        if self.target_kl is not None and not self.target_kl > 0:
            raise ValueError(f"RLConfig.target_kl must be > 0 or None, got {self.target_kl}")
        for name in ("gamma", "lam"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"RLConfig.{name} must be in [0, 1], got {getattr(self, name)}")

    def kl_controller(self) -> FixedKLController:
        if self.target_kl is None:
            return FixedKLController(self.kl_coef)
        return AdaptiveKLController(self.kl_coef, self.target_kl, self.kl_horizon)


class PolicyValueModel(nn.Module):
    """The trained module: the policy (a fastlm Model or LoraModel) and, for PPO, a linear value
    head on its final hidden states. forward(input_ids, key_lens) -> (hidden (B, T, H), values
    (B, T) float32 or None); values[:, j] estimates the return from the state after token j."""

    def __init__(self, policy: nn.Module, *, value_head: bool) -> None:
        super().__init__()
        self.policy = policy
        self.value_head = nn.Linear(policy.config.hidden_size, 1) if value_head else None
        if self.value_head is not None:
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)
            self.value_head.to(device=policy.device)

    config = property(lambda self: self.policy.config)
    lm_head = property(lambda self: self.policy.lm_head)
    layers = property(lambda self: self.policy.layers)
    device = property(lambda self: self.policy.device)

    @property
    def gradient_checkpointing(self) -> bool:
        return self.policy.gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, value: bool) -> None:
        self.policy.gradient_checkpointing = value

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, input_ids: torch.Tensor, *, key_lens: torch.Tensor | None = None):
        hidden = self.policy(input_ids, key_lens=key_lens, return_hidden=True, validate=False)
        values = None if self.value_head is None else self.value_head(hidden).squeeze(-1).float()
        return hidden, values


class _Shapes:
    """The engine's train source stand-in: only its batch shape is read (for the FLOP count);
    the RL trainers make their batches from rollouts in :meth:`OnlineRLTrainer._fetch`."""

    def __init__(self, length: int) -> None:
        self.length = length

    def batch(self, micro_batch: int, rank: int = 0, world_size: int = 1) -> dict:
        return {"input_ids": torch.zeros(1, self.length, dtype=torch.int64)}


class OnlineRLTrainer(Trainer):
    """The engine specialised to on-policy RL (see the module docstring); subclasses define
    :meth:`_score_rollout` (advantages etc. of a rollout) and :meth:`_token_loss`."""

    value_head = False
    progress_metrics = ("reward", "kl", "entropy")

    def __init__(self, policy: nn.Module, tokenizer, prompts: list[str], reward: R.RewardSource,
                 config: TrainerConfig, rl: RLConfig, *, reference: nn.Module | None = None,
                 extra_files=None) -> None:
        from fastlm.peft import LoraModel

        if config.fsdp:
            raise ValueError("RL training does not support fsdp yet: use DDP (several processes without --fsdp)")
        if not prompts:
            raise ValueError("RL training needs at least one prompt")
        self.lora = isinstance(policy, LoraModel)
        if reference is None and not self.lora:
            reference = copy.deepcopy(policy)  # a frozen copy of the starting weights
        if reference is not None:
            reference.requires_grad_(False).eval()
        check_steps(config, rl)
        R.head_weight(policy)  # refuse a head the fused op cannot apply, before any work
        self.policy, self.reference, self.tokenizer, self.reward, self.rl = policy, reference, tokenizer, reward, rl
        self.prompts = list(prompts)
        context = policy.config.context_length
        self.prompt_ids = R.encode_prompts(tokenizer, self.prompts, max_len=context - rl.generation.max_new_tokens)
        self.steps_per_rollout = rl.epochs * rl.num_minibatches
        longest = max(map(len, self.prompt_ids)) + rl.generation.max_new_tokens
        super().__init__(PolicyValueModel(policy, value_head=self.value_head), _Shapes(longest), config,
                         extra_files=extra_files)
        world = self.info.world_size
        self.rollout_rows = config.batch_size * config.grad_accum * rl.num_minibatches  # over all processes
        self.local_batch = config.batch_size // world
        self._check_sizes(world)
        self.kl_ctl = rl.kl_controller()
        self._buffer: dict[str, Any] | None = None
        self._buffer_index = -1
        self._stats = torch.zeros(5, dtype=torch.float64)
        self._rollout_metrics: dict[str, float] = {}
        self._saved_buffers: list | None = None
        self._rollout_seconds = 0.0

    def _check_sizes(self, world: int) -> None:
        """Subclasses check their own constraints on the rollout size."""

    # ---- set-up and checkpoints ----------------------------------------------------------------

    def _build(self) -> None:
        super()._build()
        if self.reference is not None:
            self.reference.to(self.info.device)
        self._stats = torch.zeros(5, dtype=torch.float64, device=self.info.device)

    def _gather_model(self):
        return None if self.lora else distributed.full_model_state(self.wrapped)

    def _write_model(self, directory: Path, gathered) -> None:
        if self.lora:
            self.policy.save_adapter(directory)
        else:
            prefix = "policy."
            self.policy.save_pretrained(directory, state_dict={k[len(prefix):]: v for k, v in gathered.items()
                                                               if k.startswith(prefix)})
        if self.model.value_head is not None:
            save_file({k: v.detach().cpu().contiguous() for k, v in self.model.value_head.state_dict().items()},
                      str(directory / VALUE_HEAD_FILE))

    def _load_model(self, directory: Path, optimizer_state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        head = load_file(str(directory / VALUE_HEAD_FILE)) if self.model.value_head is not None else {}
        if self.lora:
            self.policy.load_adapter_weights(directory, self.policy.active_adapter)
            if head:
                self.model.value_head.load_state_dict(head)
            set_optimizer_state_dict(self.wrapped, self.optimizer, optimizer_state,
                                     options=StateDictOptions(full_state_dict=True, strict=True))
            return
        policy_state = state_dict_from_hf(self.policy.config, read_safetensors(directory))
        state = {**{"policy." + k: v for k, v in policy_state.items()},
                 **{"value_head." + k: v for k, v in head.items()}}
        distributed.load_full_state(self.wrapped, self.optimizer, state, optimizer_state)

    def save_checkpoint(self, step: int):
        buffer = None if self._buffer is None else {**self._buffer, "index": self._buffer_index,
                                                    "metrics": dict(self._rollout_metrics)}
        if dist.is_initialized():  # every process's rollout, gathered for the main process to save
            gathered = [None] * self.info.world_size
            dist.all_gather_object(gathered, _to_cpu(buffer))
            self._saved_buffers = gathered
        else:
            self._saved_buffers = [_to_cpu(buffer)]
        return super().save_checkpoint(step)

    def _extra_state(self) -> dict[str, Any]:
        return {"rl": {"kl_ctl": self.kl_ctl.state_dict(), "rollouts": self._saved_buffers,
                       "policy": "lora" if self.lora else "full"}}

    def _resume(self) -> int:
        from fastlm.train import checkpoint as ckpt

        step = super()._resume()
        latest = ckpt.latest_checkpoint(self.out)
        if step and latest is not None:
            state = ckpt.load_trainer_state(latest).get("rl")
            if state is None:
                raise ValueError(f"cannot resume from {latest}: it is not an RL checkpoint (no 'rl' trainer state)")
            self.kl_ctl.load_state_dict(state["kl_ctl"])
            buffers = state["rollouts"]
            if len(buffers) != self.info.world_size:
                raise ValueError(f"cannot resume from {latest}: it was written by {len(buffers)} processes, "
                                 f"this run has {self.info.world_size}")
            mine = buffers[self.info.rank]
            if mine is not None:
                self._buffer_index = int(mine.pop("index"))
                self._rollout_metrics = dict(mine.pop("metrics"))
                self._buffer = {k: v.to(self.info.device) if isinstance(v, torch.Tensor) else v
                                for k, v in mine.items()}
        return step

    # ---- rollouts ----------------------------------------------------------------------------------

    def _prompt_indices(self, index: int, count: int) -> list[int]:
        """The prompts of rollout ``index`` for all processes: a seeded permutation of the prompt
        set per pass over it, taken in order."""
        n, out = len(self.prompts), []
        start = index * count
        while len(out) < count:
            epoch, offset = divmod(start + len(out), n)
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.config.seed * 7919 + epoch))
            out += order[offset: offset + count - len(out)].tolist()
        return out

    def _rows_per_prompt(self) -> int:
        return 1

    def _make_rollout(self, index: int) -> None:
        config, info, rl = self.config, self.info, self.rl
        per = self._rows_per_prompt()
        local = self.rollout_rows // info.world_size // per  # prompts of this process
        chosen = self._prompt_indices(index, local * info.world_size)[info.rank * local: (info.rank + 1) * local]
        chosen = [i for i in chosen for _ in range(per)]  # GRPO: G consecutive rows per prompt
        prompts = [self.prompts[i] for i in chosen]
        generator = R.rollout_generator(config.seed, index, info.rank, info.device)
        with R.Timer(info.device) as gen_time:
            seqs = R.sample_completions(self.policy, self.tokenizer, [self.prompt_ids[i] for i in chosen],
                                        rl.generation, generator=generator)
        with R.Timer(info.device) as score_time:
            scores = self.reward(prompts, seqs.completions, info.device)
            with torch.no_grad(), self._autocast():
                was = self.model.training
                self.model.eval()
                key_lens = seqs.attention_mask.sum(1)
                hidden, values = self.model(seqs.input_ids, key_lens=key_lens)
                self.model.train(was)
                logprobs = R.policy_logprobs(hidden, R.head_weight(self.policy), seqs.input_ids, seqs.target_mask,
                                             temperature=rl.generation.temperature, return_entropy=False,
                                             softcap=R.head_softcap(self.policy))
                logprobs = logprobs * seqs.target_mask
                ref = R.reference_logprobs(self.policy, self.reference, seqs, temperature=rl.generation.temperature)
        buffer = {"input_ids": seqs.input_ids, "attention_mask": seqs.attention_mask,
                  "target_mask": seqs.target_mask, "logprobs": logprobs.float(), "ref_logprobs": ref.float(),
                  "scores": scores, "completions": seqs.completions, "prompts": prompts,
                  "completion_lengths": [n - p for n, p in zip(seqs.lengths, seqs.prompt_lens)]}
        if values is not None:
            buffer["values"] = values[:, :-1] * seqs.target_mask
        extra = self._score_rollout(buffer)
        kl = kl_penalty(buffer["logprobs"], buffer["ref_logprobs"], "k1", seqs.target_mask).sum(1)  # (B,)
        generated = sum(seqs.lengths) - sum(seqs.prompt_lens)
        totals = torch.stack((scores.sum().double(), kl.sum().double(),
                              torch.tensor(float(generated), dtype=torch.float64, device=info.device),
                              torch.tensor(float(len(prompts)), dtype=torch.float64, device=info.device),
                              torch.tensor(gen_time.seconds + score_time.seconds, dtype=torch.float64,
                                           device=info.device)))
        totals = distributed.all_reduce_sum(totals, info.device)
        reward_sum, kl_sum, tokens, rows, seconds = totals.tolist()  # the rollout's statistics, one read
        mean_kl = kl_sum / rows
        self._rollout_seconds = seconds / info.world_size
        self._rollout_metrics = {"reward": reward_sum / rows, "kl": mean_kl, "response_length": tokens / rows,
                                 "rollout_tokens_per_s": tokens / max(seconds / info.world_size, 1e-9),
                                 "kl_coef": self.kl_ctl.value, **extra}
        self.kl_ctl.update(mean_kl, int(rows))
        self._buffer, self._buffer_index = buffer, index
        logger.info("rollout %d: mean reward %.4f, KL %.4f, response length %.1f", index, reward_sum / rows,
                    mean_kl, tokens / rows)

    def _score_rollout(self, buffer: dict[str, Any]) -> dict[str, float]:
        """Add the training targets (advantages, ...) to ``buffer``; return extra metrics."""
        raise NotImplementedError

    # ---- the engine's hooks -------------------------------------------------------------------------

    def _fetch(self, step: int) -> list[tuple[dict[str, Any], int]]:
        index, within = divmod(step, self.steps_per_rollout)
        if index != self._buffer_index:
            self._make_rollout(index)
        epoch, minibatch = divmod(within, self.rl.num_minibatches)
        rows = self._buffer["input_ids"].shape[0]
        seed = ((self.config.seed * 1_000_003 + index) * 131 + epoch) * 4_099 + self.info.rank
        order = torch.randperm(rows, generator=torch.Generator().manual_seed(seed))  # on the host
        out = []
        for i in range(self.config.grad_accum):
            start = (minibatch * self.config.grad_accum + i) * self.local_batch
            chosen = order[start: start + self.local_batch]
            pick = chosen.to(self.info.device)
            batch = {k: self._buffer[k].index_select(0, pick) for k in _ROLLOUT_KEYS if k in self._buffer}
            batch["labels"] = torch.where(batch["target_mask"].bool(), batch["input_ids"][:, 1:], -100)
            targets = int(sum(self._buffer["completion_lengths"][j] for j in chosen.numpy()))  # host: no read
            out.append((batch, targets))
        return out

    def _loss_sum(self, batch: dict[str, Any], num_targets: int) -> torch.Tensor:
        """Σ over the micro-batch's completion tokens of the method's per-token loss."""
        mask = batch["target_mask"]
        with self._autocast():
            hidden, values = self.forward(batch["input_ids"], key_lens=batch["attention_mask"].sum(1))
            logprobs, entropy = R.policy_logprobs(hidden, R.head_weight(self.policy), batch["input_ids"], mask,
                                                  temperature=self.rl.generation.temperature,
                                                  softcap=R.head_softcap(self.policy))
        values = None if values is None else values[:, :-1]
        per_token, clipped, value_loss = self._token_loss(batch, logprobs, entropy, values)
        if self.model.training:  # statistics of the training step, summed on the device
            self._stats += torch.stack(((entropy * mask).sum(), (clipped * mask).sum(),
                                        (value_loss * mask).sum() if value_loss is not None else mask.sum() * 0,
                                        mask.sum(), (per_token * mask).sum().detach())).double().detach()
        return (per_token * mask).sum()

    def _token_loss(self, batch, logprobs, entropy, values):
        """(loss (B, T−1), clipped (B, T−1) 0/1, value loss (B, T−1) or None) per token."""
        raise NotImplementedError

    def _step_metrics(self) -> dict[str, float]:
        stats = distributed.all_reduce_sum(self._stats, self.info.device)
        entropy, clipped, value_loss, count, _ = stats.tolist()
        self._stats.zero_()
        count = max(count, 1.0)
        seconds = max(self._step_seconds - self._rollout_seconds, 1e-9)  # training time only
        self._rollout_seconds = 0.0
        out = {**self._rollout_metrics, "entropy": entropy / count, "clip_fraction": clipped / count,
               "train_tokens_per_s": count / seconds}
        if self.model.value_head is not None:
            out["value_loss"] = value_loss / count
        return out


def _to_cpu(buffer):
    if buffer is None:
        return None
    return {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in buffer.items()}


class PPOTrainer(OnlineRLTrainer):
    """PPO with a value head and a per-token KL penalty in the rewards (see the module docstring)."""

    value_head = True
    progress_metrics = ("reward", "kl", "clip_fraction", "value_loss")

    def _score_rollout(self, buffer: dict[str, Any]) -> dict[str, float]:
        rl, mask = self.rl, buffer["target_mask"]
        kl = kl_penalty(buffer["logprobs"], buffer["ref_logprobs"], rl.kl_estimator or "k1", mask)  # (B, T-1)
        rewards = -self.kl_ctl.value * kl
        last = (mask * torch.arange(mask.shape[1], device=mask.device)).argmax(1)  # each row's last completion token
        rewards = rewards.scatter_add(1, last[:, None], buffer["scores"][:, None])
        advantages, returns = gae(rewards, buffer["values"], gamma=rl.gamma, lam=rl.lam, mask=mask)
        if rl.whiten_advantages:  # over every process's rollout under DDP
            reduce = (lambda t: distributed.all_reduce_sum(t, self.info.device)) if dist.is_initialized() else None
            advantages = masked_whiten(advantages, mask, reduce=reduce)
        buffer["advantages"], buffer["returns"] = advantages, returns
        return {}

    def _token_loss(self, batch, logprobs, entropy, values):
        rl = self.rl
        policy_loss, clipped = clipped_policy_loss(logprobs, batch["logprobs"], batch["advantages"],
                                                     clip_range=rl.clip_range, clip_range_high=rl.clip_range_high)
        value_loss, _ = clipped_value_loss(values, batch["values"], batch["returns"],
                                             clip_range_value=rl.clip_range_value)
        loss = policy_loss + rl.vf_coef * value_loss - rl.ent_coef * entropy
        return loss, clipped, value_loss


def check_steps(config: TrainerConfig, rl: RLConfig) -> None:
    """max_steps must be whole rollouts (a multiple of epochs × num_minibatches)."""
    per = rl.epochs * rl.num_minibatches
    if config.max_steps % per:
        raise ValueError(f"max_steps {config.max_steps} must be a multiple of epochs × num_minibatches = {per} "
                         "(whole rollouts)")

