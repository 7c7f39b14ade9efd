"""PPO trainer: reward shaping and advantages by hand, logging, checkpoints, exact resume, LoRA."""

import json
import types

import pytest
import torch

from fastlm.align import rollout as R
from fastlm.align.ppo import PPOTrainer, RLConfig, check_steps
from fastlm.train.trainer import TrainerConfig
from tests.align.test_rollout import TOK, lora, tiny_model

PROMPTS = [f"Q{i}:" for i in range(12)]
TIMING = ("tokens_per_s", "rollout_tokens_per_s", "train_tokens_per_s")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls: one thread avoids spin-waits on a shared CPU (restored after)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def low_bytes(prompts, completions):
    """A reward with signal for a random byte-level model: the share of ASCII bytes below 'A'."""
    return [sum(ch < "A" for ch in c) / max(len(c), 1) for c in completions]


def make(out, *, policy=None, steps=4, epochs=2, minibatches=1, batch=8, **rl):
    config = TrainerConfig(out=str(out), max_steps=steps, batch_size=batch, lr=1e-3, warmup_steps=0,
                           schedule="constant", device="cpu", progress=False, seed=3)
    settings = RLConfig(generation=R.GenerationSettings(max_new_tokens=5), epochs=epochs,
                        num_minibatches=minibatches, **rl)
    return PPOTrainer(policy if policy is not None else tiny_model(), TOK, PROMPTS,
                      R.RewardSource(reward_fn=low_bytes), config, settings, extra_files=TOK.save)


def test_rewards_gae_and_whitening_by_hand():
    torch.manual_seed(0)
    b, t = 3, 7
    spans = [(2, 6), (1, 3), (4, 7)]  # completion targets [start, end) per row
    mask = torch.zeros(b, t)
    for i, (s, e) in enumerate(spans):
        mask[i, s:e] = 1
    lp, ref, values = torch.randn(b, t) * mask, torch.randn(b, t) * mask, torch.randn(b, t) * mask
    scores = torch.tensor([1.0, -0.5, 2.0])
    beta, gamma, lam = 0.3, 0.9, 0.8
    rl = RLConfig(kl_coef=beta, gamma=gamma, lam=lam)
    fake = types.SimpleNamespace(rl=rl, kl_ctl=rl.kl_controller())
    buffer = {"target_mask": mask, "logprobs": lp, "ref_logprobs": ref, "values": values, "scores": scores}
    PPOTrainer._score_rollout(fake, buffer)
    adv = torch.zeros(b, t, dtype=torch.float64)
    ret = torch.zeros(b, t, dtype=torch.float64)
    for i, (s, e) in enumerate(spans):
        last = 0.0
        for j in reversed(range(s, e)):
            r = -beta * float(lp[i, j] - ref[i, j]) + (float(scores[i]) if j == e - 1 else 0.0)
            next_v = float(values[i, j + 1]) if j + 1 < e else 0.0
            last = r + gamma * next_v - float(values[i, j]) + gamma * lam * last
            adv[i, j], ret[i, j] = last, last + float(values[i, j])
    torch.testing.assert_close(buffer["returns"].double(), ret, atol=1e-5, rtol=1e-5)
    flat = adv[mask.bool()]
    want = (adv - flat.mean()) / torch.sqrt(flat.var() + 1e-8) * mask
    torch.testing.assert_close(buffer["advantages"].double(), want, atol=1e-5, rtol=1e-5)


def test_ppo_logs_metrics_and_writes_checkpoints(tmp_path):
    trainer = make(tmp_path / "run", steps=4, epochs=2, minibatches=1, batch=8)
    result = trainer.fit()
    assert len(result.losses) == 4 and all(map(lambda x: x == x, result.losses))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for row in rows:
        for key in ("reward", "kl", "entropy", "clip_fraction", "value_loss", "response_length", "kl_coef",
                    *TIMING):
            assert key in row and row[key] == row[key], key
        assert 1 <= row["response_length"] <= 5 and 0 <= row["clip_fraction"] <= 1 and row["entropy"] > 0
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-5)  # the first rollout is the reference's own
    assert rows[0]["clip_fraction"] == 0.0  # the first step is on-policy: ratio 1
    assert rows[0]["reward"] == rows[1]["reward"]  # two epochs over one rollout
    step = tmp_path / "run" / "checkpoints" / "step-00000004"
    for name in ("config.json", "model.safetensors", "value_head.safetensors", "trainer_state.pt"):
        assert (step / name).is_file(), name
    assert trainer.reference is not None and not any(p.requires_grad for p in trainer.reference.parameters())


