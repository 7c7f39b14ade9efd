#!/usr/bin/env python3
"""Compile every Triton kernel of fastlm ahead of time for sm_80 and sm_90 and check what the
hardware will see: compile errors, shared memory over the per-block limit, register spills.

    python scripts/compile_kernels.py                      # check, write bench/results/compile/
    python scripts/compile_kernels.py --family int8 --arch 90 --no-write   # a slice
    python scripts/compile_kernels.py --list               # the launches, no compile

How: scripts/fake_cuda.py runs fastlm's real launchers (the ``triton`` kernels registered in
fastlm.ops, through the wrappers in fastlm/ops/ and kernels/) on FakeTensors with a faked CUDA
GPU and records each launch's signature, specialisation, constexprs and options, and for an
autotuned kernel every config its autotuner keeps; scripts/kernel_launches.py lists the calls
(dtypes, head dims, causal, GQA, varlen, paged, split counts, int8 modes, LoRA ranks, hidden
sizes). Each distinct launch is compiled with ``triton.compile(ASTSource(...),
target=GPUTarget("cuda", arch, 32))`` and the bundled ptxas; registers and spills come from
ptxas's log (``TRITON_DUMP_PTXAS_LOG``), shared memory from the kernel's metadata.

Fails (exit 1) on: a compile error, shared memory over the per-block limit (sm_90 227 KB,
sm_80 163 KB), registers × threads over the 64K register file, any spill (bytes of spill
stores or loads > 0), or a launch grid over CUDA's limits (x < 2^31, y, z <= 65535).

Results are cached by a key over triton's version, the kernel's source hash (triton's
``cache_key``: the source of the kernel and every jit function it calls), its signature,
specialisation, constexprs, options and the arch: a rerun compiles only what changed. The cache
is the committed tables themselves (bench/results/compile/kernels*.json: kernels.json for sm_90,
kernels_sm80.json for sm_80) plus ``--cache`` (default ~/.cache/fastlm/compile_kernels.json). Compiles run in parallel (``--jobs``, default: CPUs).
Works with triton 3.6 and 3.9.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import multiprocessing
import multiprocessing.connection
import os
import re
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compile, never interpret (before triton is imported)
os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"  # ptxas -v output: registers and spills
os.environ["TRITON_ALWAYS_COMPILE"] = "1"  # run ptxas even if triton's own cache has the kernel
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns when unset; 1 is its default

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

import triton  # noqa: E402

import fake_cuda  # noqa: E402

SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}  # opt-in shared memory per block (A100, H100/H200)
REGISTER_FILE = 65536  # 32-bit registers per SM (and per block) on sm_80 and sm_90
OUT_DIR = ROOT / "bench" / "results" / "compile"
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fastlm" / "compile_kernels.json"
_LAUNCHES: list = []  # the jobs, read by forked workers


def _key(launch) -> str:
    options = {k: v for k, v in sorted(launch.options.items()) if k != "extern_libs"}  # libdevice path: per machine
    payload = [triton.__version__, launch.fn.cache_key, sorted(launch.signature.items()),
               sorted((repr(k), repr(v)) for k, v in launch.constexprs.items()),
               sorted((repr(k), repr(v)) for k, v in launch.attrs.items()), repr(options), launch.arch]
    return hashlib.sha256(json.dumps(payload, default=repr).encode()).hexdigest()[:24]


def _config_label(launch) -> str:
    """The constexprs and launch options of a launch, e.g. 'BLOCK_M=128 BLOCK_N=64 CAUSAL=1 w8 s3'."""
    parts = []
    for name, value in launch.constexpr_values().items():
        if isinstance(value, bool):
            value = int(value)
        elif not isinstance(value, (int, float, str)):
            value = str(value).replace("triton.language.", "")
        parts.append(f"{name}={value}")
    parts.append(f"w{launch.options['num_warps']} s{launch.options['num_stages']}")
    return " ".join(parts)


_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGS = re.compile(r"Used (\d+) registers")


def _compile_one(index: int) -> dict:
    """Compile launch ``index`` (in a forked worker): registers, spills, shared memory or the error."""
    from triton.compiler import ASTSource

    launch = _LAUNCHES[index]
    start = time.perf_counter()
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            kernel = triton.compile(ASTSource(launch.fn, launch.signature, launch.constexprs, launch.attrs),
                                    target=fake_cuda._FakeDriver(launch.arch).target, options=launch.options)
    except Exception as error:  # a compile error is a result to report, not a crash of the check
        text = f"{type(error).__name__}: {error}"
        return {"error": "\n".join(text.strip().splitlines()[-6:])[:800], "seconds": time.perf_counter() - start}
    text = log.getvalue()
    regs, spill = _PTXAS_REGS.search(text), _PTXAS_SPILL.search(text)
    if regs is None or spill is None:
        return {"error": f"no ptxas resource log (TRITON_DUMP_PTXAS_LOG) in: {text[:300]!r}",
                "seconds": time.perf_counter() - start}
    return {"registers": int(regs.group(1)), "stack": int(spill.group(1)), "spill_stores": int(spill.group(2)),
            "spill_loads": int(spill.group(3)), "shared": int(kernel.metadata.shared),
            "seconds": round(time.perf_counter() - start, 2)}


def _child(index: int, conn, err_path: str) -> None:
    """Forked compile worker: stderr to a file (LLVM reports fatal errors there and aborts)."""
    fd = os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 2)
    conn.send(_compile_one(index))
    conn.close()


def _compile_isolated(count: int, jobs: int, tmp: Path):
    """Yield (index, result) for launches 0..count-1, each compiled in its own forked process,
    ``jobs`` at a time: a compiler crash (LLVM aborts on some inputs) is reported as that
    launch's compile error instead of taking the whole check down."""
    context = multiprocessing.get_context("fork")
    pending, running = list(range(count)), {}
    while pending or running:
        while pending and len(running) < jobs:
            index = pending.pop(0)
            receive, send = context.Pipe(duplex=False)
            err_path = str(tmp / f"stderr_{index}.txt")
            proc = context.Process(target=_child, args=(index, send, err_path), daemon=True)
            proc.start()
            send.close()
            running[index] = (proc, receive, err_path)
        multiprocessing.connection.wait([r for _, r, _ in running.values()] + [p.sentinel for p, _, _ in running.values()])
        for index, (proc, receive, err_path) in list(running.items()):
            result = None
            if receive.poll():
                try:
                    result = receive.recv()
                except EOFError:
                    result = None
            if result is None and proc.is_alive():
                continue
            proc.join()
            if result is None:
                err = Path(err_path).read_text(errors="replace").strip().splitlines()[-5:] if Path(err_path).exists() else []
                result = {"error": f"the compiler died (exit {proc.exitcode}): " + " | ".join(err)[-600:]}
            del running[index]
            yield index, result


