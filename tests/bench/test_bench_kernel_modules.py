"""bench/bench_dispatch.py, bench_int8.py and bench_train_kernels.py on CPU: a selection of their
quick cases through pytest-benchmark (one process), the groups / impls / peers / work per call they
record, the report derived from the JSON, and bench_dispatch's own dispatch.md table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import report

REPO = Path(__file__).resolve().parents[2]
MODULES = ("bench_dispatch", "bench_int8", "bench_train_kernels")  # bench_dispatch first: it sets TRITON_INTERPRET
SELECT = "rms_norm or 1x512x512 or fused_linear_cross_entropy"


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("bench") / "kernels.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "BENCH_QUICK": "1", "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                             *(str(REPO / "bench" / f"{m}.py") for m in MODULES), "-k", SELECT,
                             "--benchmark-only", f"--benchmark-json={out}"],
                            env=env, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    data = json.loads(out.read_text())
    return {"path": out, "data": data,
            "by": {(b["group"], b["extra_info"]["impl"]): b for b in data["benchmarks"]}}


def _group(cases: dict, prefix: str) -> dict:
    found = {impl: b for (group, impl), b in cases["by"].items() if group.startswith(prefix)}
    assert found, f"no group {prefix!r} in {sorted({g for g, _ in cases['by']})}"
    return found


def test_int8_matmul_cases_and_peers(cases):
    group = _group(cases, "matmul 1x512x512 float32")
    assert set(group) == {"F.linear", "torch._int_mm", "w8a8_linear[reference]", "int8_linear[reference]"}
    assert "peer" not in group["F.linear"]["extra_info"]
    for impl, bench in group.items():
        info = bench["extra_info"]
        assert info["flops"] == 2.0 * 512 * 512 and info["device"] == "cpu"
        assert info["bytes"] == 512 * 512 * (4 if impl == "F.linear" else 1)  # the weight read (M <= 16)
        if impl != "F.linear":
            assert info["peer"] == "F.linear"
    for impl in ("w8a8_linear[reference]", "int8_linear[reference]"):
        assert group[impl]["extra_info"]["max_abs_diff"] == 0.0  # the reference backend is the reference


def test_train_kernels_cases_and_peers(cases):
    for pass_ in ("fwd", "fwd+bwd"):
        group = _group(cases, f"rms_norm {pass_} N512 D256 float32")
        assert set(group) == {"torch.eager", "F.rms_norm"}  # triton: not measured on CPU
        io, w = 512 * 256 * 4, 256 * 4
        assert group["torch.eager"]["extra_info"]["bytes"] == (2 * io + w if pass_ == "fwd" else 5 * io + 3 * w)
        assert group["F.rms_norm"]["extra_info"]["peer"] == "torch.eager"
    loss = _group(cases, "fused_linear_cross_entropy fwd+bwd N512 H128 V4096")
    assert set(loss) == {"unfused torch", "fused reference"}
    fused = loss["fused reference"]["extra_info"]
    assert fused["peer"] == "unfused torch" and fused["flops"] == 6.0 * 512 * 128 * 4096
    assert fused["max_abs_diff"] < 1e-4
    # chunked: the (N, V) fp32 logits (8 MiB) and their gradient are never held at once
    assert fused["mem_vs_unfused"] == pytest.approx(fused["peak_mb"] / loss["unfused torch"]["extra_info"]["peak_mb"])
    assert fused["mem_vs_unfused"] < 1


def test_dispatch_cases_and_its_table(cases, tmp_path):
    from bench import bench_dispatch

    for grad in ("nograd", "grad"):
        group = _group(cases, f"rms_norm-{grad}")
        assert set(group) == {"reference", "public", "kernel-path"}
        assert all(b["extra_info"]["peer"] == "reference" for i, b in group.items() if i != "reference")
    text = bench_dispatch.write_table(str(cases["path"]), str(tmp_path / "dispatch.md"), "test run")
    row = next(line for line in text.splitlines() if line.startswith("| rms_norm |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert len(cells) == 7 and all("(" in c for c in cells[2:4] + cells[5:])  # "time (added)" in every path


def test_report_renders_every_group_with_peer_ratios(cases):
    text = report.markdown(cases["data"], "kernels")
    for group in {g for g, _ in cases["by"]}:
        assert f"## {group}" in text
    assert "(vs F.linear)" in text and "(vs unfused torch)" in text and "(vs torch.eager)" in text
    assert "gbps" in text and "tflops" in text


def test_every_defined_op_has_a_dispatch_case():
    """bench_dispatch times every op the registry defines (its own check runs only with pytest on
    bench/; this keeps a new op from going unmeasured). In a subprocess: importing the module sets
    torch's thread count and seed."""
    code = ("from bench import bench_dispatch; from fastlm.ops import registry; "
            "print(sorted(set(registry.defined_ops()) - set(bench_dispatch.CASES)))")
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]", f"add a case to bench/bench_dispatch.py for: {result.stdout}"
