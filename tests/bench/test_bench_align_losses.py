"""bench/bench_align_losses.py in quick mode through bench.run (its own pytest process, as the
suite runs it): the files it leaves, one group per (loss, V) with the unfused peer and its
implementations side by side, peak memory and ``mem_vs_unfused``, the correctness check against
the unfused path, and the report rendered from the JSON."""

from __future__ import annotations

import importlib.util
import json

import pytest

from bench import report, run

MODULE = "bench_align_losses"
TRL = importlib.util.find_spec("trl") is not None


@pytest.fixture(scope="module")
def result(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("bench")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("BENCH_THREADS", "1")
        env.setenv("OMP_NUM_THREADS", "1")
        env.delenv("TRITON_INTERPRET", raising=False)
        row = run.run_pytest_module(MODULE, quick=True, out=out, device="cpu")
    log = (out / f"{MODULE}.log").read_text()
    assert row["status"] == "ok", log[-3000:]
    data = json.loads((out / f"{MODULE}.json").read_text())
    groups: dict[str, dict] = {}
    for bench in data["benchmarks"]:
        groups.setdefault(bench["group"], {})[bench["extra_info"]["impl"]] = bench["extra_info"]
    return {"out": out, "row": row, "data": data, "groups": groups}


def test_bench_run_leaves_the_json_and_its_report(result):
    names = set(result["row"]["files"].split(", "))
    assert {f"{MODULE}.json", f"{MODULE}.log", f"{MODULE}.md"} <= names
    assert all((result["out"] / name).is_file() for name in names)


def test_one_group_per_loss_with_the_unfused_peer(result):
    groups = result["groups"]
    assert set(groups) == {f"{loss} fwd+bwd N256 H64 V4096 float32" for loss in ("dpo", "grpo", "kd")}
    for group, impls in groups.items():
        loss = group.split()[0]
        want = {"unfused", "fused"} | ({"fused-logprobs"} if loss == "dpo" else set()) | ({"trl"} if TRL else set())
        assert set(impls) == want, group
        assert "peer" not in impls["unfused"]
        for impl, info in impls.items():
            assert info["loss"] == loss and info["vocab"] == 4096 and info["tokens"] == 256
            assert info["device"] == "cpu" and info["dtype"] == "float32"
            if impl != "unfused":
                assert info["peer"] == "unfused"
            if impl.startswith("fused"):
                assert info["backend"] == "reference"


def test_peak_memory_and_its_ratio_to_the_unfused_path(result):
    for group, impls in result["groups"].items():
        base = impls["unfused"]["peak_mb"]
        assert base > 0 and impls["unfused"]["mem_vs_unfused"] == 1.0
        for impl, info in impls.items():
            assert info["mem_vs_unfused"] == pytest.approx(info["peak_mb"] / base, rel=1e-3, abs=1e-4), (group, impl)
            if impl.startswith("fused"):  # chunked: the (N, V) float32 logits are never held whole
                assert info["mem_vs_unfused"] < 1, (group, impl)


def test_every_comparable_path_agrees_with_the_unfused_one(result):
    for group, impls in result["groups"].items():
        for impl, info in impls.items():
            if impl == "unfused" or (impl == "trl" and group.startswith("kd")):  # TRL's kd loss is the JSD
                assert "max_abs_diff" not in info, (group, impl)
            else:
                assert 0 <= info["max_abs_diff"] < 1e-5, (group, impl, info["max_abs_diff"])


def test_report_shows_the_group_side_by_side(result):
    text = report.markdown(result["data"], MODULE)
    assert text == (result["out"] / f"{MODULE}.md").read_text()
    for group in result["groups"]:
        assert f"## {group}" in text
    assert "(vs unfused)" in text and "mem_vs_unfused" in text and "max_abs_diff" in text
    assert "tokens_per_s" in text
