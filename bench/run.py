"""Run the benchmark suite: ``python -m bench.run [--device cpu|cuda] [--quick] [--out DIR]``.

Discovers ``bench/bench_*.py`` modules, calls each one's ``run(device, quick)``, writes
``<out>/<module>.json|.md`` and ``<out>/summary.md``; a pytest-benchmark module (no ``run``) runs
in its own ``pytest --benchmark-only`` process and leaves ``<out>/<module>.json`` (pytest-benchmark's
JSON) and its log. A module that raises, or records a row
with ``status == "error"``, is reported as failed; the run then exits 1 after finishing all.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import logging
import os
import pkgutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

from bench import report
from bench.common import atomic_write_text, environment, markdown_table, write_results

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


def run_pytest_module(name: str, quick: bool, out: Path) -> dict:
    """``pytest bench/<name>.py --benchmark-only --benchmark-json=<out>/<name>.json`` in a child
    process (quick: ``BENCH_QUICK=1`` and ``BENCH_ALIGN_QUICK=1`` for the modules that read them)."""
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(BENCH_DIR.parent), os.environ.get("PYTHONPATH")]))}
    if quick:
        env.update(BENCH_QUICK="1", BENCH_ALIGN_QUICK="1")
    command = [sys.executable, "-m", "pytest", str(BENCH_DIR / f"{name}.py"), "-q", "-p", "no:cacheprovider",
               "--benchmark-only", f"--benchmark-json={out / (name + '.json')}"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, cwd=BENCH_DIR.parent)
    (out / f"{name}.log").write_text(result.stdout + result.stderr, encoding="utf-8")
    files = [f"{name}.json", f"{name}.log"]
    if (out / f"{name}.json").is_file():  # the tables and plot, also after a partial failure
        files += [p.name for p in report.write(out / f"{name}.json")]
    row = {"module": name, "status": "ok" if result.returncode == 0 else "failed",
           "error": None if result.returncode == 0 else f"pytest exit {result.returncode} (see {name}.log)",
           "files": ", ".join(files), "seconds": time.perf_counter() - start}
    if result.returncode:
        logger.error("%s failed:\n%s", name, (result.stdout + result.stderr)[-3000:])
    return row


def run_module(name: str, device: str, quick: bool, out: Path, env: dict) -> dict:
    """Run one module; returns its summary row (never raises for the module's own failures)."""
    if is_pytest_benchmark(name):
        return run_pytest_module(name, quick, out)
    start = time.perf_counter()
    row: dict = {"module": name}
    try:
        module = importlib.import_module(f"bench.{name}")
        records = module.run(device, quick)
    except Exception as err:  # noqa: BLE001  reported as failed; the run exits non-zero
        logger.error("%s failed:\n%s", name, traceback.format_exc())
        row.update(status="failed", error=f"{type(err).__name__}: {err}")
        row["seconds"] = time.perf_counter() - start
        return row
    paths = write_results(name, records, out, device=device, env=env)
    errors = [r for r in records if r.get("status") == "error"]
    row.update(
        status="failed" if errors else "ok",
        records=len(records),
        error=f"{len(errors)} record(s) with status=error" if errors else None,
        files=", ".join(p.name for p in paths.values()),
        seconds=time.perf_counter() - start,
    )
    return row


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
        row = run_module(name, device, args.quick, args.out, env)
        rows.append(row)
        print(f"  {name}: {row['status']} in {row['seconds']:.1f}s" + (f" ({row['error']})" if row.get("error") else ""))

    env_lines = "\n".join(f"- {k}: {v}" for k, v in env.items() if v is not None)
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    summary = f"# Benchmark summary\n\n{stamp}, {'quick' if args.quick else 'full'} run\n\n{env_lines}\n\n{markdown_table(rows)}"
    atomic_write_text(args.out / "summary.md", summary)
    print(f"wrote {args.out / 'summary.md'}")
    failed = [r["module"] for r in rows if r["status"] != "ok"]
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
