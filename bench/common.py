"""Shared benchmark helpers: environment record, timing, peak memory, result files.

Timing returns milliseconds: on CUDA ``triton.testing.do_bench`` (warm-up, many reps, L2
flushed between reps), on CPU repeated wall-clock calls after a warm-up. Results go to
``<out_dir>/<name>.json`` and ``<name>.md`` (written atomically), plus ``<name>.png`` when
matplotlib is importable.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from fastlm._files import atomic_write, atomic_write_text

logger = logging.getLogger(__name__)

QUANTILES = (0.5, 0.2, 0.8)  # median, p20, p80
# Table columns that come first, in this order; any others follow in first-seen order.
PREFERRED_COLUMNS = (
    "module", "op", "shape", "dtype", "backend", "status", "median_ms", "p20_ms", "p80_ms",
    "tflops", "gbps", "speedup_vs_ref", "speedup_vs_torch", "max_abs_diff_vs_ref", "peak_mem_mb",
)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: str) -> dict:
    """Device and versions for a results file (no hostname)."""
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    record = {
        "device": device,
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "cpu": _cpu_model(),
        "cpu_threads": torch.get_num_threads(),
        "gpu": None,
    }
    if device.startswith("cuda"):
        index = torch.device(device).index or 0
        props = torch.cuda.get_device_properties(index)
        record.update(
            gpu=torch.cuda.get_device_name(index),
            gpu_capability=f"{props.major}.{props.minor}",
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
        )
    return record


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile of already-sorted values."""
    pos = q * (len(sorted_values) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def time_fn(
    fn: Callable[[], object],
    device: str,
    *,
    warmup: int = 2,
    rep: int = 30,
    budget_s: float = 0.5,
) -> dict:
    """Time ``fn()``: ``{"median_ms", "p20_ms", "p80_ms", "reps"}``.

    CUDA: ``triton.testing.do_bench`` (``warmup``/``rep`` there are its defaults in ms).
    CPU: ``warmup`` untimed calls, then up to ``rep`` timed calls (at least 3) within ``budget_s``.
    """
    if device.startswith("cuda"):
        from triton.testing import do_bench

        median, p20, p80 = do_bench(fn, quantiles=list(QUANTILES))
        return {"median_ms": median, "p20_ms": p20, "p80_ms": p80, "reps": None}
    for _ in range(warmup):
        fn()
    times: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(times) < rep and (len(times) < 3 or time.perf_counter() < deadline):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    return {
        "median_ms": statistics.median(times),
        "p20_ms": _quantile(times, 0.2),
        "p80_ms": _quantile(times, 0.8),
        "reps": len(times),
    }


def timed_call(fn: Callable[[], object], device: str) -> float:
    """Wall seconds of one ``fn()``, synchronizing CUDA before and after."""
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def wall_seconds(fn: Callable[[], object], device: str, reps: int = 3) -> float:
    """Median wall seconds of ``fn()`` after one warm-up call (kernel compilation, autotuning),
    synchronizing CUDA around each call: for whole loops such as a generate call."""
    fn()
    times = [timed_call(fn, device) for _ in range(reps)]
    return sorted(times)[len(times) // 2]


def peak_memory_mb(fn: Callable[[], object], device: str) -> float | None:
    """Peak allocated CUDA memory (MiB, inputs included) over one call; None on CPU."""
    if not device.startswith("cuda"):
        return None
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**20


def _fmt(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        return f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(records: Sequence[dict]) -> str:
    """A markdown table over the union of the records' keys (``PREFERRED_COLUMNS`` first)."""
    if not records:
        return "_no records_\n"
    seen: list[str] = []
    for record in records:
        seen.extend(k for k in record if k not in seen)
    columns = [c for c in PREFERRED_COLUMNS if c in seen] + [c for c in seen if c not in PREFERRED_COLUMNS]
    lines = [
        "| " + " | ".join(columns) + " |",
        "|" + "|".join("---" for _ in columns) + "|",
    ]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |" for r in records]
    return "\n".join(lines) + "\n"


def write_results(
    name: str,
    records: Sequence[dict],
    out_dir: str | os.PathLike,
    *,
    device: str = "cpu",
    env: dict | None = None,
    meta: dict | None = None,
    notes: str | None = None,
) -> dict[str, Path]:
    """Write ``<out_dir>/<name>.json`` (env, timestamp, records, and ``meta`` when given: what
    was measured, e.g. model and data) and ``<name>.md`` (``meta`` as a list, the table, then
    ``notes``), plus ``<name>.png`` if matplotlib is importable. Returns the paths written, by kind."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    env = environment(device) if env is None else env
    timestamp = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    payload = {"name": name, "timestamp": timestamp, "env": env, "records": list(records)}
    if meta is not None:
        payload["meta"] = meta
    paths = {"json": out / f"{name}.json", "md": out / f"{name}.md"}
    atomic_write_text(paths["json"], json.dumps(payload, indent=2, default=str) + "\n")
    env_line = ", ".join(f"{k}={v}" for k, v in env.items() if v is not None)
    md = f"# {name}\n\n{timestamp} — {env_line}\n\n"
    if meta:
        md += "".join(f"- {k}: {_fmt(v)}\n" for k, v in meta.items()) + "\n"
    md += markdown_table(records)
    if notes:
        md += "\n" + notes.rstrip() + "\n"
    atomic_write_text(paths["md"], md)
    png = _plot(name, records, out / f"{name}.png")
    if png is not None:
        paths["png"] = png
    return paths


def _plot(name: str, records: Sequence[dict], path: Path) -> Path | None:
    """Horizontal bar chart of median_ms per record; skipped without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.info("matplotlib not importable: no plot for %s", name)
        return None
    timed = [r for r in records if isinstance(r.get("median_ms"), (int, float))]
    if not timed:
        return None
    labels = [
        " ".join(str(r[k]) for k in ("op", "shape", "dtype", "backend") if r.get(k) is not None)
        for r in timed
    ]
    fig, ax = plt.subplots(figsize=(10, 0.3 * len(timed) + 1.5))
    ax.barh(range(len(timed)), [r["median_ms"] for r in timed])
    ax.set_yticks(range(len(timed)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("median time (ms, log scale)")
    ax.set_title(name)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)
    return path
