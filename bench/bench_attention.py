"""Attention: fastlm's triton kernels vs torch SDPA (each of its backends) vs the naive reference
(pytest-benchmark).

    python -m pytest bench/bench_attention.py --benchmark-only --benchmark-json=/tmp/attention.json
    python -m bench.run --device cuda --quick --only bench_attention

Shapes: q, k, v, dO (B, H, S, D) with B·S fixed and H·D fixed. CUDA: bfloat16, 16k tokens,
H·D = 2048 (H = 32 at D = 64, 16 at D = 128), S = 512, 1k, 2k, 4k, 8k, 16k, D = 64 and 128
(quick: S = 1k, 4k at D = 128); CPU: float32, 256 tokens, H·D = 256, D = 64, S = 128 and 256
(quick: S = 128). Causal and full at each (S, D).

One benchmark group per (pass, shape, dtype), one case per implementation, all in the same run:

- ``fastlm.triton``: ``fastlm.ops.attention`` with the triton backend forced (skipped on CPU,
  where only the interpreter exists, which is not a performance measurement);
- ``fastlm.reference``: the naive plain-PyTorch reference (materializes the S×S scores);
- ``sdpa.flash``, ``sdpa.efficient``, ``sdpa.cudnn``, ``sdpa.math``:
  ``F.scaled_dot_product_attention`` with one backend forced by ``torch.nn.attention.sdpa_kernel``
  (skipped, with torch's reason, where torch has no kernel for the device/shape).

Passes: ``fwd`` (no autograd) and ``bwd`` (``torch.autograd.grad`` of q, k, v from a retained
graph: the backward alone). Work per call (``flops``, the report's TFLOP/s): forward 4·B·H·S²·D,
halved when causal; backward 2.5× the forward's count. ``peer`` is ``sdpa.flash`` (the report's
``vs_peer``). ``peak_mb`` (measure fixture): memory allocated during one call above what existed
before it (fwd: the forward; bwd: the backward, above the retained graph). ``max_abs_diff_vs_sdpa``
(fwd): max |out − out_baseline| against sdpa.flash on CUDA, sdpa.math on CPU, computed untimed
before the case and asserted finite (accuracy by the 2× rule is the GPU tests' job). Naive
implementations whose S×S matrices would not fit in half the GPU are skipped, and so is a case
that runs out of memory (with the reason).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

import fastlm
from bench.conftest import DEVICE, QUICK
from fastlm import ops

SDPA_BACKENDS = {"sdpa.flash": "FLASH_ATTENTION", "sdpa.efficient": "EFFICIENT_ATTENTION",
                 "sdpa.cudnn": "CUDNN_ATTENTION", "sdpa.math": "MATH"}
IMPLS = ("fastlm.triton", "fastlm.reference", *SDPA_BACKENDS)
NAIVE = ("fastlm.reference", "sdpa.math")  # materialize the S×S scores
BASELINE = "sdpa.flash"  # the peer of every case
DIFF_BASELINE = BASELINE if DEVICE == "cuda" else "sdpa.math"  # what max_abs_diff_vs_sdpa is against
PASSES = ("fwd", "bwd")

Shape = tuple[int, int, int, int, bool, torch.dtype]  # B, H, S, D, causal, dtype


def attention_shapes(device: str, quick: bool) -> list[Shape]:
    """(B, H, S, D, causal, dtype) with B·S tokens and H·D fixed."""
    if device.startswith("cuda"):
        tokens, hidden, dtype = 16384, 2048, torch.bfloat16
        seqs = [1024, 4096] if quick else [512, 1024, 2048, 4096, 8192, 16384]
        dims = [128] if quick else [64, 128]
    else:
        tokens, hidden, dtype = 256, 256, torch.float32
        seqs = [128] if quick else [128, 256]
        dims = [64]
    return [(tokens // s, hidden // d, s, d, causal, dtype) for d in dims for s in seqs for causal in (False, True)]


def shape_label(b: int, h: int, s: int, d: int, causal: bool) -> str:
    return f"B{b} H{h} S{s} D{d}{' causal' if causal else ''}"


def forward_flops(b: int, h: int, s: int, d: int, causal: bool) -> float:
    """4·B·H·S²·D (QKᵀ and PV), halved when causal."""
    return 4 * b * h * s * s * d * (0.5 if causal else 1.0)


def impl_fn(name: str) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool], torch.Tensor] | str:
    """fn(q, k, v, causal) -> out for implementation ``name``, or why it cannot run here."""
    if name.startswith("fastlm."):
        backend = name.removeprefix("fastlm.")

        def call(q, k, v, causal):
            with fastlm.use_backend(backend):
                return ops.attention(q, k, v, causal=causal)
        return call
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:
        return f"torch {torch.__version__} has no torch.nn.attention.sdpa_kernel"
    sdpa_backend = getattr(SDPBackend, SDPA_BACKENDS[name], None)
    if sdpa_backend is None:
        return f"torch {torch.__version__} has no SDPBackend.{SDPA_BACKENDS[name]}"

    def call(q, k, v, causal):
        with sdpa_kernel(sdpa_backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return call


def skip_reason(name: str, b: int, h: int, s: int, device: str) -> str | None:
    """Why ``name`` is not timed at this shape on ``device`` (None: it is)."""
    if name == "fastlm.triton":
        ok, why = ops.backend_status("triton", device)
        if not ok:
            return f"triton unavailable: {why}"
        if device == "cpu":
            return "Triton interpreter (TRITON_INTERPRET=1): not a performance measurement"
    if name in NAIVE and device.startswith("cuda"):
        need = 6 * b * h * s * s * 4  # scores, masked copy, probs, their grads (fp32)
        budget = 0.5 * torch.cuda.get_device_properties(torch.device(device)).total_memory
        if need > budget:
            return f"materializes S×S scores: ~{need / 2**30:.0f} GiB > {budget / 2**30:.0f} GiB budget"
    return None


def _unsupported(name: str, err: RuntimeError) -> bool:
    """SDPA's refusal of a forced backend for this device/shape/dtype (not a failure of ours)."""
    text = str(err)
    return name.startswith("sdpa.") and ("No available kernel" in text or "No viable backend" in text)


