"""Smoke tests of the benchmark harness: bench.common, bench.run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # `bench` is a repo-root package, not an installed one
    sys.path.insert(0, str(REPO))

from bench import common  # noqa: E402


def test_time_fn_cpu_returns_sane_quantiles():
    x = torch.randn(256, 256)
    t = common.time_fn(lambda: x @ x, "cpu", rep=10, budget_s=0.2)
    assert 0 < t["p20_ms"] <= t["median_ms"] <= t["p80_ms"] < 1e4
    assert 3 <= t["reps"] <= 10


def test_time_fn_cpu_runs_at_least_three_reps_past_the_budget():
    calls = []
    t = common.time_fn(lambda: calls.append(1), "cpu", warmup=1, rep=50, budget_s=0.0)
    assert t["reps"] == 3 and len(calls) == 4
    assert t["median_ms"] >= 0


def test_quantile_interpolates():
    assert common._quantile([0.0, 10.0], 0.2) == pytest.approx(2.0)
    assert common._quantile([1.0, 2.0, 3.0], 0.5) == 2.0


def test_peak_memory_is_none_on_cpu():
    assert common.peak_memory_mb(lambda: None, "cpu") is None


def test_environment_cpu_has_versions_and_no_hostname():
    import platform

    env = common.environment("cpu")
    assert env["device"] == "cpu" and env["torch"] == torch.__version__ and env["gpu"] is None
    if platform.node():
        assert platform.node() not in json.dumps(env)


def test_write_results_json_and_markdown(tmp_path):
    records = [
        {"op": "rms_norm", "backend": "reference", "status": "ok", "median_ms": 1.23456, "dtype": torch.float32},
        {"op": "rms_norm", "backend": "triton", "status": "not implemented", "note": "a|b"},
    ]
    out = tmp_path / "res"
    paths = common.write_results("bench_x", records, out, device="cpu")
    assert paths["json"] == out / "bench_x.json" and paths["md"] == out / "bench_x.md"
    payload = json.loads(paths["json"].read_text())
    assert payload["name"] == "bench_x" and payload["env"]["device"] == "cpu" and payload["timestamp"]
    assert payload["records"][0]["median_ms"] == 1.23456 and payload["records"][0]["dtype"] == "torch.float32"
    md = paths["md"].read_text()
    assert "| op | dtype | backend | status | median_ms | note |" in md  # PREFERRED_COLUMNS first
    assert "| rms_norm | torch.float32 | reference | ok | 1.235 |  |" in md
    assert "a\\|b" in md
    plotted = ["bench_x.png"] if "png" in paths else []  # the plot, where matplotlib is installed
    assert sorted(p.name for p in out.iterdir()) == ["bench_x.json", "bench_x.md", *plotted]  # no temp files left


def test_run_module_reports_failure(tmp_path, monkeypatch):
    import types

    from bench import run

    source = "def run(device, quick):\n    raise ValueError('bad shape')\n"
    (tmp_path / "modules").mkdir()
    (tmp_path / "modules" / "bench_broken.py").write_text(source)
    module = types.ModuleType("bench.bench_broken")
    exec(source, module.__dict__)
    monkeypatch.setattr(run, "BENCH_DIR", tmp_path / "modules")
    monkeypatch.setitem(sys.modules, "bench.bench_broken", module)
    out = tmp_path / "out"
    row = run.run_module("bench_broken", "cpu", True, out, {"device": "cpu"})
    assert row["status"] == "failed" and "ValueError: bad shape" in row["error"]
    assert not out.exists()


def test_discover_finds_bench_modules():
    from bench import run

    assert "bench_ops" in run.discover()
    with pytest.raises(SystemExit, match="unknown benchmark"):
        run.discover(["bench_nope"])


def test_write_results_meta_and_notes(tmp_path):
    paths = common.write_results("bench_y", [{"variant": "w8a8", "perplexity": 12.3456}], tmp_path, device="cpu",
                                 meta={"model": "runs/x", "heldout_tokens": 1234}, notes="- goal met\n")
    payload = json.loads(paths["json"].read_text())
    assert payload["meta"] == {"model": "runs/x", "heldout_tokens": 1234}
    md = paths["md"].read_text()
    assert "- model: runs/x\n- heldout_tokens: 1234\n" in md and md.endswith("| w8a8 | 12.35 |\n\n- goal met\n")
    assert "meta" not in json.loads(common.write_results("bench_z", [], tmp_path)["json"].read_text())
