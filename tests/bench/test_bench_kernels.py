"""bench/bench_ops.py, bench/bench_attention.py, bench/bench_sampling.py: their quick CPU run through
pytest-benchmark (groups, peers, work per call, the non-timing metrics, skips with reasons), the
backend speed table from bench_ops' JSON, and their helpers (case tables, draw checks)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import bench_attention, bench_ops, bench_sampling, report, run
from bench.gpu_report import speed_records, speed_table

REPO = Path(__file__).resolve().parents[2]
MODULES = ("bench_ops", "bench_attention", "bench_sampling")


def _pytest_benchmark(args: list[str], out: Path, cwd: Path) -> dict:
    """``pytest ARGS --benchmark-only --benchmark-json=OUT`` in a child process (quick, CPU)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "BENCH_QUICK": "1", "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *args,
                             "--benchmark-only", f"--benchmark-json={out}"],
                            env=env, capture_output=True, text=True, cwd=cwd, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return {"json": json.loads(out.read_text()), "stdout": result.stdout}


# The decode-step share (CUDA in the real run: test_decode_step's median) with a median set by hand,
# on a tiny shape made the decode shape for this one case.
SHARE_MODULE = """
import bench.bench_sampling as s
from bench.conftest import measure  # noqa: F401  the fixture


def test_share(measure, monkeypatch):
    monkeypatch.setitem(s._DECODE_MS, "median", 1.0)
    monkeypatch.setattr(s, "DECODE_SHAPE", (2, 64))
    s.test_sample(measure, (2, 64), "T1", "torch.multinomial")
"""


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> dict:
    """The three modules, quick, on CPU, and the share probe, in one pytest-benchmark process."""
    folder = tmp_path_factory.mktemp("kernels")
    (folder / "share_probe.py").write_text(SHARE_MODULE)
    modules = [str(REPO / "bench" / f"{m}.py") for m in MODULES]
    return _pytest_benchmark([*modules, str(folder / "share_probe.py")], folder / "kernels.json", REPO)


def _by_group(data: dict, prefix: str) -> dict[str, dict[str, dict]]:
    groups: dict[str, dict[str, dict]] = {}
    for bench in data["benchmarks"]:
        if bench["fullname"].startswith(f"bench/{prefix}.py"):
            groups.setdefault(bench["group"], {})[bench["extra_info"]["impl"]] = bench
    return groups


def test_modules_are_pytest_benchmark_modules():
    for name in MODULES:
        assert run.is_pytest_benchmark(name), name
        assert not hasattr(__import__(f"bench.{name}", fromlist=["x"]), "run")


def test_bench_ops_quick_run(quick_run):
    groups = _by_group(quick_run["json"], "bench_ops")
    expected = {case.group: case for case in bench_ops.cases("cpu", True)}
    assert set(groups) == set(expected) and {c.op for c in expected.values()} == {
        "attention", "decode_attention", "rms_norm", "swiglu", "cross_entropy", "sample"}
    for group, impls in groups.items():
        case = expected[group]
        # on CPU: the reference backend and torch's peer; triton (interpreter) and cuda are skipped
        assert set(impls) == {"reference", *([case.peer] if case.peer else [])}, group
        ref = impls["reference"]["extra_info"]
        assert ref["op"] == case.op and ref["shape"] == case.shape and ref["dtype"] == "float32"
        assert ref.get("peer") == case.peer and ref["peak_mb"] >= 0
        assert ref.get("flops") == case.flops and ref.get("bytes") == case.bytes
        if case.peer:
            # torch's own op agrees with the reference backend on the same inputs (float32)
            assert impls[case.peer]["extra_info"]["max_abs_diff_vs_ref"] < 1e-4, group
    assert "Triton interpreter (TRITON_INTERPRET=1): not a performance measurement" in quick_run["stdout"]
    assert "cuda unavailable" in quick_run["stdout"]
    # one fastlm backend per op on CPU: nothing to choose, so no op in the speed table
    records = speed_records(quick_run["json"])
    assert {r["op"] for r in records} == {c.op for c in expected.values()}
    assert {r["backend"] for r in records} >= {"reference", "torch.sdpa"}
    assert speed_table(records) == {}


def test_bench_attention_quick_run(quick_run):
    groups = _by_group(quick_run["json"], "bench_attention")
    shapes = bench_attention.attention_shapes("cpu", True)
    assert len(groups) == 2 * len(shapes)
    for (b, h, s, d, causal, _), pass_ in [(shape, p) for shape in shapes for p in ("fwd", "bwd")]:
        label = bench_attention.shape_label(b, h, s, d, causal)
        impls = groups[f"attention {pass_} {label} float32"]
        assert set(impls) == {"fastlm.reference", "sdpa.flash", "sdpa.math"}  # efficient/cudnn: not on CPU
        flops = bench_attention.forward_flops(b, h, s, d, causal) * (2.5 if pass_ == "bwd" else 1.0)
        for name, bench in impls.items():
            info = bench["extra_info"]
            assert info["flops"] == flops and info["pass"] == pass_ and info["shape"] == label
            assert info.get("peer") == (None if name == "sdpa.flash" else "sdpa.flash")
            if pass_ == "fwd":  # against sdpa.math on CPU
                assert info["max_abs_diff_vs_sdpa"] < 1e-5, (label, name)
            else:
                assert "max_abs_diff_vs_sdpa" not in info
    assert "unsupported by torch here: No viable backend" in quick_run["stdout"]


