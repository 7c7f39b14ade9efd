"""bench/conftest.py's ``measure`` fixture and bench/report.py: a pytest-benchmark run of a small
module, its JSON (extra_info, machine info), and the markdown derived from it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import report

REPO = Path(__file__).resolve().parents[2]

MODULE = '''
import time


def _sleep(seconds):
    return lambda: time.sleep(seconds)


def test_slow(measure):
    measure(_sleep(0.004), group="nap 4x", impl="slow", peer="fast", flops=4e9, shape="4x", memory=False)


def test_fast(measure):
    measure(_sleep(0.001), group="nap 4x", impl="fast", flops=4e9, shape="4x", bytes=2e6)
'''


@pytest.fixture(scope="module")
def run_json(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("bench")
    (folder / "bench_nap.py").write_text(MODULE)
    out = folder / "bench_nap.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "BENCH_QUICK": "1"}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "bench.conftest",
                             str(folder / "bench_nap.py"), "--benchmark-only", f"--benchmark-json={out}"],
                            env=env, capture_output=True, text=True, cwd=folder, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return out


def test_measure_records_the_case_and_the_machine(run_json):
    data = json.loads(run_json.read_text())
    by_impl = {b["extra_info"]["impl"]: b for b in data["benchmarks"]}
    assert set(by_impl) == {"slow", "fast"}
    assert by_impl["slow"]["group"] == by_impl["fast"]["group"] == "nap 4x"
    assert by_impl["slow"]["extra_info"]["peer"] == "fast" and "peer" not in by_impl["fast"]["extra_info"]
    assert "peak_mb" in by_impl["fast"]["extra_info"] and "peak_mb" not in by_impl["slow"]["extra_info"]
    assert by_impl["slow"]["stats"]["rounds"] >= 3
    assert by_impl["slow"]["stats"]["median"] > by_impl["fast"]["stats"]["median"]
    assert data["machine_info"]["fastlm_env"]["device"] in ("cpu", "cuda")


def test_report_derives_rates_and_ratios_from_the_json(run_json):
    data = json.loads(run_json.read_text())
    medians = {b["extra_info"]["impl"]: b["stats"]["median"] for b in data["benchmarks"]}
    records = {r["impl"]: r for r in report.rows(data)}
    assert records["slow"]["vs_peer"] == pytest.approx(medians["fast"] / medians["slow"])
    assert "vs_peer" not in records["fast"]
    assert records["fast"]["tflops"] == pytest.approx(4e9 / medians["fast"] / 1e12)
    assert records["fast"]["gbps"] == pytest.approx(2e6 / medians["fast"] / 1e9)
    written = report.write(run_json, with_plot=False)
    text = written[0].read_text()
    assert "## nap 4x" in text and "shape=4x" in text  # the shared field is stated once
    assert "(vs fast)" in text and "tflops" in text


def test_a_module_without_cases_gives_a_readable_report(tmp_path):
    path = tmp_path / "empty.json"
    path.write_text(json.dumps({"benchmarks": [], "machine_info": {}, "datetime": "now"}))
    assert report.write(path, with_plot=False)[0].read_text().startswith("# empty")
