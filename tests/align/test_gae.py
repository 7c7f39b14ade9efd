"""fastlm.align.gae against hand formulas (explicit loops) and TRL's GRPO pieces."""


import pytest
import torch

from fastlm.align.gae import (
    AdaptiveKLController, FixedKLController, clipped_policy_loss, clipped_value_loss, entropy_from_logits,
    gae, group_advantages, kl_penalty, masked_mean, masked_whiten,
)


def _gae_loops(rewards, values, mask, gamma, lam):
    """The textbook recursion, one row and one token at a time, in float64."""
    b, t = rewards.shape
    adv = torch.zeros(b, t, dtype=torch.float64)
    for i in range(b):
        n = int(mask[i].sum())
        last = 0.0
        for j in reversed(range(n)):
            next_v = float(values[i, j + 1]) if j + 1 < n else 0.0
            delta = float(rewards[i, j]) + gamma * next_v - float(values[i, j])
            last = delta + gamma * lam * last
            adv[i, j] = last
    return adv, (adv + values.double()) * mask


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 1.0), (0.99, 0.0), (1.0, 1.0)])
def test_gae_matches_recursion(gamma, lam):
    torch.manual_seed(0)
    b, t = 5, 9
    lengths = torch.tensor([9, 1, 4, 7, 0])
    mask = (torch.arange(t)[None] < lengths[:, None]).float()
    rewards, values = torch.randn(b, t, dtype=torch.float64), torch.randn(b, t, dtype=torch.float64)
    adv, ret = gae(rewards, values, gamma=gamma, lam=lam, mask=mask)
    want_adv, want_ret = _gae_loops(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(adv, want_adv)
    torch.testing.assert_close(ret, want_ret)
    assert adv[4].abs().sum() == 0  # an empty row stays zero
    # padding does not change a row's estimates: junk rewards/values there are ignored
    junk_r, junk_v = rewards.clone(), values.clone()
    junk_r[mask == 0], junk_v[mask == 0] = 1e3, -1e3
    torch.testing.assert_close(gae(junk_r, junk_v, gamma=gamma, lam=lam, mask=mask)[0], adv)
    # padding before the run too (a prompt): the same estimates, shifted
    shift = 3
    pad = lambda x: torch.cat((torch.full((b, shift), 7.0, dtype=x.dtype), x), 1)  # noqa: E731
    left_mask = torch.cat((torch.zeros(b, shift), mask), 1)
    adv2, ret2 = gae(pad(rewards), pad(values), gamma=gamma, lam=lam, mask=left_mask)
    torch.testing.assert_close(adv2[:, shift:], adv)
    torch.testing.assert_close(ret2[:, shift:], ret)
    assert (adv2[:, :shift] == 0).all() and (ret2[:, :shift] == 0).all()


def test_gae_lambda_one_gamma_one_is_reward_to_go_minus_value():
    r, v = torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[0.5, 0.25, 0.125]])
    adv, ret = gae(r, v, gamma=1.0, lam=1.0)
    torch.testing.assert_close(ret, torch.tensor([[6.0, 5.0, 3.0]]))
    torch.testing.assert_close(adv, ret - v)


def test_gae_errors():
    with pytest.raises(ValueError, match="gamma"):
        gae(torch.zeros(1, 2), torch.zeros(1, 2), gamma=1.5, lam=1.0)
    with pytest.raises(ValueError, match="shapes differ"):
        gae(torch.zeros(1, 2), torch.zeros(1, 3), gamma=1.0, lam=1.0)
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        gae(torch.zeros(2), torch.zeros(2), gamma=1.0, lam=1.0)


def test_whiten_over_masked_tokens():
    x = torch.tensor([[1.0, 2.0, 3.0, 99.0], [4.0, 5.0, -7.0, 99.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    vals = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], dtype=torch.float64)
    want_mean, want_std = vals.mean(), vals.std()  # unbiased, as TRL's masked_whiten
    out = masked_whiten(x.double(), mask)
    torch.testing.assert_close(out[mask.bool()], (vals - want_mean) / torch.sqrt(want_std ** 2 + 1e-8))
    assert (out[~mask.bool()] == 0).all()
    torch.testing.assert_close(masked_mean(x, mask), torch.tensor(3.0))
    torch.testing.assert_close(masked_mean(x, mask, dim=1), torch.tensor([2.0, 4.5]))


def _whiten_worker(rank, shards, init_file, results):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        x, mask = shards[rank]

        def reduce(t):
            dist.all_reduce(t)
            return t

        results[rank] = masked_whiten(x, mask, reduce=reduce)
    finally:
        dist.destroy_process_group()


def test_whiten_over_processes_equals_whiten_of_the_whole_batch(tmp_path):
    """Two gloo processes, each with its own rollout rows (different lengths and masks), whiten
    with the statistics of both: the same as whitening the concatenated batch in one process."""
    import torch.multiprocessing as mp

    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 7, generator=g, dtype=torch.float64) * 3 + 1
    mask = (torch.rand(5, 7, generator=g) > 0.3).to(torch.int64)
    shards = [(x[:2], mask[:2]), (x[2:], mask[2:])]
    results = mp.Manager().dict()
    mp.spawn(_whiten_worker, args=(shards, tmp_path / "init", results), nprocs=2, join=True)
    got = torch.cat((results[0], results[1]))
    torch.testing.assert_close(got, masked_whiten(x, mask))
    local = torch.cat((masked_whiten(*shards[0]), masked_whiten(*shards[1])))
    assert not torch.allclose(local, got)  # per-process whitening would differ
    identity = masked_whiten(x, mask, reduce=lambda t: t)  # one process: the plain statistics
    torch.testing.assert_close(identity, masked_whiten(x, mask))
    torch.testing.assert_close(masked_whiten(x, None, reduce=lambda t: t), masked_whiten(x))
    with pytest.raises(ValueError, match="dim=None"):
        masked_mean(x, mask, dim=1, reduce=lambda t: t)


