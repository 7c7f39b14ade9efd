"""The report of one ``bench/gpu.sh`` run: ``python -m bench.gpu_report --work DIR --out OUT``.

Reads what gpu.sh left in its work folder (parts.tsv: part, seconds, exit status, budget; each
part's log; pytest-gpu.xml; bench/<module>.json) and writes at most 5 files into OUT, none in
sub-folders (the device tool brings back 8 files at most, 2 folders deep):

- ``gpu_run.json`` / ``gpu_run.md``: GPU name, driver, torch / triton / CUDA versions, each
  part's seconds, exit status and budget, test counts, benchmark modules run;
- ``backend_speed.json``: per op and backend, the summed median ms over the shapes every
  backend of that op ran (from bench_ops' pytest-benchmark JSON: ``extra_info`` ``op``, ``impl``,
  ``shape``, ``dtype`` and ``stats.median``) — the table ``FASTLM_SPEED_TABLE`` points automatic
  backend selection at (:func:`fastlm.ops.backend.load_speed_table`: ``{"ops": {op: {backend: ms}}}``);
- ``logs.tar.gz`` (every part's log, the junit xml) and ``bench_results.tar.gz`` (bench.run's files).
"""

from __future__ import annotations

import argparse
import json
import re
import tarfile
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

from bench.common import environment


def read_parts(work: Path) -> list[dict]:
    parts = []
    path = work / "parts.tsv"
    for line in path.read_text().splitlines() if path.is_file() else []:
        name, seconds, rc, budget = line.split("\t")
        parts.append({"part": name, "seconds": float(seconds), "exit_status": int(rc), "budget_s": int(budget)})
    return parts


def driver_version(work: Path) -> str | None:
    log = work / "nvidia-smi.log"
    match = re.search(r"Driver Version:\s*([\d.]+)", log.read_text()) if log.is_file() else None
    return match.group(1) if match else None


def test_counts(work: Path) -> dict | None:
    path = work / "pytest-gpu.xml"
    if not path.is_file():
        return None
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    keys = ("tests", "failures", "errors", "skipped")
    counts = {k: int(suite.get(k, 0)) for k in keys}
    failed = [f"{case.get('classname')}::{case.get('name')}" for case in suite.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]
    return {**counts, "failed": failed}


FASTLM_BACKENDS = ("reference", "triton", "cuda")


def speed_records(data: dict) -> list[dict]:
    """bench_ops results as flat records (op, shape, dtype, backend, status, median_ms).

    pytest-benchmark JSON (``{"benchmarks": [...]}``): one record per benchmark that ran, from its
    ``extra_info`` (``op``, ``impl`` = the backend or torch's peer, ``shape``, ``dtype``) and its
    median (seconds → ms); a skipped or failed case has no benchmark and so no record. The
    suite's former JSON (``{"records": [...]}``, rows with ``backend``/``status``/``median_ms``)
    is read as it is."""
    if isinstance(data.get("benchmarks"), list):
        out = []
        for bench in data["benchmarks"]:
            info, stats = bench.get("extra_info") or {}, bench.get("stats") or {}
            if "op" not in info or "impl" not in info or stats.get("median") is None:
                continue
            out.append({"op": info["op"], "shape": info.get("shape"), "dtype": info.get("dtype"),
                        "backend": info["impl"], "status": "ok", "median_ms": stats["median"] * 1e3})
        return out
    if isinstance(data.get("records"), list):
        return data["records"]
    raise ValueError("bench_ops JSON: expected pytest-benchmark's 'benchmarks' list (or a 'records' list)")


def speed_table(records: list[dict]) -> dict[str, dict[str, float]]:
    """op -> backend -> Σ median_ms over the shapes (and dtypes) that every backend of the op ran
    ok; an op measured on fewer than two fastlm backends is left out (nothing to choose)."""
    runs: dict[str, dict[tuple, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
    for r in records:
        if r.get("status") == "ok" and r.get("backend") in FASTLM_BACKENDS and r.get("median_ms"):
            runs[r["op"]][(r.get("shape"), r.get("dtype"))][r["backend"]] = float(r["median_ms"])
    table = {}
    for op, shapes in runs.items():
        backends = set.union(*(set(b) for b in shapes.values()))
        common = [times for times in shapes.values() if set(times) == backends]
        if len(backends) >= 2 and common:
            table[op] = {b: round(sum(times[b] for times in common), 6) for b in sorted(backends)}
    return table


def markdown(report: dict) -> str:
    env = report["env"]
    lines = [f"# bench/gpu.sh run{' (dry run)' if report['dry_run'] else ''}", "",
             f"- GPU: {env.get('gpu')} (capability {env.get('gpu_capability')}), driver {report['driver']}",
             f"- torch {env.get('torch')}, triton {env.get('triton')}, CUDA {env.get('cuda')}, "
             f"python {env.get('python')}",
             f"- total: {report['total_seconds']:.1f} s", "",
             "| part | seconds | exit status | budget (s) |", "| --- | ---: | ---: | ---: |"]
    lines += [f"| {p['part']} | {p['seconds']:.1f} | {p['exit_status']} | {p['budget_s']} |" for p in report["parts"]]
    tests = report["tests"]
    if tests is not None:
        lines += ["", f"tests: {tests['tests']} run, {tests['failures']} failed, {tests['errors']} errors, "
                      f"{tests['skipped']} skipped"]
        lines += [f"- failed: `{name}`" for name in tests["failed"]]
    if report["bench_modules"]:
        lines += ["", "benchmarks: " + ", ".join(report["bench_modules"])]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_report", description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="gpu.sh's work folder")
    parser.add_argument("--out", type=Path, required=True, help="results folder (at most 5 files are written)")
    parser.add_argument("--dry-run", type=int, default=0, help="1 when gpu.sh ran with --dry-run")
    args = parser.parse_args(argv)
    if not args.work.is_dir():
        parser.error(f"--work {args.work} is not a folder")
    import torch

    args.out.mkdir(parents=True, exist_ok=True)
    parts = read_parts(args.work)
    bench_dir = args.work / "bench"
    bench_files = sorted(bench_dir.glob("*")) if bench_dir.is_dir() else []
    report = {
        "dry_run": bool(args.dry_run),
        "env": environment("cuda" if torch.cuda.is_available() else "cpu"),
        "driver": driver_version(args.work),
        "parts": parts,
        "total_seconds": sum(p["seconds"] for p in parts),
        "tests": test_counts(args.work),
        "bench_modules": sorted(p.stem for p in bench_files if p.suffix == ".json"),
    }
    (args.out / "gpu_run.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "gpu_run.md").write_text(markdown(report))
    ops_json = bench_dir / "bench_ops.json"
    if ops_json.is_file():
        data = json.loads(ops_json.read_text())
        measured_on = (data.get("machine_info") or {}).get("fastlm_env") or report["env"]
        payload = {"device": measured_on.get("gpu"), "unit": "ms", "source": "bench_ops",
                   "ops": speed_table(speed_records(data))}
        (args.out / "backend_speed.json").write_text(json.dumps(payload, indent=2) + "\n")
    with tarfile.open(args.out / "logs.tar.gz", "w:gz") as tar:
        for path in sorted(args.work.glob("*.log")) + sorted(args.work.glob("*.xml")) + [args.work / "parts.tsv"]:
            if path.is_file():
                tar.add(path, arcname=path.name)
    if bench_files:
        with tarfile.open(args.out / "bench_results.tar.gz", "w:gz") as tar:
            for path in bench_files:
                tar.add(path, arcname=path.name)
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
