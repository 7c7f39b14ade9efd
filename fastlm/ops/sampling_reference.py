"""The sampling semantics, in plain PyTorch: the reference every sampling backend matches.

For one row of logits x (V,) with temperature T, top-k k, top-p P and min-p m:

* **Order.** Tokens are ranked by logit, descending, ties broken by *lower index first*. The
  rank is taken on the raw logits (T > 0 is monotone, so it is also the order of the
  probabilities) and every filter keeps a *prefix* of this order, so the kept set is always a
  prefix and the filters compose by taking the shortest one.
* **Temperature.** w_i = exp((x_i − max_j x_j) / T), the unnormalized probabilities;
  p_i = w_i / Σ_j w_j. T = 0 is greedy: the first index of the maximum, drawn with probability 1.
* **Top-k.** Keep the first k tokens of the order: exactly min(k, #finite) tokens, never more,
  also when logits tie at the boundary (the tied tokens of lower index win).
* **Top-p** (on the top-k-renormalized distribution, transformers' order). With the kept
  tokens in order and mass_before(j) = Σ_{i before j} w_i, keep j iff mass_before(j) < P·Σ w:
  the smallest prefix whose mass reaches P (the first token is always kept).
* **Min-p.** Keep i iff p_i ≥ m · max_j p_j, i.e. w_i ≥ m (the maximum has w = 1). The ratio
  does not change under renormalization, so applying it last is the same as applying it to
  the temperature-scaled distribution; it never removes the most likely token.
* **Draw.** Inverse CDF in *vocabulary index* order with one uniform u ∈ [0, 1) per row: the
  token is the first index whose cumulative kept weight exceeds u · Σ_kept w. A token of weight
  0 (filtered, masked with -inf, or underflowed) is never drawn.
* **Log-probability** of the drawn token under the distribution it was drawn from (after
  temperature and all filters): log p = (x_tok − max x) / T − log Σ_kept w; 0 for greedy rows.

Invalid input does not raise here: each row gets a status word (``STATUS_*`` bits, 0 = valid)
and an invalid row returns token 0 and log-probability NaN. ``fastlm.ops.sample`` turns the
bits into ValueError (at once, or deferred to the end of a decode loop).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Status bits, one per kind of invalid input (shared by every backend).
STATUS_NAN = 1  # a logit is NaN
STATUS_POS_INF = 2  # a logit is +inf
STATUS_NO_FINITE = 4  # no finite logit in the row (all -inf)
STATUS_BAD_TEMPERATURE = 8  # temperature NaN, < 0 or inf
STATUS_BAD_TOP_K = 16  # top_k < 1
STATUS_BAD_TOP_P = 32  # top_p outside (0, 1]
STATUS_BAD_MIN_P = 64  # min_p outside [0, 1]

STATUS_MESSAGES = {
    STATUS_NAN: "logits contain NaN (expected finite values, or -inf for masked tokens)",
    STATUS_POS_INF: "logits contain +inf (expected finite values, or -inf for masked tokens)",
    STATUS_NO_FINITE: "a row of logits has no finite value (every token is masked)",
    STATUS_BAD_TEMPERATURE: "temperature must be a number >= 0 and finite",
    STATUS_BAD_TOP_K: "top_k must be an integer >= 1",
    STATUS_BAD_TOP_P: "top_p must be in (0, 1]",
    STATUS_BAD_MIN_P: "min_p must be in [0, 1]",
}


def _row_param(value, batch: int, dtype: torch.dtype, device: torch.device, default) -> torch.Tensor:
    """A scalar, None (-> default) or (B,) tensor as a (B,) tensor of ``dtype``."""
    if value is None:
        value = default
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=dtype).expand(batch)
    return torch.full((batch,), value, dtype=dtype, device=device)


def row_status(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
) -> torch.Tensor:
    """(B,) int32 status word of each row: the OR of the ``STATUS_*`` bits that apply."""
    x = logits
    t, p, m = temperature.double(), top_p.double(), min_p.double()
    bits = (
        (torch.isnan(x).any(-1), STATUS_NAN),
        ((x == float("inf")).any(-1), STATUS_POS_INF),
        (~torch.isfinite(x).any(-1), STATUS_NO_FINITE),
        (~(t >= 0) | torch.isinf(t), STATUS_BAD_TEMPERATURE),
        (top_k < 1, STATUS_BAD_TOP_K),
        (~((p > 0) & (p <= 1)), STATUS_BAD_TOP_P),
        (~((m >= 0) & (m <= 1)), STATUS_BAD_MIN_P),
    )
    status = torch.zeros(x.shape[0], dtype=torch.int32, device=x.device)
    for flag, bit in bits:
        status |= flag.to(torch.int32) * bit
    return status


def _kept_weights(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
) -> torch.Tensor:
    """Unnormalized kept weights w (B, V) in index order: the module docstring's filters, with
    greedy rows one-hot at the first maximum. Rows must be valid (status 0)."""
    x = logits if logits.dtype == torch.float64 else logits.float()
    batch, vocab = x.shape
    # The order: logits descending, ties by lower index (a stable sort keeps index order).
    sorted_x, order = torch.sort(x, dim=-1, descending=True, stable=True)
    rank = torch.arange(vocab, device=x.device)
    finite = sorted_x > float("-inf")
    greedy = temperature == 0
    t = torch.where(greedy, torch.ones_like(temperature), temperature).to(x.dtype)[:, None]
    w = torch.exp((sorted_x - sorted_x[:, :1]) / t).masked_fill(~finite, 0.0)  # (B, V), sorted
    keep = finite & (rank[None, :] < top_k[:, None])  # top-k
    w_k = w * keep
    mass_before = F.pad(torch.cumsum(w_k, dim=-1)[:, :-1], (1, 0))  # exclusive prefix sums
    p = top_p.to(x.dtype)[:, None]
    keep &= (mass_before < p * w_k.sum(-1, keepdim=True)) | (p >= 1)  # top-p (1: off, exactly)
    keep &= w >= min_p.to(x.dtype)[:, None]  # min-p: p_i / p_max = w_i >= m
    keep = torch.where(greedy[:, None], rank[None, :] == 0, keep)
    kept_sorted = torch.where(keep, torch.where(greedy[:, None], 1.0, w), 0.0)
    return torch.zeros_like(x).scatter_(-1, order, kept_sorted)


def _sanitize(logits, temperature, top_k, top_p, min_p, status):
    """Replace invalid rows by harmless ones (their outputs are overwritten afterwards)."""
    bad = (status != 0)[:, None]
    logits = torch.where(bad, torch.zeros((), dtype=logits.dtype, device=logits.device), logits)
    ok = status == 0
    return (
        logits,
        torch.where(ok, temperature, torch.ones_like(temperature)),
        torch.where(ok, top_k, torch.ones_like(top_k)),
        torch.where(ok, top_p, torch.ones_like(top_p)),
        torch.where(ok, min_p, torch.zeros_like(min_p)),
    )


def filtered_probs(
    logits: torch.Tensor,
    temperature: float | torch.Tensor = 1.0,
    top_k: int | torch.Tensor | None = None,
    top_p: float | torch.Tensor | None = None,
    min_p: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """The sampling distribution: logits (B, V) -> probs (B, V), filtered tokens exactly 0.

    float32 (float64 for float64 logits), rows summing to 1; each parameter a scalar, None
    (filter off) or a (B,) tensor. Greedy rows (T = 0) are one-hot at the first maximum.
    Inputs must be valid.
    """
    batch, vocab = logits.shape
    dev = logits.device
    w = _kept_weights(
        logits,
        _row_param(temperature, batch, torch.float64, dev, 1.0),
        _row_param(top_k, batch, torch.int64, dev, vocab),
        _row_param(top_p, batch, torch.float64, dev, 1.0),
        _row_param(min_p, batch, torch.float64, dev, 0.0),
    )
    return w / w.sum(-1, keepdim=True)


def sample(
    logits: torch.Tensor,
    uniform: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``fastlm::sample`` op: one token per row by inverse CDF over the kept weights.

    logits (B, V) float; uniform (B,) in [0, 1); temperature, top_p, min_p (B,) float; top_k
    (B,) int (>= V: off). Returns tokens (B,) int64, log-probabilities (B,) float32 of the drawn
    tokens under the filtered distribution, and the row status (B,) int32 (0 = valid).
    """
    status = row_status(logits, temperature, top_k, top_p, min_p)
    clean = _sanitize(logits, temperature, top_k, top_p, min_p, status)
    w = _kept_weights(*clean).double()  # (B, V), index order
    cdf = torch.cumsum(w, dim=-1)
    total = cdf[:, -1]
    target = uniform.to(cdf.device, torch.float64) * total
    tokens = torch.searchsorted(cdf, target[:, None], right=True).squeeze(-1)
    # u·total can round up to the total: fall back to the last token of positive weight.
    positions = torch.arange(w.shape[1], device=w.device)
    last_positive = torch.where(w > 0, positions, -1).amax(-1)
    tokens = torch.minimum(tokens, last_positive)
    x = clean[0] if clean[0].dtype == torch.float64 else clean[0].float()
    x_tok = x.gather(-1, tokens[:, None]).squeeze(-1)
    temperature = clean[1].to(x.dtype)
    greedy = temperature == 0
    t = torch.where(greedy, torch.ones_like(temperature), temperature)
    logprobs = (x_tok - x.amax(-1)) / t - torch.log(total).to(x.dtype)
    logprobs = torch.where(greedy, torch.zeros_like(logprobs), logprobs).float()
    ok = status == 0
    tokens = torch.where(ok, tokens, torch.zeros_like(tokens))
    logprobs = torch.where(ok, logprobs, torch.full_like(logprobs, float("nan")))
    return tokens, logprobs, status