def collect(archs, families, variants_fn, pattern: str | None = None) -> tuple[list, list]:
    """(launches, launch errors): run every variant (of ``families``, matching ``pattern``) under
    a faked GPU of each arch."""
    import kernel_launches

    launches, errors = [], []
    for arch in archs:
        fake = fake_cuda.FakeCuda(arch)
        with fake:
            for family, label, call in getattr(kernel_launches, variants_fn)():
                if (families and family not in families) or (pattern and not re.search(pattern, label)):
                    continue
                fake.variant = f"{family}: {label}"
                try:
                    call(fake.device())
                except Exception as error:  # a launcher that raises on a GPU shape is a finding
                    errors.append({"arch": arch, "variant": fake.variant, "error": f"{type(error).__name__}: {error}"})
        launches.extend(fake.launches)
    return launches, errors


def check_rows(rows: list[dict], spills_fail: bool = True) -> None:
    """Add each row's ``problems`` (empty: clean) and ``warnings`` (spills, with spills_fail=False)."""
    for row in rows:
        problems, warnings = [], []
        if "error" in row:
            problems.append("compile error")
        else:
            if row["shared"] > SMEM_LIMIT[row["arch"]]:
                problems.append(f"shared memory {row['shared'] / 1024:.0f} KB > {SMEM_LIMIT[row['arch']] // 1024} KB")
            if row["registers"] * 32 * row["num_warps"] > REGISTER_FILE:
                problems.append(f"{row['registers']} registers × {32 * row['num_warps']} threads > 64K")
            if row["spill_stores"] or row["spill_loads"]:
                spill = f"spills {row['spill_stores']}/{row['spill_loads']} B (stores/loads)"
                (problems if spills_fail else warnings).append(spill)
        for grid in row.get("grids", []):
            problems.extend(fake_cuda.grid_violations(tuple(grid)))
        row["problems"] = problems
        row["warnings"] = warnings