def _params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("adaptive", [False, True])
def test_exact_resume_in_the_middle_of_a_rollout(tmp_path, adaptive):
    kl = dict(target_kl=0.01, kl_horizon=20.0) if adaptive else {}
    full = make(tmp_path / "a", steps=4, epochs=2, **kl)
    full.fit()
    want = _params(full.model)
    want_rows = (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()

    first = make(tmp_path / "b", steps=4, epochs=2, **kl)
    first.fit(stop_at=1)  # the checkpoint falls between the two epochs of rollout 0
    again = make(tmp_path / "b", steps=4, epochs=2, **kl)
    result = again.fit(resume=True)
    assert result.start_step == 1
    got = _params(again.model)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    rows = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    strip = lambda line: {k: v for k, v in json.loads(line).items() if k not in TIMING}  # noqa: E731
    assert [strip(x) for x in rows] == [strip(x) for x in want_rows]
    coefs = [json.loads(x)["kl_coef"] for x in rows]
    assert (coefs[0] != coefs[-1]) == adaptive  # the adaptive β moved (and was restored on resume)


def test_lora_policy_uses_the_base_as_reference(tmp_path):
    policy = lora(tiny_model())
    base_before = {k: v.clone() for k, v in policy.model.state_dict().items() if "lora" not in k}
    trainer = make(tmp_path / "run", policy=policy, steps=2, epochs=1)
    trainer.fit()
    assert trainer.reference is None  # no second copy of the weights
    after = policy.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in base_before.items())
    step = tmp_path / "run" / "checkpoints" / "step-00000002"
    assert (step / "adapter_config.json").is_file() and (step / "value_head.safetensors").is_file()
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[1]["kl"] != 0.0  # the adapter has moved away from the base


def test_ppo_raises_the_reward(tmp_path):
    """A few rollouts on a reward a random byte model can move: the mean reward goes up."""
    config = TrainerConfig(out=str(tmp_path / "run"), max_steps=16, batch_size=16, lr=1e-2, warmup_steps=0,
                           schedule="constant", device="cpu", progress=False, seed=3)
    rl = RLConfig(generation=R.GenerationSettings(max_new_tokens=5), epochs=2, num_minibatches=1, kl_coef=0.01,
                  vf_coef=0.5)
    PPOTrainer(tiny_model(), TOK, PROMPTS, R.RewardSource(reward_fn=low_bytes), config, rl).fit()
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    first, last = rows[0]["reward"], sum(r["reward"] for r in rows[-4:]) / 4
    assert last > first + 0.1, [r["reward"] for r in rows[::2]]


def test_config_errors():
    with pytest.raises(ValueError, match="kl_estimator"):
        RLConfig(kl_estimator="k7")
    with pytest.raises(ValueError, match="gamma"):
        RLConfig(gamma=2.0)
    with pytest.raises(ValueError, match="multiple of epochs"):
        check_steps(TrainerConfig(max_steps=5), RLConfig(epochs=2))
    with pytest.raises(ValueError, match="fsdp"):
        PPOTrainer(tiny_model(), TOK, PROMPTS, R.RewardSource(reward_fn=low_bytes),
                   TrainerConfig(fsdp=True, device="cpu"), RLConfig())


@pytest.mark.parametrize("cls_name", ["ppo", "grpo"])
def test_host_reads_per_training_step(tmp_path, cls_name):
    """Between rollouts: no read to assemble a minibatch, the engine's one read per step, and one
    for the step's RL statistics (entropy, clip fraction, value loss)."""
    from fastlm.align.grpo import GRPOTrainer
    from tests.host_reads import HostReads

    cls = PPOTrainer if cls_name == "ppo" else GRPOTrainer
    config = TrainerConfig(out=str(tmp_path / "run"), max_steps=4, batch_size=4, lr=1e-3, device="cpu",
                           progress=False)
    rl = RLConfig(generation=R.GenerationSettings(max_new_tokens=4), epochs=2, num_minibatches=2, group_size=4)
    trainer = cls(tiny_model(), TOK, PROMPTS, R.RewardSource(reward_fn=low_bytes), config, rl)
    trainer._build()
    trainer._timer.restart()
    trainer._fetch(0)  # makes the rollout
    for step in (1, 2, 3):
        with HostReads() as fetch:
            batches = trainer._fetch(step)
        with HostReads() as run:
            trainer._run_step(step, batches)
        with HostReads() as metrics:
            trainer._step_metrics()
        assert (fetch.count, run.count, metrics.count) == (0, 1, 1), (fetch.where, run.where, metrics.where)
        assert batches[0][1] == int(batches[0][0]["target_mask"].sum())
