"""The arithmetic of online RL (PPO, GRPO): small pure functions over (B, T) tensors.

Conventions: ``mask`` (B, T) is 1 (or True) on the tokens that count (the completion) and 0 on
padding; every function leaves masked positions at 0 in its per-token outputs. Nothing here
reads a value back to the host.

- :func:`gae`: generalised advantage estimation (Schulman et al. 2016), a reversed scan over T:
  δ_t = r_t + γ·V_{t+1} − V_t,  A_t = δ_t + γλ·A_{t+1},  returns R_t = A_t + V_t, with V and A
  taken as 0 past the last unmasked token of a row (the episode ends there).
- :func:`masked_mean`, :func:`masked_var`, :func:`masked_whiten`: statistics over masked tokens.
- :func:`kl_penalty`: per-token estimators of KL(π‖π_ref) from log-probs of sampled tokens
  (Schulman's "Approximating KL divergence"): k1 = log π − log π_ref, k2 = ½(log π − log π_ref)²,
  k3 = exp(log π_ref − log π) − (log π_ref − log π) − 1 (≥ 0, unbiased), and abs = |k1|.
- :class:`AdaptiveKLController` (Ziegler et al. 2019) and :class:`FixedKLController`.
- :func:`clipped_policy_loss`, :func:`clipped_value_loss`, :func:`entropy_from_logits`,
  :func:`group_advantages` (GRPO): per-token (or per-sequence) losses and statistics.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

Reduce = Callable[[torch.Tensor], torch.Tensor]  # sums a tensor over processes (e.g. all_reduce)

KL_ESTIMATORS = ("k1", "k2", "k3", "abs")
GROUP_SCALINGS = ("group", "batch", "none")


def _check_same_shape(**tensors: torch.Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items() if t is not None}
    if len(set(shapes.values())) > 1:
        raise ValueError("shapes differ: " + ", ".join(f"{n} {s}" for n, s in shapes.items()))


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None = None, dim: int | None = None, *,
                reduce: Reduce | None = None) -> torch.Tensor:
    """Σ x·mask / Σ mask (over ``dim``, or all elements); 0 where the mask is empty. ``reduce``
    sums a tensor over processes (e.g. an all-reduce): the mean is then over every process's
    elements (only without ``dim``)."""
    if reduce is not None and dim is not None:
        raise ValueError("masked_mean: reduce (over processes) needs dim=None")
    if mask is not None:
        _check_same_shape(x=x, mask=mask)
        mask = mask.to(x.dtype)
    if reduce is None and mask is None:
        return x.mean() if dim is None else x.mean(dim)
    if mask is None:
        total, count = x.sum(), torch.tensor(float(x.numel()), dtype=x.dtype, device=x.device)
    else:
        total = (x * mask).sum() if dim is None else (x * mask).sum(dim)
        count = mask.sum() if dim is None else mask.sum(dim)
    if reduce is not None:
        total, count = reduce(torch.stack((total, count)))
    return total / count.clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor | None = None, *, unbiased: bool = True,
               reduce: Reduce | None = None) -> torch.Tensor:
    """Variance of the masked elements of x (Bessel-corrected when ``unbiased``, as TRL's PPO
    did); over every process's elements with ``reduce`` (see :func:`masked_mean`)."""
    mean = masked_mean(x, mask, reduce=reduce)
    var = masked_mean((x - mean) ** 2, mask, reduce=reduce)
    if unbiased:
        n = torch.tensor(float(x.numel()), dtype=x.dtype, device=x.device) if mask is None else mask.sum().to(x.dtype)
        if reduce is not None:
            n = reduce(n.clone())
        var = var * n / (n - 1).clamp(min=1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor | None = None, *, shift_mean: bool = True,
                  eps: float = 1e-8, reduce: Reduce | None = None) -> torch.Tensor:
    """(x − mean) / sqrt(var + eps) over the masked elements (mean added back unless
    ``shift_mean``); masked-out positions are 0 in the result. With ``reduce`` (a sum over
    processes) mean and variance are those of every process's elements together, so DDP ranks
    whiten their rollouts alike."""
    mean, var = masked_mean(x, mask, reduce=reduce), masked_var(x, mask, reduce=reduce)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out if mask is None else out * mask.to(out.dtype)


