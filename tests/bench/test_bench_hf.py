"""bench_hf's harness on a tiny size: four rows with ratios, and the CPU peak-memory measure."""

import torch

from bench import bench_hf


def test_cpu_step_peak_bytes_sees_a_temporary():
    def fn():
        a = torch.ones(1 << 20)  # 4 MiB, freed before the next one
        del a
        b = torch.ones(1 << 19)
        return b.sum()

    peak = bench_hf.cpu_step_peak_bytes(fn)
    assert 4 * 2**20 <= peak < 7 * 2**20


def test_measure_tiny_rows():
    rows = bench_hf.measure("tiny", "cpu", rep=1)
    assert [r["variant"] for r in rows] == list(bench_hf.VARIANTS)
    assert all(r["status"] == "ok" and r["tokens_per_s"] > 0 and r["peak_mem_mb"] > 0 for r in rows)
    assert rows[0]["speed_vs_transformers"] == 1.0 and rows[0]["peak_mem_vs_transformers"] == 1.0