def test_bench_sampling_quick_run(quick_run, tmp_path):
    groups = _by_group(quick_run["json"], "bench_sampling")
    (batch, vocab), = bench_sampling.shapes("cpu", True)
    assert set(groups) == {f"sample B{batch} V{vocab} T0.8 k50 p0.9 float32"}
    impls = groups[f"sample B{batch} V{vocab} T0.8 k50 p0.9 float32"]
    assert set(impls) == {"reference", "torch.sort", "torch.multinomial"}
    for name, bench in impls.items():
        assert bench["extra_info"]["bytes"] == batch * vocab * 4
        assert bench["extra_info"].get("peer") == (None if name == "torch.sort" else "torch.sort")
        assert "share_of_decode_step" not in bench["extra_info"]  # CUDA only
    # the markdown report of the run: a table per group with the ratio to the peer
    path = tmp_path / "kernels.json"
    path.write_text(json.dumps(quick_run["json"]))
    text = report.write(path, with_plot=False)[0].read_text()
    assert f"## sample B{batch} V{vocab} T0.8 k50 p0.9 float32" in text and "(vs torch.sort)" in text
    assert "(vs sdpa.flash)" in text and "(vs F.rms_norm)" in text and "max_abs_diff_vs_sdpa" in text


def test_share_of_decode_step_is_recorded(quick_run):
    (bench,) = [b for b in quick_run["json"]["benchmarks"] if b["name"] == "test_share"]
    ms = bench["stats"]["median"] * 1e3
    assert bench["extra_info"]["impl"] == "torch.multinomial" and bench["group"] == "sample B2 V64 T1 float32"
    assert bench["extra_info"]["share_of_decode_step"] == pytest.approx(ms / (1.0 + ms))


# ---- helpers, in-process -----------------------------------------------------------------------


def test_case_tables_cover_the_old_shapes():
    gpu = bench_ops.cases("cuda", False)  # cases allocate nothing until built
    assert len({c.id for c in gpu}) == len(gpu) == 13
    attn = next(c for c in gpu if c.op == "attention" and c.shape == "B1 H32 Hkv8 T4096 D128 causal")
    assert attn.flops == 4 * 32 * 4096 * 4096 * 128 * 0.5 and attn.peer == "torch.sdpa"
    assert [c.shape for c in bench_ops.cases("cpu", True) if c.op == "sample"] == ["B8 V32000 T1"]
    full = bench_attention.attention_shapes("cuda", False)
    assert len(full) == 24 and {b * s for b, _, s, *_ in full} == {16384}
    assert {h * d for _, h, _, d, *_ in full} == {2048}
    assert [s for _, _, s, _, causal, _ in bench_attention.attention_shapes("cuda", True) if causal] == [1024, 4096]
    assert bench_sampling.shapes("cuda", True) == [bench_sampling.DECODE_SHAPE]
    assert len(bench_sampling.shapes("cuda", False)) == 12


def test_attention_impls_agree_and_sdpa_refusals_are_told_apart():
    q, k, v = torch.randn(3, 1, 2, 16, 8).unbind(0)
    ref = bench_attention.impl_fn("fastlm.reference")(q, k, v, True)
    torch.testing.assert_close(bench_attention.impl_fn("sdpa.math")(q, k, v, True), ref)
    assert bench_attention.skip_reason("fastlm.reference", 1, 2, 16, "cpu") is None
    refusal = RuntimeError("No viable backend for scaled_dot_product_attention was found.")
    assert bench_attention._unsupported("sdpa.cudnn", refusal)
    assert not bench_attention._unsupported("fastlm.triton", refusal)  # ours: a failure, not a skip
    assert not bench_attention._unsupported("sdpa.flash", RuntimeError("illegal memory access"))


def test_check_draws():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0], [5.0, 0.0, 4.0, 0.0]])
    bench_sampling.check_draws(torch.tensor([1, 0]), logits, 2)
    bench_sampling.check_draws(torch.tensor([0, 3]), logits, None)
    with pytest.raises(AssertionError, match="top 2"):
        bench_sampling.check_draws(torch.tensor([2, 0]), logits, 2)
    with pytest.raises(AssertionError, match="outside the vocabulary"):
        bench_sampling.check_draws(torch.tensor([4, 0]), logits, None)
    with pytest.raises(AssertionError, match="expected 2 tokens"):
        bench_sampling.check_draws(torch.tensor([1]), logits, None)
    big = torch.randn(64, 500) * 3
    tokens = bench_sampling.torch_sort_sample(big, 0.8, 50, 0.9, torch.Generator().manual_seed(0))
    bench_sampling.check_draws(tokens, big, 50)
