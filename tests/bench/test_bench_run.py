"""bench.run: pytest-benchmark modules (no ``run(device, quick)``) are told apart from the others
and run in their own pytest process."""

from __future__ import annotations

from bench import run


def test_pytest_benchmark_modules_are_recognised():
    names = run.discover()
    kinds = {name: run.is_pytest_benchmark(name) for name in names}
    assert kinds["bench_dispatch"] and kinds["bench_align_losses"]
    assert all(kinds.values()), kinds  # every module is a pytest-benchmark module: one harness


def test_a_failing_pytest_module_is_reported_not_raised(tmp_path, monkeypatch):
    (tmp_path / "bench_broken.py").write_text("\"\"\"A broken benchmark.\"\"\"\n\n\ndef test_fails(benchmark):\n    benchmark(lambda: None)\n    assert False\n")
    monkeypatch.setattr(run, "BENCH_DIR", tmp_path)
    assert run.is_pytest_benchmark("bench_broken")
    row = run.run_pytest_module("bench_broken", quick=True, out=tmp_path / "out")
    assert row["status"] == "failed" and "pytest exit" in row["error"]
    assert (tmp_path / "out" / "bench_broken.log").read_text()


def test_a_module_whose_cases_all_skip_is_reported_skipped(tmp_path, monkeypatch):
    (tmp_path / "bench_cpu_only.py").write_text(
        "import pytest\n\n\ndef test_skips(benchmark):\n    pytest.skip('CPU only')\n")
    monkeypatch.setattr(run, "BENCH_DIR", tmp_path)
    row = run.run_pytest_module("bench_cpu_only", quick=True, out=tmp_path / "out")
    assert row["status"] == "skipped" and row["error"] is None and row["files"] == "bench_cpu_only.log"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["bench_cpu_only.log"]
