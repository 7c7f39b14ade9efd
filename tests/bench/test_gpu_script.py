"""bench/gpu.sh's plumbing, without a GPU: --dry-run prints each part's command and still writes
the report, within the device tool's limits (at most 8 files, none in sub-folders, plain names)."""

import json
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from bench.gpu_report import speed_table

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
