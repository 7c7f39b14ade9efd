"""Decoding throughput: ``fastlm.generate`` vs transformers' ``generate`` on the same weights (pytest-benchmark).

    python -m bench.run --device cpu --only bench_decode      # or: pytest bench/bench_decode.py --benchmark-only

One group per (model, batch): a whole greedy ``generate`` call (prefill + ``new_tokens`` decode
steps, ``batch · new_tokens`` tokens per call, so the report shows tokens/s) timed by the suite's
``measure`` fixture, one case per implementation:

- ``fastlm``: ``fastlm.generate(model, prompt, max_new_tokens=new)`` (eager);
- ``fastlm-compiled``: the same with ``compile=True`` (the decode step through torch.compile);
- ``transformers``: ``AutoModelForCausalLM.generate`` on the same weights (saved and reloaded),
  ``min_new_tokens = max_new_tokens`` so it decodes as many tokens — the peer of every case;
- ``transformers-static`` (CUDA only): transformers with ``cache_implementation="static"``, which
  it compiles on its own.

Shapes: CPU float32 — the ``tiny`` (4M parameters) and ``small`` (27M) Llama presets, prompt 32,
64 new tokens, batch 1 and 8 (quick: tiny batch 1);
CUDA bfloat16 — ``llama-1b`` batch 1/8 (256 new) and 64 (128 new), ``llama-7b`` batch 1/8
(quick: llama-1b batch 1). Prompt 128 on CUDA. CPU runs use one intra-op thread
(``torch.set_num_threads(1)``, every implementation alike): on the shared 2-core machine two
threads per process made the same work 3–10× slower and erratic.

Timed in turns: a shared machine's speed drifts over the seconds a group takes, so the cases'
medians (timed one case after another) can disagree with what a quiet machine would show. Each
group therefore also runs every implementation once per turn, in the same order, for
``TURNS`` turns after one warm-up call each, and records ``speedup_in_turns`` = the median over
the turns of (transformers' time / this case's time in the same turn): a slowdown that hits a
whole turn cancels out of that ratio. The table's ``vs_peer`` is the ratio of the medians.

Extra info: ``compile_s`` (seconds of the first ``compile=True`` call: compilation, not timed),
``tokens_match`` (share of generated tokens equal to transformers' in the turns: greedy parity),
and on CUDA ``bandwidth_share`` = (weight bytes + mean KV-cache bytes read per step) / step
time / the device's copy bandwidth measured in the same run (a 256 MiB device-to-device copy).
"""

from __future__ import annotations

import statistics
import tempfile
import time

import pytest
import torch

import fastlm
from bench.conftest import DEVICE, QUICK, OneAtATime

if DEVICE == "cpu":  # one intra-op thread: on the shared 2-core machine two threads per process made
    torch.set_num_threads(1)  # a step 3-10x slower and erratic (spinning workers); every impl runs alike
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
if DEVICE == "cuda":  # (preset, batch, prompt_len, new_tokens)
    SHAPES = [("llama-1b", 1, 128, 256), ("llama-1b", 8, 128, 256), ("llama-1b", 64, 128, 128),
              ("llama-7b", 1, 128, 256), ("llama-7b", 8, 128, 256)]
else:
    SHAPES = [("tiny", 1, 32, 64), ("tiny", 8, 32, 64), ("small", 1, 32, 64), ("small", 8, 32, 64)]
SHAPES = SHAPES[:1] if QUICK else SHAPES
IMPLS = ("fastlm", "fastlm-compiled", "transformers", "transformers-static")
TURNS = 3 if QUICK else 7
PEER = "transformers"


