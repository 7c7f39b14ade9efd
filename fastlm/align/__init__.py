"""fastlm.align: alignment and distillation — preference data, reward models, DPO/IPO/SimPO,
PPO/GRPO with a KL penalty to a frozen reference, and knowledge distillation.

Modules: :mod:`~fastlm.align.logprobs` (sequence and token log-probabilities through the fused
``ops.linear_logprobs``), :mod:`~fastlm.align.data` (rankings and preference pairs),
:mod:`~fastlm.align.reward`, :mod:`~fastlm.align.dpo`, :mod:`~fastlm.align.gae` (advantages, KL
estimators and controllers, clipped losses), :mod:`~fastlm.align.rollout`,
:mod:`~fastlm.align.ppo`, :mod:`~fastlm.align.grpo`, :mod:`~fastlm.align.distill` and
:mod:`~fastlm.align.synthetic` (a task with a known oracle, for tests and demos). Note that
``fastlm.align.gae`` is the function; its module is imported as ``from fastlm.align.gae import ...``.
"""

from fastlm.align.logprobs import sequence_logprobs, token_logprobs
from fastlm.align.data import PairSource, load_pairs, ranking_pairs
from fastlm.align.reward import RewardModel, load_reward_model, pairwise_loss
from fastlm.align.dpo import DPOConfig, DPOTrainer, dpo_loss, simpo_loss
from fastlm.align.distill import DistillConfig, DistillTrainer, check_compatible, distill
from fastlm.align.gae import AdaptiveKLController, FixedKLController, gae, group_advantages, kl_penalty
from fastlm.align.rollout import GenerationSettings, RewardSource, load_reward_fn
from fastlm.align.ppo import PPOTrainer, RLConfig
from fastlm.align.grpo import GRPOTrainer, grpo_token_loss

__all__ = [
    "AdaptiveKLController", "DPOConfig", "DPOTrainer", "DistillConfig", "DistillTrainer", "FixedKLController",
    "GRPOTrainer", "GenerationSettings", "PPOTrainer", "PairSource", "RLConfig", "RewardModel", "RewardSource",
    "check_compatible", "distill", "dpo_loss", "gae", "grpo_token_loss", "group_advantages", "kl_penalty",
    "load_pairs", "load_reward_fn", "load_reward_model", "pairwise_loss", "ranking_pairs", "sequence_logprobs",
    "simpo_loss", "token_logprobs",
]
