"""fastlm.align: alignment and distillation — preference data, reward models, DPO/IPO/SimPO,
PPO/GRPO with a KL penalty to a frozen reference, and knowledge distillation."""

# --- alignkern ---
from fastlm.align.logprobs import sequence_logprobs, token_logprobs  # noqa: E402,F401
