"""Launch grids against CUDA's limits (x < 2^31, y and z <= 65,535), for the largest shapes the
wrappers accept along each grid axis: 2,048 sequences × 32 heads, 128k-token sequences, 1M-row
GEMMs, large decode batches (scripts/kernel_launches.py ``grid_variants``).

The real launchers run in a subprocess on FakeTensors with a faked sm_80/sm_90 GPU
(scripts/fake_cuda.py): the kernels must be compiled-mode JITFunctions, so TRITON_INTERPRET
(set for this suite by tests/conftest.py) is dropped there; nothing is compiled or allocated,
each launch's grid is evaluated and recorded. One test per kernel family; a launcher that
raises on such a shape fails its family too.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]
FAMILIES = ["attention", "decode_attention", "kv_append", "int8", "lora", "norms", "rope", "swiglu", "cross_entropy",
            "sampling", "logprobs"]


@pytest.fixture(scope="module")
def grids(tmp_path_factory):
    out = tmp_path_factory.mktemp("grids") / "grids.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "compile_kernels.py"), "--grids", str(out)],
                          env=env, capture_output=True, text=True, timeout=600)
    if not out.is_file():
        pytest.fail(f"compile_kernels.py --grids wrote nothing (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def test_every_family_launches(grids):
    """The grid variants reach every kernel family (a family with no launch would pass vacuously)."""
    seen = {r["variant"].split(":")[0] for r in grids["launches"]}
    assert seen == set(FAMILIES), f"families without a recorded launch: {set(FAMILIES) - seen}"
    assert {r["arch"] for r in grids["launches"]} == {80, 90}


@pytest.mark.parametrize("family", FAMILIES)
def test_grids_within_cuda_limits(grids, family):
    bad = sorted({f"sm_{r['arch']} {r['variant']}: {r['kernel']} grid {tuple(r['grid'])}: {'; '.join(r['violations'])}"
                  for r in grids["launches"] if r["variant"].startswith(family + ":") and r["violations"]})
    raised = [f"sm_{e['arch']} {e['variant']}: {e['error'][:300]}" for e in grids["launch_errors"]
              if e["variant"].startswith(family + ":")]
    assert not bad and not raised, "\n".join(bad + raised)


def test_limits_checker_catches_a_bad_grid():
    """The checker itself (scripts/fake_cuda.py refuses to import under TRITON_INTERPRET=1, so
    its limit constant and checker are read from its source): a y or z of 65,536 and an x of
    2^31 are refused, the maxima accepted."""
    source = (ROOT / "scripts" / "fake_cuda.py").read_text()
    namespace: dict = {}
    start = source.index("GRID_LIMITS =")
    exec(source[start:source.index("\n", start)], namespace)  # noqa: S102 (our own source)
    exec(source[source.index("def grid_violations"):], namespace)  # noqa: S102
    violations = namespace["grid_violations"]
    assert namespace["GRID_LIMITS"] == (2**31 - 1, 65535, 65535)
    assert violations((2**31 - 1, 65535, 65535)) == []
    assert violations((1, 65536, 1)) and violations((2**31, 1, 1)) and violations((1, 1, 65536))