def gae(rewards: torch.Tensor, values: torch.Tensor, *, gamma: float, lam: float,
        mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimates over (B, T): returns (advantages, returns), both (B, T).

    rewards, values: (B, T) per-token rewards r_t and value estimates V_t of the state before
    token t. With ``mask`` (B, T) — ones on each row's tokens as one contiguous run (padding
    before and/or after, e.g. the prompt and the right padding of a completion mask) — rewards
    and values outside the run count as 0, so its last token bootstraps from V = 0 (the episode
    ends), and advantages and returns are 0 outside it. One reversed pass over T, vectorised over B."""
    if rewards.dim() != 2:
        raise ValueError(f"gae: rewards must be (B, T), got shape {tuple(rewards.shape)}")
    _check_same_shape(rewards=rewards, values=values, mask=mask)
    for name, value in (("gamma", gamma), ("lam", lam)):
        if not 0 <= value <= 1:
            raise ValueError(f"gae: {name} must be in [0, 1], got {value}")
    dtype = torch.promote_types(rewards.dtype, torch.float32)
    r, v = rewards.to(dtype), values.to(dtype)
    if mask is not None:
        m = mask.to(dtype)
        r, v = r * m, v * m
    b, t = r.shape
    advantages = torch.empty_like(r)
    running = torch.zeros(b, dtype=dtype, device=r.device)  # A_{t+1}: (B,)
    next_value = torch.zeros(b, dtype=dtype, device=r.device)  # V_{t+1}: (B,)
    for i in range(t - 1, -1, -1):
        delta = r[:, i] + gamma * next_value - v[:, i]
        running = delta + gamma * lam * running
        advantages[:, i] = running
        next_value = v[:, i]
    if mask is not None:
        advantages = advantages * m
    return advantages, advantages + v


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "k1",
               mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token estimate of KL(π‖π_ref) at sampled tokens: (B, T) -> (B, T) (0 where masked).

    With d = log π − log π_ref: k1 = d; k2 = d²/2; k3 = exp(−d) + d − 1; abs = |d|."""
    _check_same_shape(logprobs=logprobs, ref_logprobs=ref_logprobs, mask=mask)
    d = logprobs.float() - ref_logprobs.float()
    if kind == "k1":
        kl = d
    elif kind == "k2":
        kl = 0.5 * d * d
    elif kind == "k3":
        kl = torch.expm1(-d) + d
    elif kind == "abs":
        kl = d.abs()
    else:
        raise ValueError(f"kl estimator must be one of {KL_ESTIMATORS}, got {kind!r}")
    return kl if mask is None else kl * mask.to(kl.dtype)


class FixedKLController:
    """A constant KL coefficient β."""

    def __init__(self, kl_coef: float) -> None:
        if not kl_coef >= 0:
            raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """No change."""

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController(FixedKLController):
    """Ziegler et al.'s proportional controller: after a batch of ``n_steps`` samples with
    measured KL ``current_kl``, β ← β·(1 + clip(KL/target − 1, −0.2, 0.2)·n_steps/horizon)."""

    def __init__(self, init_kl_coef: float, target: float, horizon: float) -> None:
        super().__init__(init_kl_coef)
        if not target > 0 or not horizon > 0:
            raise ValueError(f"AdaptiveKLController: target and horizon must be > 0, got {target}, {horizon}")
        self.target, self.horizon = float(target), float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        if not math.isfinite(current_kl):
            return
        error = min(max(current_kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + error * n_steps / self.horizon


def clipped_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, *,
                        clip_range: float = 0.2, clip_range_high: float | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate, per token: returns (loss, clipped), both shaped like logprobs.

    ρ = exp(log π − log π_old); loss = max(−A·ρ, −A·clip(ρ, 1 − ε_low, 1 + ε_high)) with
    ε_low = clip_range, ε_high = clip_range_high (default: clip_range); ``clipped`` is 1.0 where
    the clipped term is the larger (the clip fraction's numerator). ``advantages`` may be (B, T)
    or (B,) / (B, 1) (one per sequence, broadcast over T)."""
    high = clip_range if clip_range_high is None else clip_range_high
    if not clip_range > 0 or not high > 0:
        raise ValueError(f"clip ranges must be > 0, got {clip_range}, {high}")
    if advantages.dim() == 1:
        advantages = advantages[:, None]
    ratio = torch.exp(logprobs.float() - old_logprobs.float())
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_range, 1 + high)
    return torch.maximum(unclipped, clipped), (clipped > unclipped).float()


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, *,
                       clip_range_value: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped value loss, per token: returns (loss, clipped).

    V_clip = V_old + clip(V − V_old, −ε, ε); loss = ½·max((V − R)², (V_clip − R)²);
    ``clipped`` is 1.0 where the clipped term is the larger."""
    _check_same_shape(values=values, old_values=old_values, returns=returns)
    if not clip_range_value > 0:
        raise ValueError(f"clip_range_value must be > 0, got {clip_range_value}")
    values = values.float()
    v_clip = old_values + (values - old_values).clamp(-clip_range_value, clip_range_value)
    loss1, loss2 = (values - returns) ** 2, (v_clip - returns) ** 2
    return 0.5 * torch.maximum(loss1, loss2), (loss2 > loss1).float()


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy −Σ p log p of softmax(logits) over the last dimension: (..., V) -> (...)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def group_advantages(rewards: torch.Tensor, group_size: int, *, scale: str = "group",
                     eps: float = 1e-4) -> torch.Tensor:
    """GRPO's advantages of (B,) rewards, rows grouped by consecutive ``group_size``:
    A = r − mean(group), divided by (std + eps) with std the unbiased std of the group
    (``scale="group"``), of the whole batch (``"batch"``), or not divided (``"none"``)."""
    if rewards.dim() != 1:
        raise ValueError(f"group_advantages: rewards must be (B,), got shape {tuple(rewards.shape)}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_advantages: group_size must be a positive integer, got {group_size!r}")
    if rewards.numel() % group_size:
        raise ValueError(f"group_advantages: {rewards.numel()} rewards are not a multiple of group_size {group_size}")
    if scale not in GROUP_SCALINGS:
        raise ValueError(f"group_advantages: scale must be one of {GROUP_SCALINGS}, got {scale!r}")
    r = rewards.float()
    groups = r.view(-1, group_size)  # (B / G, G)
    centered = (groups - groups.mean(1, keepdim=True)).flatten()
    if scale == "none":
        return centered
    if scale == "group":
        std = (groups.std(1, keepdim=True) if group_size > 1 else torch.zeros_like(groups)).expand_as(groups).flatten()
    else:
        std = (r.std() if r.numel() > 1 else torch.zeros(())).expand_as(r)
    return centered / (std + eps)
