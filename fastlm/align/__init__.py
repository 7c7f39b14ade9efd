"""fastlm.align: alignment and distillation — preference data, reward models, DPO/IPO/SimPO,
PPO/GRPO with a KL penalty to a frozen reference, and knowledge distillation."""

# --- alignkern ---
from fastlm.align.logprobs import sequence_logprobs, token_logprobs  # noqa: E402,F401

# --- prefs ---
from fastlm.align.data import PairSource, load_pairs, ranking_pairs  # noqa: E402,F401
from fastlm.align.reward import RewardModel, load_reward_model, pairwise_loss  # noqa: E402,F401
from fastlm.align.dpo import DPOConfig, DPOTrainer, dpo_loss, simpo_loss  # noqa: E402,F401

# --- distill ---
from fastlm.align.distill import DistillConfig, DistillTrainer, check_compatible, distill  # noqa: E402,F401

# --- rl ---
from fastlm.align.gae import AdaptiveKLController, FixedKLController, gae, group_advantages, kl_penalty  # noqa: E402,F401
from fastlm.align.rollout import GenerationSettings, RewardSource, load_reward_fn  # noqa: E402,F401
from fastlm.align.ppo import PPOTrainer, RLConfig  # noqa: E402,F401
from fastlm.align.grpo import GRPOTrainer, grpo_token_loss  # noqa: E402,F401