def _inputs(b, h, s, d, dtype) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    return tuple(torch.randn(b, h, s, d, device=DEVICE, dtype=dtype, generator=gen) for _ in range(4))  # q k v dO


def _baseline_out(q, k, v, causal) -> torch.Tensor | None:
    """The output max_abs_diff_vs_sdpa is taken against (None where that SDPA backend cannot run)."""
    fn = impl_fn(DIFF_BASELINE)
    if isinstance(fn, str):
        return None
    try:
        with torch.no_grad():
            return fn(q, k, v, causal)
    except RuntimeError as err:
        if _unsupported(DIFF_BASELINE, err):
            return None
        raise


PARAMS = [pytest.param(shape, pass_, impl, id=f"{pass_}-{shape_label(*shape[:5]).replace(' ', '-')}-{impl}")
          for shape in attention_shapes(DEVICE, QUICK) for pass_ in PASSES for impl in IMPLS]


@pytest.mark.parametrize(("shape", "pass_", "impl"), PARAMS)
def test_attention(measure, shape: Shape, pass_: str, impl: str):
    b, h, s, d, causal, dtype = shape
    fn = impl_fn(impl)
    reason = fn if isinstance(fn, str) else skip_reason(impl, b, h, s, DEVICE)
    if reason:
        pytest.skip(reason)
    q, k, v, do = _inputs(b, h, s, d, dtype)
    label, info = shape_label(b, h, s, d, causal), {}
    try:
        if pass_ == "fwd":
            def call():
                with torch.no_grad():
                    return fn(q, k, v, causal)

            out = call()
            ref = out if impl == DIFF_BASELINE else _baseline_out(q, k, v, causal)
            if ref is not None:
                diff = (out.float() - ref.float()).abs().max().item()
                assert math.isfinite(diff), f"attention {label} {impl}: non-finite output"
                info["max_abs_diff_vs_sdpa"] = diff
            del out, ref
        else:
            qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
            out = fn(qg, kg, vg, causal)

            def call():
                return torch.autograd.grad(out, (qg, kg, vg), do, retain_graph=True)
        flops = forward_flops(b, h, s, d, causal) * (2.5 if pass_ == "bwd" else 1.0)
        measure(call, group=f"attention {pass_} {label} {str(dtype).removeprefix('torch.')}", impl=impl,
                peer=BASELINE, flops=flops, shape=label, dtype=str(dtype).removeprefix("torch."), **{"pass": pass_},
                **info)
    except torch.cuda.OutOfMemoryError as err:
        pytest.skip(f"out of memory: {str(err).splitlines()[0]}")
    except RuntimeError as err:
        if not _unsupported(impl, err):
            raise
        pytest.skip(f"unsupported by torch here: {str(err).splitlines()[0][:200]}")
    finally:
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