def copy_bandwidth() -> float:
    """The device's copy bandwidth in bytes/s (read + write of a 256 MiB device-to-device copy), CUDA."""
    from triton.testing import do_bench

    x = torch.empty(1 << 28, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    return 2 * x.numel() / (do_bench(lambda: y.copy_(x)) / 1e3)


def bytes_per_step(config, params: int, batch: int, prompt_len: int, new: int, dtype: torch.dtype) -> float:
    """Bytes a decode step reads: every weight once + the K and V cache of the mean context
    (prompt + new/2 positions), ``2 · layers · batch · kv_heads · head_dim · positions · itemsize``."""
    itemsize = torch.finfo(dtype).bits // 8
    kv = 2 * config.num_layers * batch * config.num_kv_heads * config.head_dim * (prompt_len + new / 2) * itemsize
    return params * itemsize + kv


def in_turns(impls: dict, turns: int) -> tuple[dict[str, list[float]], dict]:
    """Each callable once per turn, in order, ``turns`` times (callers warm them up first):
    per implementation its seconds per turn and its last output."""
    seconds: dict[str, list[float]] = {name: [] for name in impls}
    outputs = {}
    for _ in range(turns):
        for name, fn in impls.items():
            start = time.perf_counter()
            outputs[name] = fn()
            if DEVICE == "cuda":
                torch.cuda.synchronize()
            seconds[name].append(time.perf_counter() - start)
    return seconds, outputs


class Group:
    """One (model, batch) situation: the fastlm model, its transformers copy, the callables, the
    compile time and the turns. Built on its first case; one group in memory at a time."""

    def __init__(self, preset: str, batch: int, prompt_len: int, new: int):
        import transformers

        torch.manual_seed(0)
        self.config = fastlm.preset(preset)
        self.model = fastlm.Model(self.config).to(device=DEVICE, dtype=DTYPE).eval()
        self.prompt = torch.randint(0, self.config.vocab_size, (batch, prompt_len), device=DEVICE)
        self.new = new
        self.info = {"model": preset, "batch": batch, "prompt": prompt_len, "new_tokens": new,
                     "dtype": str(DTYPE).removeprefix("torch."), "tokens": batch * new}
        with tempfile.TemporaryDirectory() as tmp:
            self.model.save_pretrained(tmp)
            self.hf = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=DTYPE).to(DEVICE).eval()
        hf_args = dict(attention_mask=torch.ones_like(self.prompt), max_new_tokens=new, min_new_tokens=new,
                       do_sample=False, pad_token_id=0)
        self.impls = {
            "fastlm": lambda: fastlm.generate(self.model, self.prompt, max_new_tokens=new),
            "fastlm-compiled": lambda: fastlm.generate(self.model, self.prompt, max_new_tokens=new, compile=True),
            "transformers": torch.no_grad()(lambda: self.hf.generate(self.prompt, **hf_args)),
        }
        if DEVICE == "cuda":
            self.impls["transformers-static"] = torch.no_grad()(
                lambda: self.hf.generate(self.prompt, cache_implementation="static", **hf_args))
        self.compile_s = {}
        for name, fn in self.impls.items():  # warm-up; the first call of a compiled one is its compilation
            start = time.perf_counter()
            fn()
            if DEVICE == "cuda":
                torch.cuda.synchronize()
            if name in ("fastlm-compiled", "transformers-static"):
                self.compile_s[name] = time.perf_counter() - start
        self.turns, outputs = in_turns(self.impls, TURNS)
        peer_tokens = outputs[PEER][:, prompt_len:]
        self.tokens_match = {name: (out[:, prompt_len:] == peer_tokens).float().mean().item()
                             for name, out in outputs.items()}
        for name, out in outputs.items():
            assert out.shape == (batch, prompt_len + new), f"{name} returned {tuple(out.shape)}"
        self.params = sum(p.numel() for p in self.model.parameters())

    def speedup_in_turns(self, impl: str) -> float:
        return statistics.median(p / t for p, t in zip(self.turns[PEER], self.turns[impl]))


_group = OneAtATime(Group)  # (shape) -> its Group, one in memory at a time
_BANDWIDTH: list[float] = []


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{p}-b{b}" for p, b, _, _ in SHAPES])
def test_generate(measure, shape, impl):
    if impl == "transformers-static" and DEVICE != "cuda":
        pytest.skip("transformers' static cache compiles with CUDA graphs: CUDA only")
    group = _group(shape)
    info = dict(group.info, speedup_in_turns=round(group.speedup_in_turns(impl), 4),
                tokens_match=round(group.tokens_match[impl], 4))
    if impl in group.compile_s:
        info["compile_s"] = round(group.compile_s[impl], 2)
    preset, batch, prompt_len, new = shape
    measure(group.impls[impl], group=f"generate {preset} batch {batch}", impl=impl, peer=PEER, warmup=0, **info)
    if DEVICE == "cuda" and impl.startswith("fastlm"):
        if not _BANDWIDTH:
            _BANDWIDTH.append(copy_bandwidth())
        step_s = measure.benchmark.stats.stats.median / new
        share = bytes_per_step(group.config, group.params, batch, prompt_len, new, DTYPE) / step_s / _BANDWIDTH[0]
        measure.benchmark.extra_info["bandwidth_share"] = round(share, 4)
