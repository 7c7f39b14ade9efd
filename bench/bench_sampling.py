"""Sampling latency: fastlm.ops.sample on every backend vs PyTorch's sort-based top-k/top-p and vs
plain torch.multinomial, all in the same run (pytest-benchmark).

    python -m pytest bench/bench_sampling.py --benchmark-only --benchmark-json=/tmp/sampling.json
    python -m bench.run --device cuda --quick --only bench_sampling

One benchmark group per (batch, vocabulary, setting), logits (B, V) float32 (randn · 3); one case
per fastlm backend (``reference``, ``triton``, ``cuda``, each forced with ``fastlm.use_backend``)
and per PyTorch peer:

- ``torch.sort`` (the ``peer`` of every case: the report's ``vs_peer``): the usual sort-based
  filter (vLLM / transformers style): logits / T, sort the row, mask below the k-th value,
  softmax + cumsum on the sorted row to mask the top-p tail, scatter back, softmax,
  ``torch.multinomial``;
- ``torch.multinomial``: softmax(logits / T) and ``torch.multinomial`` with no filter, the floor
  a filtered sampler is compared with.

Settings: ``T0.8 k50 p0.9`` (the filters) and ``T1`` (no filter); quick: the first only. Shapes:
CUDA B = 1, 16, 64, 256 × V = 32000, 128256, 256000 (quick: 64 × 128256); CPU 1 × 32000 and
16 × 32000 (quick: 4 × 32000) — CPU shapes are a smoke run of the harness, not a performance
claim, and the Triton interpreter is never timed. Work per call: ``bytes`` = the logits read once
(the report's GB/s). Before timing, each case's draws are checked: one token per row, inside the
vocabulary and, with top-k, among the row's k largest logits.

On CUDA, ``test_decode_step`` (run first) times one decode step of the llama-1b preset
(bfloat16, batch 64, 128 cached tokens, random weights); the 64 × 128256 sampling cases then
record ``share_of_decode_step`` = their median / (decode step median + their median).
"""

from __future__ import annotations

import pytest
import torch

import fastlm
from bench.conftest import DEVICE, QUICK
from fastlm import ops
from fastlm.ops import backend

BACKENDS = ("reference", "triton", "cuda")
PEERS = ("torch.sort", "torch.multinomial")
SETTINGS = (("T0.8 k50 p0.9", dict(temperature=0.8, top_k=50, top_p=0.9)), ("T1", dict(temperature=1.0)))
DECODE_SHAPE = (64, 128256)
_DECODE_MS: dict[str, float] = {}  # "median": the decode step's median ms, once test_decode_step ran


def shapes(device: str, quick: bool) -> list[tuple[int, int]]:
    """(batch, vocabulary) pairs for ``device``."""
    if device == "cuda":
        if quick:
            return [DECODE_SHAPE]
        return [(b, v) for v in (32000, 128256, 256000) for b in (1, 16, 64, 256)]
    return [(4, 32000)] if quick else [(1, 32000), (16, 32000)]


def torch_sort_sample(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
                      generator: torch.Generator | None) -> torch.Tensor:
    """The sort-based PyTorch sampler: temperature, top-k, top-p, multinomial. logits (B, V) -> (B,)."""
    logits = logits / temperature
    sorted_logits, order = logits.sort(dim=-1, descending=False)
    if top_k is not None:
        kth = sorted_logits[:, -top_k].unsqueeze(-1)
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
    if top_p is not None:
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        tail = cumulative <= 1 - top_p
        tail[:, -1] = False  # the most likely token stays
        sorted_logits = sorted_logits.masked_fill(tail, float("-inf"))
    logits = sorted_logits.scatter(-1, order, sorted_logits)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


