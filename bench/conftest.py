"""The suite's one timing harness: pytest-benchmark, with the ``measure`` fixture on top.

Every ``bench/bench_*.py`` module is a pytest-benchmark module. A case calls::

    def test_rms_norm(measure, backend):
        measure(fn, group="rms_norm 4096x4096 bf16", impl=backend, peer="torch", bytes=..., flops=...)

``measure`` times ``fn()`` with ``benchmark.pedantic`` and records in ``extra_info``: ``impl``
(what ran), ``peer`` (the impl of the same group this one is compared with, if any), ``device``,
``peak_mb`` (see :func:`peak_mb`) and any other keyword (shape, dtype, ``flops``, ``bytes``,
``tokens`` per call: bench/report.py turns those into TFLOP/s, GB/s and tokens/s).

Timing: CPU — wall clock (``time.perf_counter``) of each call. CUDA — each call is followed by
``torch.cuda.synchronize()`` and, unless ``flush_l2=False``, preceded (untimed, in pedantic's
``setup``) by a write of 256 MiB that evicts the L2, as ``triton.testing.do_bench`` does; so a
round is launch-to-completion time on a cold cache. Rounds: enough to fill ``budget_s`` (at
least 3, at most ``max_rounds``), after ``warmup`` untimed calls (compiles, autotuning).

``BENCH_QUICK=1`` (``python -m bench.run --quick``) asks modules for their smallest shapes;
``BENCH_THREADS=N`` sets torch's CPU threads (1 on a shared machine: two threads fighting other
processes time the scheduler, not the code); the machine's device and versions are added to the
JSON's ``machine_info`` (``fastlm_env``, which records the thread count).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import pytest
import torch

from bench.common import environment, peak_mb

DEVICE = os.environ.get("BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")  # bench.run --device
if DEVICE not in ("cpu", "cuda"):
    raise ValueError(f"BENCH_DEVICE must be cpu or cuda, got {DEVICE!r}")
QUICK = os.environ.get("BENCH_QUICK") == "1"
if os.environ.get("BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["BENCH_THREADS"]))
_L2_FLUSH_BYTES = 256 * 2**20


def pytest_benchmark_update_machine_info(config, machine_info):
    """Device name, torch / triton / CUDA versions in every results JSON."""
    machine_info["fastlm_env"] = environment(DEVICE)


class Measure:
    """Callable behind the ``measure`` fixture (one per test)."""

    def __init__(self, benchmark):
        self.benchmark = benchmark
        self._flush = None

    def __call__(self, fn: Callable[[], object], *, group: str, impl: str, peer: str | None = None,
                 warmup: int = 1, budget_s: float | None = None, max_rounds: int = 50, min_rounds: int = 3,
                 memory: bool = True, flush_l2: bool = True, **info) -> None:
        cuda = DEVICE == "cuda"
        budget_s = (0.3 if QUICK else 1.0) if budget_s is None else budget_s
        for _ in range(warmup):
            fn()
        if cuda:
            torch.cuda.synchronize()

        def call():
            fn()
            if cuda:
                torch.cuda.synchronize()

        start = time.perf_counter()
        call()
        one = max(time.perf_counter() - start, 1e-9)
        rounds = int(min(max(budget_s / one, min_rounds), max_rounds))
        bench = self.benchmark
        bench.group = group
        bench.extra_info.update(impl=impl, device=DEVICE, **info)
        if peer is not None and peer != impl:
            bench.extra_info["peer"] = peer
        if memory:
            bench.extra_info["peak_mb"] = round(peak_mb(fn, DEVICE), 2)
        setup = self._flush_l2 if cuda and flush_l2 else None
        bench.pedantic(call, setup=setup, rounds=rounds, iterations=1, warmup_rounds=0)

    def _flush_l2(self):
        if self._flush is None:
            self._flush = torch.empty(_L2_FLUSH_BYTES, dtype=torch.int8, device="cuda")
        self._flush.zero_()
        torch.cuda.synchronize()


class OneAtATime:
    """The object of the current case group, built on first use by ``factory(*key)``; a new key
    drops the previous one first, so one model (and its peer's copy) is in memory at a time."""

    def __init__(self, factory: Callable):
        self.factory, self.key, self.value = factory, None, None

    def __call__(self, key: tuple):
        if self.value is None or key != self.key:
            self.value = None
            if DEVICE == "cuda":
                torch.cuda.empty_cache()
            self.key, self.value = key, self.factory(*key)
        return self.value


@pytest.fixture
def measure(benchmark) -> Measure:
    """``measure(fn, *, group, impl, peer=None, **info)``: see the module docstring."""
    return Measure(benchmark)
