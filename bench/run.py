"""Run the benchmark suite: ``python -m bench.run [--device cpu|cuda] [--quick] [--out DIR]``.

Discovers the ``bench/bench_*.py`` modules (pytest-benchmark modules: bench/conftest.py) and runs
each in its own ``pytest --benchmark-only`` process (``BENCH_DEVICE``, and ``BENCH_QUICK=1`` with
--quick), leaving ``<out>/<module>.json`` (pytest-benchmark's JSON), its log, and the report
bench/report.py renders from the JSON (``<module>.md``, ``.png``); then ``<out>/summary.md``.
A module whose pytest run fails is reported as failed; the run exits 1 after finishing all. A
module whose every case skipped on this device is reported as skipped.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import pkgutil
import subprocess
import sys
import time
from pathlib import Path

from bench import report
from bench.common import atomic_write_text, environment, markdown_table

logger = logging.getLogger("bench.run")

BENCH_DIR = Path(__file__).resolve().parent


def discover(only: list[str] | None = None) -> list[str]:
    """Names of the ``bench_*`` modules in bench/, sorted (``only`` filters by name)."""
    names = sorted(m.name for m in pkgutil.iter_modules([str(BENCH_DIR)]) if m.name.startswith("bench_"))
    if only:
        unknown = set(only) - set(names)
        if unknown:
            raise SystemExit(f"unknown benchmark(s): {', '.join(sorted(unknown))}; have {', '.join(names)}")
        names = [n for n in names if n in only]
    return names


def is_pytest_benchmark(name: str) -> bool:
    """Whether bench/<name>.py is a pytest-benchmark module (no ``run(device, quick)``): it runs
    in its own pytest process (such a module may re-register kernels or set TRITON_INTERPRET)."""
    text = (BENCH_DIR / f"{name}.py").read_text(encoding="utf-8")
    return "\ndef run(" not in text and "\ndef test_" in text


def run_pytest_module(name: str, quick: bool, out: Path, device: str | None = None) -> dict:
    """``pytest bench/<name>.py --benchmark-only --benchmark-json=<out>/<name>.json`` in a child
    process (quick: ``BENCH_QUICK=1``)."""
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(BENCH_DIR.parent), os.environ.get("PYTHONPATH")]))}
    if quick:
        env["BENCH_QUICK"] = "1"
    if device is not None:
        env["BENCH_DEVICE"] = device
    command = [sys.executable, "-m", "pytest", str(BENCH_DIR / f"{name}.py"), "-q", "-p", "no:cacheprovider",
               "--benchmark-only", f"--benchmark-json={out / (name + '.json')}"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, cwd=BENCH_DIR.parent)
    (out / f"{name}.log").write_text(result.stdout + result.stderr, encoding="utf-8")
    files = [f"{name}.log"]
    json_path = out / f"{name}.json"
    timed = json_path.is_file() and json_path.stat().st_size > 0
    if timed:  # the tables and plot, also after a partial failure
        files += [json_path.name, *(p.name for p in report.write(json_path))]
    elif json_path.is_file():  # every case skipped (e.g. a CPU-only module on CUDA): an empty file
        json_path.unlink()
    status = "failed" if result.returncode else "ok" if timed else "skipped"
    row = {"module": name, "status": status,
           "error": None if result.returncode == 0 else f"pytest exit {result.returncode} (see {name}.log)",
           "files": ", ".join(files), "seconds": time.perf_counter() - start}
    if result.returncode:
        logger.error("%s failed:\n%s", name, (result.stdout + result.stderr)[-3000:])
    return row


def run_module(name: str, device: str, quick: bool, out: Path) -> dict:
    """Run one module; returns its summary row (never raises for the module's own failures)."""
    if not is_pytest_benchmark(name):
        return {"module": name, "status": "failed", "seconds": 0.0,
                "error": "not a pytest-benchmark module (test_* cases using the measure fixture)"}
    return run_pytest_module(name, quick, out, device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="default: cuda if available, else cpu")
    parser.add_argument("--quick", action="store_true", help="one small shape per case")
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="results folder")
    parser.add_argument("--only", nargs="+", metavar="MODULE", help="run only these bench_* modules")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    env = environment(device)
    names = discover(args.only)
    print(f"benchmarks on {device} ({env.get('gpu') or env['cpu']}): {', '.join(names)}")
    rows = []
    for name in names:
        row = run_module(name, device, args.quick, args.out)
        rows.append(row)
        print(f"  {name}: {row['status']} in {row['seconds']:.1f}s" + (f" ({row['error']})" if row.get("error") else ""))

    env_lines = "\n".join(f"- {k}: {v}" for k, v in env.items() if v is not None)
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    summary = f"# Benchmark summary\n\n{stamp}, {'quick' if args.quick else 'full'} run\n\n{env_lines}\n\n{markdown_table(rows)}"
    atomic_write_text(args.out / "summary.md", summary)
    print(f"wrote {args.out / 'summary.md'}")
    failed = [r["module"] for r in rows if r["status"] == "failed"]
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
