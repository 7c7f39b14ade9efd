"""Shared benchmark helpers: the environment record and result files for reports that are not
timings (accuracy tables, demos).

Timing lives in one place: pytest-benchmark with bench/conftest.py's ``measure`` fixture;
bench/report.py renders its JSON. ``write_results`` writes ``<out_dir>/<name>.json`` and
``<name>.md`` (atomically), plus ``<name>.png`` when matplotlib is importable.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import os
import platform
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

from fastlm._files import atomic_write, atomic_write_text

logger = logging.getLogger(__name__)

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
    timed = [r for r in records if isinstance(r.get("median_ms"), (int, float))]
    labels = [" ".join(str(r[k]) for k in ("op", "shape", "dtype", "backend") if r.get(k) is not None)
              for r in timed]
    return bar_plot(name, labels, [r["median_ms"] for r in timed], path)


def bar_plot(title: str, labels: Sequence[str], median_ms: Sequence[float], path: Path) -> Path | None:
    """One horizontal bar per label: median ms on a log scale, written atomically to ``path``;
    None without matplotlib or without values."""
    if not median_ms:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.info("matplotlib not importable: no plot for %s", title)
        return None
    fig, ax = plt.subplots(figsize=(10, 0.3 * len(median_ms) + 1.5))
    ax.barh(range(len(median_ms)), list(median_ms))
    ax.set_yticks(range(len(median_ms)), list(labels), fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("median time (ms, log scale)")
    ax.set_title(title)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)
    return path


def peak_mb(fn: Callable[[], object], device: str = "cpu") -> float:
    """Peak memory allocated during one ``fn()`` above what was allocated before it (MiB), for
    tensors on ``device`` ("cpu" or "cuda").

    CUDA: ``torch.cuda.max_memory_allocated`` after a reset, minus the allocation before the call.
    CPU: the peak of the running sum of every allocation and free that ``torch.profiler``
    (``profile_memory=True``) records during the call, in time order."""
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    changes = []

    def walk(nodes):
        for node in nodes:
            if type(node.extra_fields).__name__.endswith("Allocation"):
                changes.append((node.start_time_ns, node.extra_fields.alloc_size))
            walk(node.children)

    walk(prof.profiler.kineto_results.experimental_event_tree())
    live = peak = 0
    for _, delta in sorted(changes):
        live += delta
        peak = max(peak, live)
    return peak / 2**20


def matmul_floor_ms(fn: Callable[[], object], repeats: int = 5) -> tuple[float, int]:
    """The time of only the matrix multiplications one ``fn()`` makes: (ms, number of calls).

    Records every ``aten.mm`` / ``addmm`` / ``bmm`` / ``baddbmm`` call of one ``fn()`` (the
    linears of a forward and of its backward; not the GEMMs inside fused kernels such as SDPA)
    with its operands' shapes, strides and dtypes, then times each call alone on random operands
    of the same layouts (fresh ones per call on CPU; on CUDA one per layout, reused): the sum of
    each call's fastest of ``repeats`` back-to-back runs (operands warm after the first: a lower
    bound, robust to a shared machine's bursts). A step that makes these matmul calls is not
    faster than this; its time over the floor is everything else (norms, attention, loss,
    optimizer, Python)."""
    import time

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    aten = torch.ops.aten
    kinds = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default}
    calls = []

    class Operand(NamedTuple):  # a tensor argument's layout
        shape: torch.Size
        stride: tuple
        dtype: torch.dtype
        device: torch.device

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func in kinds:
                calls.append((func, [Operand(a.shape, a.stride(), a.dtype, a.device) if isinstance(a, torch.Tensor)
                                     else a for a in args], kwargs))
            return func(*args, **kwargs)

    with Record():
        fn()

    cuda = any(isinstance(a, Operand) and a.device.type == "cuda" for _, args, _ in calls for a in args)
    made: dict[Operand, torch.Tensor] = {}

    def operand(a):  # a fresh tensor per operand; on CUDA one per layout (memory: a 1B model's step)
        if not isinstance(a, Operand):
            return a
        if a in made:
            return made[a]
        tensor = torch.empty_strided(a.shape, a.stride, dtype=a.dtype, device=a.device).normal_()
        if cuda:
            made[a] = tensor
        return tensor

    total = 0.0
    for func, args, kwargs in calls:
        args = [operand(a) for a in args]
        best = float("inf")
        for _ in range(repeats):  # back to back: the operands are warm after the first run
            if cuda:  # the kernel's own time (CUDA events), not the launch and the sync
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                func(*args, **kwargs)
                end.record()
                end.synchronize()
                best = min(best, start.elapsed_time(end) / 1e3)
            else:
                start = time.perf_counter()
                func(*args, **kwargs)
                best = min(best, time.perf_counter() - start)
        total += best
    return total * 1e3, len(calls)
