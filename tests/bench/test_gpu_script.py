"""bench/gpu.sh's plumbing, without a GPU: --dry-run prints each part's command and still writes
the report, within the device tool's limits (at most 8 files, none in sub-folders, plain names)."""

import json
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from bench import gpu_report
from bench.gpu_report import speed_records, speed_table

ROOT = Path(__file__).resolve().parents[2]


def test_the_script_parses():
    subprocess.run(["bash", "-n", str(ROOT / "bench" / "gpu.sh")], check=True)


@pytest.mark.skipif(shutil.which("timeout") is None, reason="needs coreutils timeout")
def test_dry_run_writes_the_report(tmp_path):
    out = tmp_path / "out"
    result = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh"), "--dry-run"], capture_output=True, text=True,
                            env={"OUT": str(out), "PATH": "/usr/bin:/bin:" + str(Path(shutil.which("python")).parent),
                                 "PYTHON": shutil.which("python"), "TMPDIR": str(tmp_path)},
                            timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    for part in ("pip install -v -e . --no-deps --no-build-isolation --no-index", "-m pytest -m gpu",
                 "--timeout=90", "-m bench.run --device cuda --quick", "-m fastlm build-ext"):
        assert part in result.stdout
    files = sorted(p.name for p in out.iterdir())
    assert files == ["gpu_run.json", "gpu_run.md", "logs.tar.gz"]
    assert all(p.is_file() and re.fullmatch(r"[A-Za-z0-9._-]+", p.name) for p in out.iterdir())
    report = json.loads((out / "gpu_run.json").read_text())
    assert report["dry_run"] is True
    assert [p["part"] for p in report["parts"]] == ["nvidia-smi", "install", "extension-status", "build-ext",
                                                    "tests", "bench", "report"]
    assert sum(p["budget_s"] for p in report["parts"]) <= 12 * 60
    assert {"torch", "triton", "cuda", "gpu"} <= set(report["env"])
    assert "| install |" in (out / "gpu_run.md").read_text()
    with tarfile.open(out / "logs.tar.gz") as tar:
        assert "parts.tsv" in tar.getnames() and "install.log" in tar.getnames()


def test_bad_argument_is_refused():
    result = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh"), "--fast"], capture_output=True, text=True)
    assert result.returncode == 2 and "usage" in result.stderr


def test_speed_table_from_bench_ops_records():
    rows = [
        {"op": "rms_norm", "shape": "a", "dtype": "bf16", "backend": "reference", "status": "ok", "median_ms": 2.0},
        {"op": "rms_norm", "shape": "a", "dtype": "bf16", "backend": "triton", "status": "ok", "median_ms": 0.5},
        {"op": "rms_norm", "shape": "b", "dtype": "bf16", "backend": "reference", "status": "ok", "median_ms": 4.0},
        {"op": "rms_norm", "shape": "b", "dtype": "bf16", "backend": "triton", "status": "ok", "median_ms": 1.0},
        {"op": "rms_norm", "shape": "c", "dtype": "bf16", "backend": "reference", "status": "ok", "median_ms": 9.0},
        {"op": "rms_norm", "shape": "c", "dtype": "bf16", "backend": "triton", "status": "error"},
        {"op": "rms_norm", "shape": "a", "dtype": "bf16", "backend": "F.rms_norm", "status": "ok", "median_ms": 0.1},
        {"op": "gelu", "shape": "a", "dtype": "bf16", "backend": "reference", "status": "ok", "median_ms": 1.0},
    ]
    # shape c is left out (triton failed there); torch's peer is not a backend; gelu has one backend
    assert speed_table(rows) == {"rms_norm": {"reference": 6.0, "triton": 1.5}}


def _bench(op, impl, shape, median_s, dtype="bfloat16"):
    """One pytest-benchmark record as bench_ops writes it (only the fields gpu_report reads)."""
    return {"group": f"{op} {shape} {dtype}", "name": f"test_op[{op}-{shape}-{impl}]",
            "extra_info": {"op": op, "impl": impl, "shape": shape, "dtype": dtype, "device": "cuda"},
            "stats": {"median": median_s, "rounds": 5}}


def _bench_ops_json():
    return {"machine_info": {"fastlm_env": {"gpu": "NVIDIA H200"}}, "benchmarks": [
        _bench("rms_norm", "reference", "N8 D4", 2e-3), _bench("rms_norm", "triton", "N8 D4", 0.5e-3),
        _bench("rms_norm", "F.rms_norm", "N8 D4", 0.1e-3),  # torch's peer: not a backend
        _bench("rms_norm", "reference", "N16 D4", 4e-3), _bench("rms_norm", "triton", "N16 D4", 1e-3),
        _bench("rms_norm", "reference", "N32 D4", 9e-3),  # triton skipped or failed there: no record
        _bench("sample", "reference", "B8 V32 T1", 3e-3, "float32"),
        _bench("sample", "cuda", "B8 V32 T1", 1e-3, "float32"),
        _bench("sample", "triton", "B8 V32 T1", 2e-3, "float32"),
        _bench("gelu", "reference", "N8", 1e-3),  # one backend: nothing to choose
        {"group": "other", "name": "test_x", "extra_info": {"impl": "triton"}, "stats": {"median": 1.0}},  # no op
    ]}


def test_speed_table_from_bench_ops_pytest_benchmark_json():
    records = speed_records(_bench_ops_json())
    assert {"op": "rms_norm", "shape": "N8 D4", "dtype": "bfloat16", "backend": "triton", "status": "ok",
            "median_ms": pytest.approx(0.5)} in records
    assert len(records) == 10
    table = speed_table(records)
    assert table.keys() == {"rms_norm", "sample"}
    assert table["rms_norm"] == {"reference": pytest.approx(6.0), "triton": pytest.approx(1.5)}
    assert table["sample"] == {"cuda": pytest.approx(1.0), "reference": pytest.approx(3.0),
                               "triton": pytest.approx(2.0)}
    with pytest.raises(ValueError, match="benchmarks"):
        speed_records({"machine_info": {}})


def test_report_writes_a_speed_table_that_backend_selection_loads(tmp_path, monkeypatch):
    from fastlm.ops import backend

    work, out = tmp_path / "work", tmp_path / "out"
    (work / "bench").mkdir(parents=True)
    (work / "bench" / "bench_ops.json").write_text(json.dumps(_bench_ops_json()))
    assert gpu_report.main(["--work", str(work), "--out", str(out)]) == 0
    payload = json.loads((out / "backend_speed.json").read_text())
    assert payload["device"] == "NVIDIA H200" and payload["unit"] == "ms" and payload["source"] == "bench_ops"
    monkeypatch.setattr(backend, "_speed", None)
    monkeypatch.setattr(backend, "_speed_loaded", False)
    try:
        assert backend.load_speed_table(out / "backend_speed.json") == payload["ops"]
        assert backend._measured("rms_norm") == payload["ops"]["rms_norm"]
    finally:
        backend.set_speed_table(None)
    assert "bench_ops" in json.loads((out / "gpu_run.json").read_text())["bench_modules"]
