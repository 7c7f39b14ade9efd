"""Markdown tables and plots from pytest-benchmark JSON: ``python -m bench.report JSON [MD]``.

One table per benchmark group (the cases compared side by side), one row per case: ``impl``,
the ``extra_info`` fields that differ inside the group, median / p20 / p80 ms over the rounds,
the derived rates where a case recorded its work per call (``flops`` → TFLOP/s, ``bytes`` →
GB/s, ``tokens`` → tokens/s), ``vs peer`` = the peer's median / this median (the peer is the
case of the same group whose ``impl`` equals this case's ``peer``), and ``peak_mb``. The
header carries the device and versions (``machine_info.fastlm_env``). ``<stem>.png``: median ms
per case, one bar each, when matplotlib is importable.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from bench.common import _fmt, atomic_write_text, bar_plot

_RATES = (("flops", "tflops", 1e12), ("bytes", "gbps", 1e9), ("tokens", "tokens_per_s", 1.0))
_HIDDEN = {"impl", "peer", "device", "peak_mb", "flops", "bytes", "tokens"}


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def rows(data: dict) -> list[dict]:
    """One flat record per benchmark: group, name, impl, timing (ms), derived rates, extra_info."""
    out = []
    for bench in data["benchmarks"]:
        info = dict(bench.get("extra_info", {}))
        stats = bench["stats"]
        times = stats.get("data") or [stats["median"]]
        row = {"group": bench.get("group") or bench["name"], "name": bench["name"], "impl": info.get("impl", "")}
        row.update(median_ms=stats["median"] * 1e3, p20_ms=_quantile(times, 0.2) * 1e3,
                   p80_ms=_quantile(times, 0.8) * 1e3, rounds=stats["rounds"])
        for key, column, unit in _RATES:
            if info.get(key):
                row[column] = info[key] / stats["median"] / unit
        row.update(info)
        out.append(row)
    by_impl = {(r["group"], r["impl"]): r for r in out}
    for row in out:
        peer = by_impl.get((row["group"], row.get("peer")))
        if peer is not None:
            row["vs_peer"] = peer["median_ms"] / row["median_ms"]
    return out


def _table(group_rows: list[dict]) -> list[str]:
    varying = []
    for row in group_rows:
        for key in row:
            if key in _HIDDEN or key in varying or key in ("group", "name", "median_ms", "p20_ms", "p80_ms", "rounds",
                                                          "vs_peer", "tflops", "gbps", "tokens_per_s"):
                continue
            if len({repr(r.get(key)) for r in group_rows}) > 1:
                varying.append(key)
    rates = [c for _, c, _ in _RATES if any(c in r for r in group_rows)]
    extra = ["vs_peer"] if any("vs_peer" in r for r in group_rows) else []
    memory = ["peak_mb"] if any(r.get("peak_mb") is not None for r in group_rows) else []
    columns = ["impl", *varying, "median_ms", "p20_ms", "p80_ms", "rounds", *rates, *extra, *memory]
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in group_rows:
        cells = [_fmt(row.get(c)) for c in columns]
        if row.get("peer") and "vs_peer" in row:
            cells[columns.index("vs_peer")] += f" (vs {row['peer']})"
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown(data: dict, title: str) -> str:
    """The whole report: title, environment line, then per group its shared fields and table."""
    records = rows(data)
    env = data.get("machine_info", {}).get("fastlm_env") or {}
    env_line = ", ".join(f"{k}={v}" for k, v in env.items() if v is not None)
    lines = [f"# {title}", "", f"{data.get('datetime', '')} — {env_line}", "",
             "Times: median (p20, p80) over the rounds, ms; `vs_peer`: the peer's median / this median "
             "in the same run.", ""]
    groups: dict[str, list[dict]] = {}
    for record in records:
        groups.setdefault(record["group"], []).append(record)
    for group, group_rows in groups.items():
        shared = {k: v for k, v in group_rows[0].items() if k not in _HIDDEN and k not in ("group", "name")
                  and all(repr(r.get(k)) == repr(v) for r in group_rows) and k not in
                  ("median_ms", "p20_ms", "p80_ms", "rounds", "vs_peer", "tflops", "gbps", "tokens_per_s")}
        lines += [f"## {group}", ""]
        if shared:
            lines += [", ".join(f"{k}={_fmt(v)}" for k, v in shared.items()), ""]
        lines += _table(group_rows) + [""]
    return "\n".join(lines)


def plot(data: dict, title: str, path: Path) -> Path | None:
    """Horizontal bars of median ms per case (log scale); None without matplotlib."""
    records = rows(data)
    return bar_plot(title, [f"{r['group']} · {r['impl']}" for r in records], [r["median_ms"] for r in records], path)


def write(json_path: Path, md_path: Path | None = None, *, title: str | None = None,
          with_plot: bool = True) -> list[Path]:
    """Write the markdown (default: beside the JSON) and the plot; returns the paths written."""
    json_path = Path(json_path)
    data = json.loads(json_path.read_text(encoding="utf-8"))
    md_path = Path(md_path) if md_path is not None else json_path.with_suffix(".md")
    title = title or json_path.stem
    atomic_write_text(md_path, markdown(data, title))
    written = [md_path]
    if with_plot and data.get("benchmarks"):
        png = plot(data, title, md_path.with_suffix(".png"))
        if png is not None:
            written.append(png)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.splitlines()[0])
    parser.add_argument("json", type=Path, help="pytest-benchmark --benchmark-json output")
    parser.add_argument("md", type=Path, nargs="?", help="markdown to write (default: beside the JSON)")
    parser.add_argument("--no-plot", action="store_true", help="skip the png")
    args = parser.parse_args(argv)
    for path in write(args.json, args.md, with_plot=not args.no_plot):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
