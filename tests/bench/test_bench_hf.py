"""bench/bench_hf.py: the module run through pytest-benchmark on its tiny size (four cases, one
group, the transformers peer, loss agreement, memory ratios, speed in turns) and its size checks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import bench_hf, report

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("bench_hf") / "bench_hf.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "BENCH_QUICK": "1", "BENCH_HF_SIZE": "tiny"}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "bench/bench_hf.py",
                             "--benchmark-only", f"--benchmark-json={out}"],
                            env=env, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(out.read_text())


def test_one_group_four_variants_against_transformers(tiny_run):
    cases = {b["extra_info"]["impl"]: b for b in tiny_run["benchmarks"]}
    assert set(cases) == set(bench_hf.VARIANTS)
    assert len({b["group"] for b in cases.values()}) == 1
    for variant, case in cases.items():
        info = case["extra_info"]
        assert info["tokens"] == 2 * 32 and info["size"] == "tiny" and info["layers"] == 1
        assert info.get("peer") == (None if variant == "transformers" else "transformers")
        assert info["loss_diff"] <= 1e-4 * 7  # the loss is ~ln(512) ≈ 6.2: every variant computes the same loss
        assert info["peak_mem_mb"] > info["peak_mb"] > 0 and info["speed_in_turns"] > 0
        assert case["stats"]["rounds"] >= 3
    base = cases["transformers"]["extra_info"]
    assert base["peak_mem_vs_transformers"] == 1.0 and base["speed_in_turns"] == 1.0


def test_report_table_shows_tokens_per_s_and_ratios(tiny_run):
    text = report.markdown(tiny_run, "bench_hf")
    assert "tokens_per_s" in text and "(vs transformers)" in text
    rows = report.rows(tiny_run)
    assert all(r["tokens_per_s"] > 0 for r in rows)
    assert {r["impl"] for r in rows if "vs_peer" in r} == set(bench_hf.VARIANTS[1:])


def test_size_from_env_validates(monkeypatch):
    monkeypatch.setenv("BENCH_HF_SIZE", "tiny")
    monkeypatch.setenv("BENCH_HF_LAYERS", "3")
    name, size = bench_hf.size_from_env()
    assert name == "tiny" and size["num_hidden_layers"] == 3 and bench_hf.SIZES["tiny"]["num_hidden_layers"] == 1
    monkeypatch.setenv("BENCH_HF_LAYERS", "0")
    with pytest.raises(ValueError, match="BENCH_HF_LAYERS"):
        bench_hf.size_from_env()
    monkeypatch.delenv("BENCH_HF_LAYERS")
    monkeypatch.setenv("BENCH_HF_SIZE", "huge")
    with pytest.raises(ValueError, match="BENCH_HF_SIZE"):
        bench_hf.size_from_env()


def test_unknown_variant_is_refused():
    with pytest.raises(ValueError, match="variant"):
        bench_hf.build_model(bench_hf.SIZES["tiny"], "apply(everything)", "cpu")
