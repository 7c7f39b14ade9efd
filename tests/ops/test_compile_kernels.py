"""The ahead-of-time compile check (scripts/compile_kernels.py) on a small slice, in CI's test run.

- The KV append in both builds: with rotation (Llama) and without (GPT-2, ``rope_append_kv(theta
  =None)``). The interpreter never executes the untaken branch, so the non-rotating build's
  ``NameError: cos`` (every GPT-2 cached generation on a GPU) passed every interpreter test; the
  compiler builds both branches, so this test fails on that kernel.
- The checker itself: a spill, shared memory over the limit, registers × threads over 64K, a
  compile error and a grid over CUDA's limits each fail a row.

The script runs in a subprocess: it needs triton in compiled mode and this suite sets
TRITON_INTERPRET=1 (tests/conftest.py). It needs no GPU (ptxas ships with triton).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "compile_kernels.py"


def _env():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def test_kv_append_compiles_with_and_without_rotation(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--family", "kv_append", "--variant", r"^bf16 D=128 .* decode$", "--arch", "90",
         "--no-cache", "--cache", str(tmp_path / "cache.json"), "--out", str(tmp_path), "--name", "kv", "--jobs", "2"],
        env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads((tmp_path / "kv.json").read_text())["rows"]
    builds = {r["config"].split()[0] for r in rows}
    assert builds == {"ROTATE=0", "ROTATE=1"}, builds
    for row in rows:
        assert "error" not in row and row["registers"] > 0 and not row["problems"], row


def test_checker_flags_every_problem():
    code = r"""
import json, compile_kernels as ck
base = dict(arch=90, num_warps=4, registers=40, shared=1024, spill_stores=0, spill_loads=0, grids=[[1, 1, 1]])
rows = [dict(base), dict(base, spill_stores=8), dict(base, arch=80, shared=164 * 1024),
        dict(base, shared=228 * 1024), dict(base, registers=255, num_warps=16), {"arch": 90, "error": "x"},
        dict(base, grids=[[1, 65536, 1]]), dict(base, arch=80, shared=163 * 1024, grids=[[2**31 - 1, 65535, 65535]])]
ck.check_rows(rows)
print(json.dumps([r["problems"] for r in rows]))
"""
    env = _env()
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "scripts"), env["PYTHONPATH"]])
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    problems = json.loads(proc.stdout.strip().splitlines()[-1])
    assert problems[0] == [] and problems[-1] == []
    assert all(p for p in problems[1:-1]), problems
    assert "spills" in problems[1][0] and "shared memory" in problems[2][0] and "shared memory" in problems[3][0]
    assert "registers" in problems[4][0] and problems[5] == ["compile error"] and "grid axis y" in problems[6][0]