def torch_multinomial(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    """Plain softmax + multinomial (no filter). logits (B, V) -> (B,)."""
    return torch.multinomial((logits / temperature).softmax(dim=-1), 1, generator=generator).squeeze(-1)


def check_draws(tokens: torch.Tensor, logits: torch.Tensor, top_k: int | None) -> None:
    """One token per row of logits (B, V), inside [0, V), and with ``top_k`` among the row's k
    largest logits (ties at the k-th value count as inside). Raises AssertionError otherwise."""
    batch, vocab = logits.shape
    assert tokens.shape == (batch,), f"expected {batch} tokens, got shape {tuple(tokens.shape)}"
    assert bool(((tokens >= 0) & (tokens < vocab)).all()), "a token outside the vocabulary"
    if top_k is not None:
        kth = logits.topk(top_k, dim=-1).values[:, -1]
        drawn = logits.gather(-1, tokens.long()[:, None]).squeeze(-1)
        assert bool((drawn >= kth).all()), f"a token outside the top {top_k}"


def skip_reason(name: str, device: str) -> str | None:
    """Why fastlm backend ``name`` is not timed on ``device`` (None: it is)."""
    ok, why = ops.backend_status(name, device)
    if not ok:
        return f"{name} unavailable: {why}"
    if name == "triton" and device == "cpu":
        return "Triton interpreter (TRITON_INTERPRET=1): not a performance measurement"
    if not backend.has_kernel("sample", name):
        return f"not implemented: fastlm has no {name} kernel for sample"
    return None


def test_decode_step(measure):
    """One decode step of llama-1b (bfloat16, batch 64, 128 cached tokens), CUDA only."""
    if DEVICE != "cuda":
        pytest.skip("the decode-step share is measured on CUDA only (llama-1b in bfloat16)")
    torch.manual_seed(0)
    config = fastlm.preset("llama-1b")
    model = fastlm.Model(config).to(device=DEVICE, dtype=torch.bfloat16).eval()
    batch, prompt_len = DECODE_SHAPE[0], 128
    cache = model.new_cache(batch, prompt_len + 8)
    with torch.no_grad():
        model(torch.randint(0, config.vocab_size, (batch, prompt_len), device=DEVICE), cache=cache)
    lens = cache.lens.clone()
    ids = torch.randint(0, config.vocab_size, (batch, 1), device=DEVICE)

    def step():
        with torch.no_grad():
            model(ids, cache=cache)
        cache.truncate(lens, prompt_len)

    measure(step, group=f"decode_step llama-1b B{batch} ctx{prompt_len} bfloat16", impl="fastlm", tokens=batch,
            shape=f"llama-1b B{batch} ctx{prompt_len}", dtype="bfloat16")
    _DECODE_MS["median"] = measure.benchmark.stats.stats.median * 1e3
    del model, cache
    torch.cuda.empty_cache()


PARAMS = [pytest.param(shape, label, impl, id=f"B{shape[0]}-V{shape[1]}-{label.replace(' ', '-')}-{impl}")
          for shape in shapes(DEVICE, QUICK) for label, _ in (SETTINGS[:1] if QUICK else SETTINGS)
          for impl in (*BACKENDS, *PEERS)]


@pytest.mark.parametrize(("shape", "label", "impl"), PARAMS)
def test_sample(measure, shape: tuple[int, int], label: str, impl: str):
    batch, vocab = shape
    kwargs = dict(SETTINGS)[label]
    if impl in BACKENDS:
        reason = skip_reason(impl, DEVICE)
        if reason:
            pytest.skip(reason)
    torch.manual_seed(0)
    logits = torch.randn(batch, vocab, device=DEVICE) * 3  # (B, V)
    generator = torch.Generator(DEVICE).manual_seed(0)
    t, k, p = kwargs["temperature"], kwargs.get("top_k"), kwargs.get("top_p")
    if impl == "torch.sort":
        def call():
            return torch_sort_sample(logits, t, k, p, generator)
    elif impl == "torch.multinomial":
        def call():
            return torch_multinomial(logits, t, generator)
    else:
        def call():
            with fastlm.use_backend(impl):
                return ops.sample(logits, generator=generator, **kwargs)
    check_draws(call(), logits, None if impl == "torch.multinomial" else k)
    measure(call, group=f"sample B{batch} V{vocab} {label} float32", impl=impl, peer="torch.sort",
            bytes=logits.numel() * logits.element_size(), shape=f"B{batch} V{vocab}", setting=label, dtype="float32")
    if "median" in _DECODE_MS and shape == DECODE_SHAPE:
        ms = measure.benchmark.stats.stats.median * 1e3
        measure.benchmark.extra_info["share_of_decode_step"] = ms / (_DECODE_MS["median"] + ms)
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
