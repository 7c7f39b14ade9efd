"""fastlm.ops.sample: temperature, top-k, top-p and min-p sampling, fused, without a full sort.

The semantics (order of the filters, tie rule, the draw) are defined by the plain-PyTorch
reference in :mod:`fastlm.ops.sampling_reference`; the ``triton`` (fastlm.kernels.sampling)
and ``cuda`` (csrc/sampling.cu) kernels compute the same thing in a few passes over the
vocabulary: thresholds found by a 16-way search on the logits' order keys instead of a sort.

The op is ``fastlm::sample(logits, uniform, temperature, top_k, top_p, min_p, backend)`` with
every parameter a (B,) tensor, returning (tokens int64, logprobs float32, status int32). Its
kernels never synchronize with the host: invalid input is reported in the status word of
each row, which :func:`sample` turns into ``ValueError`` — at once (``check=True``, one sync
per call), or later through :class:`DeferredChecks` (a device-side flag read once at the end of
a decode loop, so that no token costs a sync).
"""

from __future__ import annotations

import math
import numbers

import torch

from fastlm.ops import sampling_reference
from fastlm.ops.backend import kernel_module, register_kernel
from fastlm.ops.checks import check_floating, check_ndim
from fastlm.ops.registry import OpSpec, define_op, run
from fastlm.ops.sampling_reference import STATUS_MESSAGES

__all__ = ["DeferredChecks", "sample"]

NAME = "sample"


def _fake(logits, uniform, temperature, top_k, top_p, min_p):
    batch = logits.shape[0]
    return (
        logits.new_empty((batch,), dtype=torch.int64),
        logits.new_empty((batch,), dtype=torch.float32),
        logits.new_empty((batch,), dtype=torch.int32),
    )


SPEC = OpSpec(
    NAME,
    "Tensor logits, Tensor uniform, Tensor temperature, Tensor top_k, Tensor top_p, Tensor min_p",
    "(Tensor, Tensor, Tensor)",  # tokens (B,) int64, logprobs (B,) float32, status (B,) int32
    _fake,
    reference_fn=sampling_reference.sample,
)
define_op(SPEC)


@register_kernel(NAME, "triton")
def _sample_triton(logits, uniform, temperature, top_k, top_p, min_p):
    """The Triton kernel (fastlm.kernels.sampling), imported on first use."""
    return kernel_module("sampling").sample(logits, uniform, temperature, top_k, top_p, min_p)


@register_kernel(NAME, "cuda")
def _sample_cuda(logits, uniform, temperature, top_k, top_p, min_p):
    """The C++/CUDA kernel (csrc/sampling.cu): float32/float16/bfloat16 logits (float64 is
    computed in float32, as by the Triton kernel), contiguous inputs of the entry point's dtypes."""
    from fastlm._extension import load_extension

    if logits.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        logits = logits.float()
    tokens, logprobs, status = load_extension().sample(
        logits.contiguous(),
        uniform.to(torch.float64).contiguous(),
        temperature.to(torch.float32).contiguous(),
        top_k.to(torch.int64).contiguous(),
        top_p.to(torch.float32).contiguous(),
        min_p.to(torch.float32).contiguous(),
    )
    return tokens, logprobs, status


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
    (``STATUS_*`` bits of :mod:`fastlm.ops.sampling_reference`), per row while the batch size
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


def _row_params(logits: torch.Tensor, temperature, top_k, top_p, min_p) -> tuple[torch.Tensor, ...]:
    """The four (B,) parameter tensors; scalars are validated here (no sync), tensors' values
    by the kernels (status bits)."""
    batch, vocab = logits.shape
    device = logits.device
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