def _load_cache(paths) -> dict:
    cache = {}
    for path in paths:
        if path.is_file():
            try:
                data = json.loads(path.read_text())
            except json.JSONDecodeError as error:
                print(f"compile_kernels: ignoring unreadable cache {path}: {error}", file=sys.stderr)
                continue
            for row in data.get("rows", []):
                if row.get("triton") == triton.__version__ and "key" in row:
                    cache[row["key"]] = {k: row[k] for k in ("registers", "stack", "spill_stores", "spill_loads",
                                                              "shared", "error", "seconds") if k in row}
    return cache


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
        f.write(text)
    os.replace(f.name, path)


def _fmt_config(row) -> str:
    return row["config"]


def write_markdown(rows: list[dict], errors: list[dict], path: Path, title: str) -> None:
    by = defaultdict(list)
    for row in rows:
        by[(row["kernel"], row["arch"])].append(row)
    lines = [f"# {title}", "", f"triton {triton.__version__}; {len(rows)} kernel/config compiles; "
             f"limits: shared memory per block sm_80 163 KB, sm_90 227 KB; any spill fails.", "",
             "| kernel | arch | compiled | failing | spilling | over smem | errors | max regs | max smem KB |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for (kernel, arch), group in sorted(by.items()):
        ok = [r for r in group if "error" not in r]
        lines.append(
            f"| {kernel} | sm_{arch} | {len(group)} | {sum(bool(r['problems']) for r in group)} "
            f"| {sum(1 for r in ok if r['spill_stores'] or r['spill_loads'])} "
            f"| {sum(1 for r in ok if r['shared'] > SMEM_LIMIT[arch])} | {len(group) - len(ok)} "
            f"| {max((r['registers'] for r in ok), default='-')} "
            f"| {max((r['shared'] for r in ok), default=0) / 1024:.0f} |")
    bad = [r for r in rows if r["problems"]]
    lines += ["", f"## Failing ({len(bad)})", ""]
    if bad:
        lines += ["| kernel | config | arch | regs | smem KB | spill st/ld B | problems | first variant |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in sorted(bad, key=lambda r: (r["kernel"], r["arch"], r["config"])):
            regs = r.get("registers", "-")
            smem = f"{r['shared'] / 1024:.0f}" if "shared" in r else "-"
            spill = f"{r['spill_stores']}/{r['spill_loads']}" if "spill_stores" in r else "-"
            lines.append(f"| {r['kernel']} | {_fmt_config(r)} | sm_{r['arch']} | {regs} | {smem} | {spill} "
                         f"| {'; '.join(r['problems'])} | {r['variants'][0]} |")
    if errors:
        lines += ["", f"## Launchers that raised ({len(errors)})", ""]
        lines += [f"- sm_{e['arch']} {e['variant']}: {e['error'][:300]}" for e in errors]
    compile_errors = sorted({r["error"] for r in rows if "error" in r})
    if compile_errors:
        lines += ["", "## Compile errors", ""] + [f"```\n{e}\n```" for e in compile_errors[:10]]
    lines += ["", "## Every compile", "",
              "| kernel | config | arch | regs | smem KB | spill st/ld B | variants |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in sorted(rows, key=lambda r: (r["kernel"], r["arch"], r["config"])):
        if "error" in r:
            lines.append(f"| {r['kernel']} | {r['config']} | sm_{r['arch']} | error | | | {r['variants'][0]} |")
            continue
        more = f" (+{len(r['variants']) - 1})" if len(r["variants"]) > 1 else ""
        lines.append(f"| {r['kernel']} | {r['config']} | sm_{r['arch']} | {r['registers']} | {r['shared'] / 1024:.1f} "
                     f"| {r['spill_stores']}/{r['spill_loads']} | {r['variants'][0]}{more} |")
    _write_atomic(path, "\n".join(lines) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], choices=sorted(fake_cuda.GPUS))
    parser.add_argument("--family", nargs="+", help="only these families (attention, decode_attention, kv_append, "
                        "int8, lora, norms, rope, swiglu, cross_entropy, sampling, logprobs)")
    parser.add_argument("--variant", help="only variants whose label matches this regular expression")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--no-cache", action="store_true", help="compile everything again")
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    parser.add_argument("--name", default=None,
                        help="file stem of the results (default: kernels_sm80 for --arch 80 alone, else kernels)")
    parser.add_argument("--no-write", action="store_true", help="do not write the results table")
    parser.add_argument("--spills-warn", action="store_true",
                        help="report register spills as warnings, not failures (compile errors, shared memory, "
                             "registers and grids still fail): for another Triton version than the one the "
                             "configs were tuned with, e.g. the GPU machine's")
    parser.add_argument("--list", action="store_true", help="list the distinct launches and exit")
    parser.add_argument("--cached-only", action="store_true",
                        help="compile nothing: report the cached results only (a partial table; exit 1)")
    parser.add_argument("--grids", type=Path, metavar="JSON",
                        help="no compile: launch kernel_launches.grid_variants() (the largest shapes along each "
                             "grid axis), write every launch grid and its CUDA-limit violations to JSON, exit 1 on any")
    args = parser.parse_args(argv)
    if args.name is None:
        args.name = "kernels_sm80" if args.arch == [80] else "kernels"
    if args.grids:
        return check_grids(args.arch, set(args.family or ()), args.grids)

    t0 = time.perf_counter()
    launches, launch_errors = collect(args.arch, set(args.family or ()), "compile_variants", args.variant)
    jobs: dict[str, dict] = {}
    for launch in launches:
        key = _key(launch)
        job = jobs.get(key)
        if job is None:
            job = jobs[key] = {"launch": launch, "variants": [], "grids": []}
        if launch.variant not in job["variants"]:
            job["variants"].append(launch.variant)
        if launch.grid is not None and list(launch.grid) not in job["grids"]:
            job["grids"].append(list(launch.grid))
    print(f"compile_kernels: {len(launches)} launches, {len(jobs)} distinct kernel/config/arch compiles "
          f"({time.perf_counter() - t0:.1f}s to collect)", flush=True)
    if args.list:
        for key, job in jobs.items():
            print(f"{job['launch'].kernel} sm_{job['launch'].arch} {_config_label(job['launch'])} <- {job['variants'][0]}")
        for error in launch_errors:
            print(f"  launcher raised: sm_{error['arch']} {error['variant']}: {error['error'][:300]}")
        return 1 if launch_errors else 0

    # Every committed table seeds the cache (keys include the arch): a fresh clone compiles nothing
    # that a committed table already holds for this triton version.
    tables = sorted(set(args.out.glob("kernels*.json")) | {args.out / f"{args.name}.json"})
    cache = {} if args.no_cache else _load_cache([*tables, args.cache])
    todo = [key for key in jobs if key not in cache]
    print(f"compile_kernels: {len(jobs) - len(todo)} cached, compiling {len(todo)} on {args.jobs} processes",
          flush=True)
    results = {key: cache[key] for key in jobs if key in cache}
    left_out = 0
    if args.cached_only:
        left_out = len(todo)
        print(f"compile_kernels: --cached-only: {len(todo)} compiles left out of the table")
        jobs = {key: job for key, job in jobs.items() if key in results}
    elif todo:
        _LAUNCHES[:] = [jobs[key]["launch"] for key in todo]
        with tempfile.TemporaryDirectory() as tmp:
            os.environ["TRITON_CACHE_DIR"] = tmp
            t1, done, fresh = time.perf_counter(), 0, {}
            for index, result in _compile_isolated(len(todo), max(1, args.jobs), Path(tmp)):
                results[todo[index]] = fresh[todo[index]] = result
                done += 1
                if done % 25 == 0 or done == len(todo):
                    print(f"  {done}/{len(todo)} compiled ({time.perf_counter() - t1:.0f}s)", flush=True)
                    _update_cache(args.cache, fresh)  # saved as it goes: an interrupted run is not lost
                    fresh = {}

    rows = []
    for key, job in jobs.items():
        launch = job["launch"]
        rows.append({"key": key, "kernel": launch.kernel, "module": launch.fn.__module__.split(".")[-1],
                     "arch": launch.arch, "config": _config_label(launch), "num_warps": launch.options["num_warps"],
                     "num_stages": launch.options["num_stages"], "triton": triton.__version__,
                     "variants": job["variants"], "grids": job["grids"], **results[key]})
    check_rows(rows, spills_fail=not args.spills_warn)
    bad = [r for r in rows if r["problems"]]
    if not args.no_write:
        meta = {"triton": triton.__version__, "archs": args.arch, "families": args.family, "smem_limit": SMEM_LIMIT,
                "not_compiled": left_out}
        _write_atomic(args.out / f"{args.name}.json",
                      json.dumps({"meta": meta, "launch_errors": launch_errors, "rows": rows}, indent=1) + "\n")
        title = "Triton kernels compiled for sm_80 / sm_90"
        if left_out:
            title += f" (partial: {left_out} of {len(rows) + left_out} compiles not run yet)"
        write_markdown(rows, launch_errors, args.out / f"{args.name}.md", title)
    for row in sorted(bad, key=lambda r: (r["kernel"], r["arch"])):
        print(f"  FAIL {row['kernel']} sm_{row['arch']} [{row['config']}]: {'; '.join(row['problems'])} "
              f"<- {row['variants'][0]}")
    for error in launch_errors:
        print(f"  FAIL launcher sm_{error['arch']} {error['variant']}: {error['error'][:300]}")
    warned = [r for r in rows if r["warnings"]]
    for row in sorted(warned, key=lambda r: (r["kernel"], r["arch"])):
        print(f"  warning {row['kernel']} sm_{row['arch']} [{row['config']}]: {'; '.join(row['warnings'])}")
    print(f"compile_kernels: triton {triton.__version__}, {len(rows)} compiles, {len(bad)} failing, "
          f"{len(warned)} with warnings, {len(launch_errors)} launchers raised ({time.perf_counter() - t0:.0f}s)")
    return 1 if bad or launch_errors or args.cached_only else 0


def check_grids(archs, families, path: Path) -> int:
    """Launch the grid variants under a faked GPU; write {"launches": [...], "launch_errors": [...]}."""
    launches, errors = collect(archs, families, "grid_variants")
    records = [{"arch": l.arch, "variant": l.variant, "kernel": l.kernel, "grid": list(l.grid),
                "violations": fake_cuda.grid_violations(l.grid)} for l in launches]
    _write_atomic(path, json.dumps({"launches": records, "launch_errors": errors}, indent=1) + "\n")
    bad = [r for r in records if r["violations"]]
    for r in bad:
        print(f"  FAIL sm_{r['arch']} {r['variant']}: {r['kernel']} grid {r['grid']}: {'; '.join(r['violations'])}")
    for e in errors:
        print(f"  FAIL launcher sm_{e['arch']} {e['variant']}: {e['error'][:300]}")
    print(f"compile_kernels --grids: {len(records)} launches, {len(bad)} over CUDA's grid limits, "
          f"{len(errors)} launchers raised")
    return 1 if bad or errors else 0


def _update_cache(path: Path, results: dict) -> None:
    """Merge this run's results into the local cache file (rows keyed like the table)."""
    old = _load_cache([path])
    old.update(results)
    rows = [{"key": k, "triton": triton.__version__, **v} for k, v in old.items()]
    try:
        _write_atomic(path, json.dumps({"rows": rows}) + "\n")
    except OSError as error:
        print(f"compile_kernels: could not write the cache {path}: {error}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
