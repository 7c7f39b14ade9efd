"""bench/bench_lora.py on CPU: the quick pytest-benchmark run (its JSON and report), and its PEFT
peer built through PEFT's public API computing what fastlm's LoRA op computes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # `bench` is a repo-root package, not an installed one
    sys.path.insert(0, str(REPO))

pytest.importorskip("peft")
pytest.importorskip("pytest_benchmark")


@pytest.fixture(scope="module")
def quick_json(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench_lora") / "bench_lora.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "BENCH_QUICK": "1", "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)  # as bench.run runs it: the triton cases skip on CPU
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                             str(REPO / "bench" / "bench_lora.py"), "--benchmark-only", f"--benchmark-json={out}"],
                            env=env, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out


def test_quick_run_compares_fastlm_with_peft(quick_json):
    from bench import report

    data = json.loads(quick_json.read_text())
    cases = {(b["group"], b["extra_info"]["impl"]): b for b in data["benchmarks"]}
    linear = {impl for group, impl in cases if group.startswith("lora_linear fwd+bwd q_proj M256 K128 N128 r8")}
    assert linear == {"reference", "peft"}  # triton skips on CPU; one projection in a quick run
    mixed = {group: {i for g, i in cases if g == group} for group, _ in cases if group.startswith("lora_linear_mixed")}
    assert len(mixed) == 2 and all(impls == {"F.linear", "reference", "peft"} for impls in mixed.values())
    for (group, impl), bench in cases.items():
        info = bench["extra_info"]
        assert bench["stats"]["median"] > 0 and bench["stats"]["rounds"] >= 3
        assert info["peak_mb"] >= 0 and (impl == "peft" or info["peer"] == "peft")
        assert ("flops" in info) == group.startswith("lora_linear fwd+bwd")
        assert info.get("tokens") == (128 if "mixed" in group else None)
    ref = cases[next(k for k in cases if k[0].startswith("lora_linear fwd+bwd") and k[1] == "reference")]
    assert ref["extra_info"]["max_abs_diff_vs_peft"] < 1e-5  # fp32, same formula and weights
    one = [b for (g, i), b in cases.items() if "adapters1 " in g and i != "F.linear"]
    assert one and all(b["extra_info"]["vs_single_adapter"] == 1 and b["extra_info"]["vs_base_linear"] > 0
                       for b in one)
    four = cases[next(k for k in cases if "adapters4 " in k[0] and k[1] == "reference")]
    single = cases[next(k for k in cases if "adapters1 " in k[0] and k[1] == "reference")]
    assert four["extra_info"]["vs_single_adapter"] == pytest.approx(
        four["stats"]["median"] / single["stats"]["median"])
    records = report.rows(data)
    assert all("vs_peer" in r for r in records if r["impl"] != "peft")
    assert "(vs peft)" in report.markdown(data, "bench_lora")


def test_peft_peer_matches_fastlm_reference():
    """The peer is a real PEFT layer: its forward and gradients are fastlm's reference LoRA's."""
    from bench import bench_lora

    forward, t = bench_lora.linear_case(40, 24, "reference")
    peer, p = bench_lora.linear_case(40, 24, "peft")
    assert type(peer).__module__.startswith("peft.")
    got = torch.autograd.grad(forward(t["x"]), [t["x"], *t["params"]], t["grad"])
    want = torch.autograd.grad(peer(p["x"]), [p["x"], *p["params"]], p["grad"])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    outs = [bench_lora.mixed_case(4, 3, 2, impl)() for impl in ("reference", "peft")]
    torch.testing.assert_close(outs[0], outs[1])
    assert not torch.allclose(outs[0], bench_lora.mixed_case(4, 3, 2, "F.linear")())  # the adapters do add
