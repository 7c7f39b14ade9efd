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


def test_a_module_without_benchmark_cases_is_reported_failed(tmp_path, monkeypatch):
    from bench import run

    (tmp_path / "bench_old.py").write_text("def run(device, quick):\n    return []\n")  # the old harness's form
    monkeypatch.setattr(run, "BENCH_DIR", tmp_path)
    row = run.run_module("bench_old", "cpu", True, tmp_path / "out")
    assert row["status"] == "failed" and "not a pytest-benchmark module" in row["error"]
    assert not (tmp_path / "out").exists()


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


def _check_matmul_floor(device, big_size):
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 32, device=device)  # addmm forward; backward: mm for the input and the weight
    x = torch.randn(16, 64, requires_grad=True, device=device)
    batched = torch.randn(3, 8, 8, device=device)

    def step():
        layer(x).relu().sum().backward()
        torch.bmm(batched, batched)
        torch.randn(256, 256, device=device).exp()  # not a matmul: not replayed

    ms, calls = common.matmul_floor_ms(step)
    assert calls == 4 and 0 < ms < 1e3
    # each recorded call's fastest of N runs, summed: above zero, below three big matmuls
    big = torch.randn(big_size, big_size, device=device)
    ms_big, big_calls = common.matmul_floor_ms(lambda: big @ big @ big @ big)
    assert big_calls == 3 and ms_big > ms


def test_matmul_floor_records_forward_and_backward_matmuls_and_times_only_them():
    _check_matmul_floor("cpu", 512)


@pytest.mark.gpu
def test_matmul_floor_on_cuda_times_kernels_with_events():
    _check_matmul_floor("cuda", 4096)  # three 4096³ fp32 matmuls: milliseconds on any GPU
