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
lenient = [dict(base, spill_stores=8), dict(base, spill_loads=4, shared=228 * 1024)]
ck.check_rows(lenient, spills_fail=False)  # --spills-warn: spills warn, everything else still fails
print(json.dumps([[r["problems"] for r in rows], [[r["problems"], r["warnings"]] for r in lenient]]))
"""
    env = _env()
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "scripts"), env["PYTHONPATH"]])
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    problems, lenient = json.loads(proc.stdout.strip().splitlines()[-1])
    assert lenient[0][0] == [] and "spills" in lenient[0][1][0]
    assert "shared memory" in lenient[1][0][0] and "spills" in lenient[1][1][0]
    assert problems[0] == [] and problems[-1] == []
    assert all(p for p in problems[1:-1]), problems
    assert "spills" in problems[1][0] and "shared memory" in problems[2][0] and "shared memory" in problems[3][0]
    assert "registers" in problems[4][0] and problems[5] == ["compile error"] and "grid axis y" in problems[6][0]


# ---- the per-arch config tables (no compile): what the full check proves for the launched cases
# holds for every table entry, so a pruning that empties a case fails here in a second.

def test_attention_tables_keep_a_config_for_every_arch_head_dim_and_variant():
    from fastlm.ops.backend import kernel_module

    fwd, bwd = kernel_module("attention"), kernel_module("attention_bwd")
    for name, tables in [("fwd", fwd._FWD_TABLES), ("dkdv", bwd._DKDV_TABLES), ("dq", bwd._DQ_TABLES)]:
        assert set(tables) == {9, 8, 0}, (name, set(tables))
        assert set(tables[9]) == set(tables[8]) == set(tables[0]) == {64, 128, 256}, name
        for arch, table in tables.items():
            for bound in table:
                for heavy in (False, True):  # plain; window/soft-cap (PLAIN entries left out)
                    assert fwd._configs(table, bound, heavy), (name, arch, bound, heavy)


def test_attention_table_follows_the_arch_and_dtype():
    import torch

    from fastlm.ops.backend import kernel_module

    fwd = kernel_module("attention")
    tables = fwd._FWD_TABLES
    assert fwd.arch_table(tables, torch.bfloat16, 9) is tables[9]
    assert fwd.arch_table(tables, torch.float16, 8) is tables[8]
    assert fwd.arch_table(tables, torch.float32, 9) is tables[0]
    assert fwd.arch_table(tables, torch.bfloat16, 7) is tables[0]
    # The autotuned kernel is cached per arch: a process with an A100 and an H100 (or the compile
    # check faking both) gets each arch's configs, not the first one's.
    sm80, sm90 = fwd._tuned_fwd(64, torch.bfloat16, True, 8), fwd._tuned_fwd(64, torch.bfloat16, True, 9)
    label = [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in sm80.configs]
    assert label == [(128, 64, 8, 3), (64, 64, 4, 2)], label  # sm_80 D=64 window/soft-cap: the clean ones
    assert len(sm90.configs) == 4


def test_int8_prefill_tables_keep_a_config_for_every_arch_and_kind():
    from fastlm.ops.backend import kernel_module

    int8 = kernel_module("int8")
    for major in (8, 9):
        for kind in ("16bit", "fp32", "fused"):
            table = int8._prefill_table("_w8_matmul_prefill", kind, major)
            assert table, (major, kind)
            assert [c for c in table if c[0] * c[1] < 128 * 128], (major, kind)  # group-wise weights
            if kind == "fused":
                assert all(c[0] <= int8.FUSED_QUANT_MAX_ROWS for c in table), table
    assert (128, 256, 64, 8, 3) not in int8._prefill_table("_w8a8_matmul", "16bit", 8)  # spills on sm_80


def test_lora_prunes_the_sm80_spilling_tile_only_on_sm80(monkeypatch):
    import torch

    from fastlm.ops.backend import kernel_module

    lora = kernel_module("lora")
    configs = lora._CONFIGS_16BIT
    tiles = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps) for c in configs}
    assert (128, 256, 8) in tiles
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for major, expect in [(9, len(configs)), (8, len(configs) - len(lora._SM90_ONLY))]:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, major=major: (major, 0))
        assert len(lora._prune_for_arch(configs, {})) == expect, major


def test_committed_tables_are_clean_for_both_archs():
    """The committed results (which also seed CI's cache) hold 0 failing rows for sm_90 and sm_80."""
    out = ROOT / "bench" / "results" / "compile"
    for name, arch in [("kernels", 90), ("kernels_sm80", 80)]:
        data = json.loads((out / f"{name}.json").read_text())
        assert data["meta"]["archs"] == [arch] and data["meta"]["not_compiled"] == 0, (name, data["meta"])
        assert not data["launch_errors"], data["launch_errors"][:3]
        bad = [(r["kernel"], r["config"], r["problems"]) for r in data["rows"] if r["problems"]]
        assert not bad and len(data["rows"]) > 500, (name, bad[:5])
