"""Smoke test of bench/bench_lora.py on CPU (quick mode, minimal repetitions)."""

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # `bench` is a repo-root package, not an installed one
    sys.path.insert(0, str(REPO))


def test_bench_lora_quick_cpu(monkeypatch):
    pytest.importorskip("peft")
    from bench import bench_lora, common

    monkeypatch.setattr(bench_lora, "time_fn", lambda fn, device: common.time_fn(fn, device, warmup=1, rep=3,
                                                                                   budget_s=0.0))
    records = bench_lora.run("cpu", quick=True)
    assert not [r for r in records if r.get("status") == "error"]
    ok = [r for r in records if r.get("status") == "ok"]
    assert {(r["op"], r["backend"]) for r in ok} == {("lora_linear", "reference"), ("lora_linear", "peft"),
                                                    ("lora_linear_mixed", "reference"),
                                                    ("lora_linear_mixed", "peft")}
    assert all(r["median_ms"] > 0 for r in ok)
    assert any("speedup_vs_peft" in r for r in ok) and any(r.get("vs_single_adapter") == 1 for r in ok)
