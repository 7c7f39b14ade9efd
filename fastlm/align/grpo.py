"""GRPO (Shao et al. 2024, DeepSeekMath) on fastlm's training engine.

For each prompt of a rollout, ``group_size`` G completions are sampled; each completion's
advantage is its reward minus its group's mean, divided by the group's std (+1e-4, TRL's
``scale_rewards="group"``; ``"batch"`` or ``"none"`` also), broadcast over its tokens. There is
no value model. The per-token loss is the clipped surrogate plus β·KL to the frozen reference
(estimator k3 by default, TRL's), averaged over the completion tokens of the optimizer step
(TRL's token-level ``loss_type="bnpo"``/``"dapo"`` normalisation):

    ρ_t = exp(log π_t − log π_old,t)
    loss_t = −min(ρ_t·A, clip(ρ_t, 1 − ε_low, 1 + ε_high)·A) + β·(exp(log π_ref,t − log π_t) − (log π_ref,t − log π_t) − 1)

Rollouts, checkpoints, exact resume and logging come from
:class:`fastlm.align.ppo.OnlineRLTrainer`; ``RLConfig.epochs`` is TRL's ``num_iterations``.
"""

from __future__ import annotations

from typing import Any

import torch

from fastlm.align.gae import clipped_policy_loss, group_advantages, kl_penalty
from fastlm.align.ppo import OnlineRLTrainer


def grpo_token_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                    advantages: torch.Tensor, *, beta: float, clip_range: float = 0.2,
                    clip_range_high: float | None = None, kl_estimator: str = "k3"
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GRPO's per-token loss (B, T) from log-probs (B, T) and per-sequence advantages (B,):
    returns (loss, clipped (0/1), kl) per token (see the module docstring)."""
    policy_loss, clipped = clipped_policy_loss(logprobs, old_logprobs, advantages, clip_range=clip_range,
                                                 clip_range_high=clip_range_high)
    kl = kl_penalty(logprobs, ref_logprobs, kl_estimator)
    return policy_loss + beta * kl, clipped, kl


class GRPOTrainer(OnlineRLTrainer):
    """Group-relative policy optimization: G completions per prompt, no value head."""

    value_head = False
    progress_metrics = ("reward", "kl", "entropy", "clip_fraction")

    def _rows_per_prompt(self) -> int:
        return self.rl.group_size

    def _check_sizes(self, world: int) -> None:
        per_process = self.rollout_rows // world
        if per_process % self.rl.group_size:
            raise ValueError(f"GRPO: each process's rollout of {per_process} completions (batch_size × grad_accum × "
                             f"num_minibatches / processes) must be a multiple of group_size {self.rl.group_size}")

    def _score_rollout(self, buffer: dict[str, Any]) -> dict[str, float]:
        scores = buffer["scores"]
        buffer["advantages"] = group_advantages(scores, self.rl.group_size, scale=self.rl.scale_rewards)
        groups = scores.view(-1, self.rl.group_size)
        spread = (groups.max(1).values > groups.min(1).values).float().mean()  # groups that carry a signal
        return {"groups_with_signal": float(spread)}

    def _token_loss(self, batch, logprobs, entropy, values):
        rl = self.rl
        loss, clipped, _ = grpo_token_loss(logprobs, batch["logprobs"], batch["ref_logprobs"], batch["advantages"],
                                           beta=self.kl_ctl.value, clip_range=rl.clip_range,
                                           clip_range_high=rl.clip_range_high, kl_estimator=rl.kl_estimator or "k3")
        return loss - rl.ent_coef * entropy, clipped, None