def test_kl_estimators():
    lp, ref = torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([-1.5, -1.0, -0.5])
    d = lp - ref
    torch.testing.assert_close(kl_penalty(lp, ref, "k1"), d)
    torch.testing.assert_close(kl_penalty(lp, ref, "k2"), 0.5 * d ** 2)
    torch.testing.assert_close(kl_penalty(lp, ref, "k3"), torch.exp(-d) + d - 1)
    torch.testing.assert_close(kl_penalty(lp, ref, "abs"), d.abs())
    assert (kl_penalty(lp, ref, "k3") >= 0).all()
    with pytest.raises(ValueError, match="k1"):
        kl_penalty(lp, ref, "k9")


def test_kl_estimators_are_unbiased_for_sampled_tokens():
    """E_{x~p}[k1] = E[k3] = KL(p‖q), estimated from many samples of a small categorical."""
    g = torch.Generator().manual_seed(0)
    p, q = torch.tensor([0.5, 0.3, 0.2]), torch.tensor([0.2, 0.3, 0.5])
    x = torch.multinomial(p, 200_000, replacement=True, generator=g)
    lp, lq = p.log()[x], q.log()[x]
    exact = float((p * (p.log() - q.log())).sum())
    for kind in ("k1", "k3"):
        assert abs(float(kl_penalty(lp, lq, kind).mean()) - exact) < 0.01


def test_kl_controllers():
    fixed = FixedKLController(0.1)
    fixed.update(5.0, 64)
    assert fixed.value == 0.1
    ctl = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    ctl.update(12.0, 100)  # error clipped to +0.2
    assert ctl.value == pytest.approx(0.2 * (1 + 0.2 * 100 / 10000))
    ctl2 = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    ctl2.update(5.4, 100)  # error -0.1
    assert ctl2.value == pytest.approx(0.2 * (1 - 0.1 * 100 / 10000))
    ctl2.load_state_dict(ctl.state_dict())
    assert ctl2.value == ctl.value
    with pytest.raises(ValueError, match="target"):
        AdaptiveKLController(0.1, target=0, horizon=1)


def test_clipped_policy_loss_hand_formula():
    lp = torch.tensor([[0.0, 0.5, -0.5, 0.1]])
    old = torch.zeros(1, 4)
    adv = torch.tensor([[1.0, 1.0, -1.0, -2.0]])
    loss, clipped = clipped_policy_loss(lp, old, adv, clip_range=0.2)
    ratio = lp.exp()
    want = torch.tensor([[-1.0, -1.2, float(ratio[0, 2].clamp(min=0.8)), 2 * float(ratio[0, 3])]])
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(clipped, torch.tensor([[0.0, 1.0, 1.0, 0.0]]))
    # asymmetric range (DAPO's clip-higher) and one advantage per sequence
    loss_hi, _ = clipped_policy_loss(lp, old, torch.ones(1), clip_range=0.2, clip_range_high=0.28)
    torch.testing.assert_close(loss_hi[0, 1], torch.tensor(-1.28))
    # gradient flows through the unclipped tokens only
    lp_g = lp.clone().requires_grad_()
    clipped_policy_loss(lp_g, old, adv)[0].sum().backward()
    torch.testing.assert_close(lp_g.grad, torch.tensor([[-1.0, 0.0, 0.0, 2 * float(ratio[0, 3])]]))


def test_clipped_value_loss_hand_formula():
    v, old, ret = torch.tensor([1.0, 0.0, 0.5]), torch.tensor([0.0, 0.0, 0.4]), torch.tensor([2.0, 1.0, 0.0])
    loss, clipped = clipped_value_loss(v, old, ret, clip_range_value=0.2)
    # row 0: v_clip 0.2 -> max((1-2)^2, (0.2-2)^2) = 3.24; row 1: 1; row 2: v_clip 0.5 -> 0.25
    torch.testing.assert_close(loss, 0.5 * torch.tensor([3.24, 1.0, 0.25]))
    torch.testing.assert_close(clipped, torch.tensor([1.0, 0.0, 0.0]))


def test_entropy_matches_trl():
    from trl.trainer.utils import entropy_from_logits as trl_entropy

    logits = torch.randn(3, 5, 17, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(entropy_from_logits(logits), trl_entropy(logits))


def test_group_advantages_match_trl_normalisation():
    from trl.trainer.utils import nanstd

    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5, 0.2, 0.2, 0.9, 0.1, 0.3])
    g = 3
    mean = rewards.view(-1, g).mean(1).repeat_interleave(g)
    std = nanstd(rewards.view(-1, g), dim=1).repeat_interleave(g)
    torch.testing.assert_close(group_advantages(rewards, g), (rewards - mean) / (std + 1e-4))
    torch.testing.assert_close(group_advantages(rewards, g, scale="none"), rewards - mean)
    torch.testing.assert_close(group_advantages(rewards, g, scale="batch"),
                               (rewards - mean) / (nanstd(rewards) + 1e-4))
    assert (group_advantages(torch.tensor([0.3, 0.3]), 2) == 0).all()  # equal rewards: no signal
    with pytest.raises(ValueError, match="multiple of group_size"):
        group_advantages(rewards, 4)
