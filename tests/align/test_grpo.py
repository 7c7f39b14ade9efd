"""GRPO: the per-token loss against TRL's GRPOTrainer loss code, group structure, learning, errors."""

import json
import types
from collections import defaultdict

import pytest
import torch

from fastlm.align import rollout as R
from fastlm.align.grpo import GRPOTrainer, grpo_token_loss
from fastlm.align.ppo import RLConfig
from fastlm.train.trainer import TrainerConfig
from tests.align.test_ppo import low_bytes
from tests.align.test_rollout import TOK, tiny_model

PROMPTS = [f"Q{i}:" for i in range(12)]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls: one thread avoids spin-waits on a shared CPU (restored after)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _trl_loss(logps, old, ref, advantages, mask, beta, eps_low, eps_high):
    """TRL's GRPOTrainer._compute_loss (loss_type="bnpo": token mean over the batch) on given log-probs."""
    from trl.trainer.grpo_trainer import GRPOTrainer as TRLGRPO

    b, t = logps.shape
    ident = types.SimpleNamespace(gather=lambda x: x, reduce=lambda x, reduction="sum": x,
                                  gather_for_metrics=lambda x: x, num_processes=1, sync_gradients=True)
    fake = types.SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.ones(b, t), None),
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token", beta=beta,
        args=types.SimpleNamespace(use_bias_correction_kl=False, delta=None), loss_type="bnpo",
        epsilon_low=eps_low, epsilon_high=eps_high, use_vllm=False, model=types.SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1, _entropy_bonus_enabled=False, aux_loss_enabled=False,
        accelerator=ident, _metrics={"train": defaultdict(list)})
    inputs = {"prompt_ids": torch.zeros(b, 1, dtype=torch.long), "prompt_mask": torch.ones(b, 1, dtype=torch.long),
              "completion_ids": torch.zeros(b, t, dtype=torch.long), "completion_mask": mask.long(),
              "advantages": advantages, "old_per_token_logps": old, "ref_per_token_logps": ref}
    return TRLGRPO._compute_loss(fake, None, inputs), fake._metrics["train"]


@pytest.mark.parametrize("beta,eps_high", [(0.04, 0.2), (0.0, 0.28), (0.5, 0.2)])
def test_loss_and_gradient_equal_trl(beta, eps_high):
    g = torch.Generator().manual_seed(0)
    b, t = 4, 6
    mask = (torch.arange(t)[None] < torch.tensor([6, 3, 1, 5])[:, None]).float()
    old = -torch.rand(b, t, generator=g) * 3
    logps = (old + 0.3 * torch.randn(b, t, generator=g)).requires_grad_()
    ref = old + 0.2 * torch.randn(b, t, generator=g)
    adv = torch.randn(b, generator=g)
    want, metrics = _trl_loss(logps, old, ref, adv, mask, beta, 0.2, eps_high)
    (want_grad,) = torch.autograd.grad(want, logps)
    per_token, clipped, kl = grpo_token_loss(logps, old, ref, adv, beta=beta, clip_range=0.2, clip_range_high=eps_high)
    got = (per_token * mask).sum() / mask.sum()  # the engine's Σ token losses / number of tokens
    (got_grad,) = torch.autograd.grad(got, logps)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_grad, want_grad)
    if beta:
        torch.testing.assert_close((kl * mask).sum() / mask.sum(), torch.tensor(metrics["kl"][0]))
    # TRL's region clip ratio counts the tokens where the clipped branch is active
    torch.testing.assert_close((clipped * mask).sum() / mask.sum(),
                               torch.tensor(metrics["clip_ratio/region_mean"][0]))


def make(out, *, steps=2, group_size=4, batch=8, lr=1e-3, seed=3, reward=low_bytes):
    config = TrainerConfig(out=str(out), max_steps=steps, batch_size=batch, lr=lr, warmup_steps=0,
                           schedule="constant", device="cpu", progress=False, seed=seed)
    rl = RLConfig(generation=R.GenerationSettings(max_new_tokens=5), group_size=group_size, kl_coef=0.01)
    return GRPOTrainer(tiny_model(), TOK, PROMPTS, R.RewardSource(reward_fn=reward), config, rl)


def test_groups_share_a_prompt_and_advantages_are_group_normalised(tmp_path):
    trainer = make(tmp_path / "run", steps=1)
    trainer.fit()
    buf = trainer._buffer
    prompts, scores, adv = buf["prompts"], buf["scores"], buf["advantages"]
    assert len(prompts) == 8
    for k in range(2):
        group = slice(4 * k, 4 * k + 4)
        assert len(set(prompts[group])) == 1
        s = scores[group]
        torch.testing.assert_close(adv[group], (s - s.mean()) / (s.std() + 1e-4))
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    for key in ("reward", "kl", "entropy", "clip_fraction", "response_length", "rollout_tokens_per_s",
                "train_tokens_per_s", "groups_with_signal"):
        assert key in row, key
    assert "value_loss" not in row and trainer.model.value_head is None


def test_grpo_raises_the_reward(tmp_path):
    """A few rollouts on a reward a random byte model can move: the mean reward goes up."""
    trainer = make(tmp_path / "run", steps=8, group_size=8, batch=32, lr=1e-2)
    trainer.fit()
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    first, last = rows[0]["reward"], sum(r["reward"] for r in rows[-2:]) / 2
    assert last > first + 0.1, [r["reward"] for r in rows]


def test_rollout_size_must_hold_whole_groups(tmp_path):
    with pytest.raises(ValueError, match="multiple of group_size 3"):
        make(tmp_path / "run", group_size=3, batch=8)
