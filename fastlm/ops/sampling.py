"""fastlm.ops.sample: temperature, top-k, top-p and min-p sampling, fused, without a full sort.

The semantics (order of the filters, tie rule, the draw) are defined by the plain-PyTorch
reference below (:func:`sample_reference`); the ``triton`` (fastlm.kernels.sampling)
and ``cuda`` (csrc/sampling.cu) kernels compute the same thing in a few passes over the
vocabulary: thresholds found by a 16-way search on the logits' order keys instead of a sort.

The op is ``fastlm::sample(logits, uniform, temperature, top_k, top_p, min_p, backend)`` with
every parameter a (B,) tensor, returning (tokens int64, logprobs float32, status int32). Its
kernels never synchronize with the host: invalid input is reported in the status word of
each row, which :func:`sample` turns into ``ValueError`` — at once (``check=True``, one sync
per call), or later through :class:`DeferredChecks` (a device-side flag read once at the end of
a decode loop, so that no token costs a sync).

Kernels: kernels/sampling.py (triton) and csrc/sampling.cu (cuda), adapted in
fastlm/ops/triton/sampling.py and fastlm/ops/cuda/sampling.py.

Semantics (the reference):

The sampling semantics, in plain PyTorch: the reference every sampling backend matches.

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

import math
import numbers

import torch
import torch.nn.functional as F

from fastlm.ops.checks import check_floating, check_ndim
from fastlm.ops.registry import OpSpec, define_op, run

__all__ = ["DeferredChecks", "filtered_probs", "sample"]

NAME = "sample"


# ---- reference ----------------------------------------------------------------------------------


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


def sample_reference(
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


# ---- spec ---------------------------------------------------------------------------------------


def _fake(logits, uniform, temperature, top_k, top_p, min_p):
    batch = logits.shape[0]
    return (
        logits.new_empty((batch,), dtype=torch.int64),
        logits.new_empty((batch,), dtype=torch.float32),
        logits.new_empty((batch,), dtype=torch.int32),
    )


define_op(OpSpec(
    NAME,
    "Tensor logits, Tensor uniform, Tensor temperature, Tensor top_k, Tensor top_p, Tensor min_p",
    "(Tensor, Tensor, Tensor)",  # tokens (B,) int64, logprobs (B,) float32, status (B,) int32
    _fake,
    reference_fn=sample_reference,
))


# --- checks ----------------------------------------------------------------------------------


def _describe_rows(rows: list[int]) -> str:
    shown = ", ".join(str(r) for r in rows[:8])
    return f"row{'s' if len(rows) > 1 else ''} {shown}{', ...' if len(rows) > 8 else ''}"


def raise_for_status(status: torch.Tensor) -> None:
    """ValueError naming every problem in the row status words (a (B,) or () int32 tensor;
    reading it synchronizes with the device once). Returns quietly when all are 0."""
    codes = status.reshape(-1).cpu()
    if not bool(codes.any()):
        return
    problems = []
    for bit, message in STATUS_MESSAGES.items():
        rows = (codes & bit).nonzero().flatten().tolist()
        if rows:
            where = f" ({_describe_rows(rows)})" if status.dim() else ""
            problems.append(f"{message}{where}")
    raise ValueError("sample: " + "; ".join(problems))


class DeferredChecks:
    """Accumulates the input checks of many :func:`sample` calls on the device.

    ``checks = DeferredChecks()``; pass ``check=checks`` to every call of a decode loop (no
    host sync per token), then ``checks.raise_if_any()`` once at the end: one sync, and the
    ValueError a direct call would have raised. The flags are the OR of the row status words
    (``STATUS_*`` bits above), per row while the batch size
    stays the same, else folded into one word.
    """

    def __init__(self) -> None:
        self.flags: torch.Tensor | None = None

    def update(self, status: torch.Tensor) -> None:
        """OR ``status`` (B,) int32 into the flags, on the device (no sync)."""
        if self.flags is None:
            self.flags = status.clone()
        elif self.flags.shape == status.shape:
            self.flags.bitwise_or_(status)
        else:
            self.flags = self._fold(self.flags) | self._fold(status)

    @staticmethod
    def _fold(status: torch.Tensor) -> torch.Tensor:
        """The OR of all words, as a () int32 tensor: per bit, the max over rows, then summed."""
        bits = torch.tensor(list(STATUS_MESSAGES), dtype=torch.int32, device=status.device)
        return (status.reshape(-1, 1) & bits).amax(0).sum().to(torch.int32)

    def raise_if_any(self) -> None:
        """Raise the ValueError of the first problem seen (reads the flags: one sync)."""
        if self.flags is not None:
            raise_for_status(self.flags)

    def reset(self) -> None:
        self.flags = None


# --- the public function ---------------------------------------------------------------------


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _row_tensor(name: str, value: torch.Tensor, batch: int, device: torch.device, integer: bool) -> torch.Tensor:
    if value.shape != (batch,):
        raise ValueError(f"sample: {name} must be a scalar or a ({batch},) tensor (one per row), got {tuple(value.shape)}")
    if value.device != device:
        raise ValueError(f"sample: {name} is on {value.device} but logits are on {device}")
    if integer and (value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool):
        raise TypeError(f"sample: {name} must be an integer tensor, got {value.dtype}")
    if not integer and not value.dtype.is_floating_point:
        raise TypeError(f"sample: {name} must be a floating-point tensor, got {value.dtype}")
    return value.to(torch.int64 if integer else torch.float32)


# (batch, vocab, device, each scalar parameter with its type, inference mode) -> the four (B,)
# tensors built from them: a decode loop samples with the same settings every step, and building
# them is four allocations (four kernel launches on a GPU) per token. Read-only: every backend
# only reads them.
_SCALAR_PARAMS: dict[tuple, tuple[torch.Tensor, ...]] = {}
_SCALAR_PARAMS_MAX = 32


def _row_params(logits: torch.Tensor, temperature, top_k, top_p, min_p) -> tuple[torch.Tensor, ...]:
    """The four (B,) parameter tensors; scalars are validated here (no sync), tensors' values
    by the kernels (status bits). All-scalar settings are built once per batch size, device and
    values (``_SCALAR_PARAMS``; not while torch.compile traces)."""
    batch, vocab = logits.shape
    device = logits.device
    tensor, key = torch.Tensor, None
    if not (isinstance(temperature, tensor) or isinstance(top_k, tensor) or isinstance(top_p, tensor)
            or isinstance(min_p, tensor) or torch.compiler.is_compiling()):
        key = (batch, vocab, device, type(temperature), temperature, type(top_k), top_k, type(top_p), top_p,
               type(min_p), min_p, torch.is_inference_mode_enabled())  # (inference tensors stay in their mode)
        try:
            cached = _SCALAR_PARAMS.get(key)
        except TypeError:  # an unhashable (so invalid) setting: validated, and refused, below
            cached = key = None
        if cached is not None:
            return cached
    out = _build_row_params(batch, vocab, device, temperature, top_k, top_p, min_p)
    if key is not None:
        if len(_SCALAR_PARAMS) >= _SCALAR_PARAMS_MAX:
            _SCALAR_PARAMS.clear()
        _SCALAR_PARAMS[key] = out
    return out


def _build_row_params(batch: int, vocab: int, device: torch.device, temperature, top_k, top_p,
                      min_p) -> tuple[torch.Tensor, ...]:
    out = []
    for name, value, default, integer, valid, allowed in (
        ("temperature", temperature, 1.0, False, lambda t: math.isfinite(t) and t >= 0, "a number >= 0 and finite"),
        ("top_k", top_k, vocab, True, lambda k: k >= 1, "an integer >= 1 or None"),
        ("top_p", top_p, 1.0, False, lambda p: 0.0 < p <= 1.0, "in (0, 1] or None"),
        ("min_p", min_p, 0.0, False, lambda m: 0.0 <= m <= 1.0, "in [0, 1] or None"),
    ):
        if isinstance(value, torch.Tensor):
            out.append(_row_tensor(name, value, batch, device, integer))
            continue
        if value is None and name != "temperature":
            value = default
        ok = _is_number(value) and (not integer or isinstance(value, numbers.Integral)) and valid(value)
        if not ok:
            raise ValueError(f"sample: {name} must be {allowed}, got {value!r}")
        if integer:
            value = min(int(value), vocab)
        dtype = torch.int64 if integer else torch.float32
        out.append(torch.full((batch,), value, dtype=dtype, device=device))
    return tuple(out)


def sample(
    logits: torch.Tensor,
    *,
    temperature: float | torch.Tensor = 1.0,
    top_k: int | torch.Tensor | None = None,
    top_p: float | torch.Tensor | None = None,
    min_p: float | torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    return_logprobs: bool = False,
    check: bool | DeferredChecks = True,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row: temperature, then top-k, then top-p, then min-p.

    logits (B, V) float -> tokens (B,) int64, and with ``return_logprobs`` also (B,) float32
    log-probabilities of the drawn tokens under the filtered distribution (0 for greedy rows).

    Each parameter is a scalar or a (B,) tensor (per-row settings in one batch):

    * temperature T >= 0: p ∝ exp(x / T); T = 0 is greedy (the first index of the maximum).
    * top_k k >= 1: keep the k largest logits — never more than k: among tied logits at the
      boundary the lower index wins. None (or k >= V in a tensor) turns it off.
    * top_p P in (0, 1]: then keep the smallest prefix of the renormalized distribution, in
      that same order, whose mass reaches P. None or 1 turns it off.
    * min_p m in [0, 1]: then keep tokens with p >= m · max p. None or 0 turns it off.

    A filtered or -inf (masked) token is never drawn. The draw uses one uniform number per row
    from ``generator`` (on logits' device): deterministic for a given seed on a given device.

    Invalid input raises ValueError: NaN or +inf logits, a row with no finite logit, T < 0 or
    not finite, k < 1, P outside (0, 1], m outside [0, 1]. Scalars and shapes are checked at
    once; the values in logits and parameter tensors are checked by the kernel:
    ``check=True`` raises at once (one host sync), ``check=False`` skips the check, and
    ``check=DeferredChecks()`` accumulates it on the device for ``raise_if_any()`` later.
    """
    check_ndim("sample", logits=(logits, 2))
    check_floating("sample", logits=logits)
    if logits.shape[0] == 0 or logits.shape[1] == 0:
        raise ValueError(f"sample: expected non-empty logits (B, V), got {tuple(logits.shape)}")
    if not (isinstance(check, DeferredChecks) or isinstance(check, bool)):
        raise TypeError(f"sample: check must be True, False or a DeferredChecks, got {type(check).__name__}")
    params = _row_params(logits, temperature, top_k, top_p, min_p)
    uniform = torch.rand(logits.shape[0], device=logits.device, generator=generator, dtype=torch.float64)
    tokens, logprobs, status = run(NAME, logits.device, logits, uniform, *params)
    if isinstance(check, DeferredChecks):
        check.update(status)
    elif check:
        raise_for_status(status)
    return (tokens, logprobs) if return_logprobs else tokens
