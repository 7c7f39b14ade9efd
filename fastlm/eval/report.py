"""The ``fastlm eval`` report: every model variant on every task, side by side.

Writes into the output folder (each file to a temp name, then renamed into place):

- ``results.json``: per variant, each task's metrics, time and tokens, the throughput and memory;
  the tasks; the scales; versions and device.
- ``results.md``: one row per variant, one column per task metric, then generated tokens/s,
  scored tokens/s (each variant warmed up first, untimed), peak memory and weight size.
- ``results.png``: a bar chart of the same metrics (matplotlib; skipped, with a message, when
  it is not installed).
- ``samples.md`` / ``samples.html`` (with ``samples`` > 0): the first N prompts of each
  generative or multiple-choice task with every variant's output side by side, for people to rate.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` over the variant's evaluation (after
``reset_peak_memory_stats``); on CPU the peak resident set size (RSS) of the whole process while
the variant is evaluated, sampled every 5 ms from /proc/self/statm — it includes the Python
runtime and libraries, so compare rows rather than read it as the model's own footprint (each
variant is loaded just before its evaluation and released after).
"""

from __future__ import annotations

import html
import json
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fastlm.eval.tasks import Task, TaskResult, evaluate_task

SCALES = ("rouge1/rouge2/rougeL/rougeLsum, exact_match, f1, acc, acc_norm: fractions in [0, 1]; "
          "bleu, chrf: sacrebleu's 0-100 scores; perplexity, bits_per_byte, nll (nats/token): lower is better")


@dataclass
class Variant:
    """A model to evaluate: ``load()`` -> (model, tokenizer), called just before its evaluation."""

    name: str
    source: str
    load: Callable[[], tuple[Any, Any]]


class PeakMemory:
    """Peak memory in bytes over a ``with`` block (see the module docstring for what is measured)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.peak, self._stop = device, 0, threading.Event()
        self.method = ("torch.cuda.max_memory_allocated" if device.type == "cuda"
                       else "process peak RSS (sampled every 5 ms from /proc/self/statm)")

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._rss())

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif os.path.exists("/proc/self/statm"):
            self.peak = self._rss()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        else:
            self.method = "process peak RSS since start (getrusage: no per-variant reset on this OS)"
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
        elif hasattr(self, "_thread"):
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self._rss())
        else:
            import resource

            scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
            self.peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _weights_bytes(model) -> int:
    from fastlm.quant import model_bytes

    return model_bytes(model)


def _rate(results: Sequence[TaskResult], attribute: str) -> float | None:
    """tokens / seconds spent in the model over the tasks that did this kind of work."""
    seconds = sum(r.model_seconds for r in results)
    return sum(getattr(r, attribute) for r in results) / seconds if results and seconds > 0 else None


@torch.no_grad()
def warm_up(model, tokenizer) -> None:
    """One short forward and generation, untimed, so that one-time costs (lazy imports, kernel
    selection, allocator growth) do not land in the first variant's tokens/s."""
    from fastlm.eval.scoring import prefix_token_id
    from fastlm.generate import generate

    token = prefix_token_id(tokenizer)
    model(torch.tensor([[token] * 8], device=model.device))
    generate(model, [[token]], max_new_tokens=2)


def evaluate_variants(variants: Sequence[Variant], tasks: Sequence[Task], *, batch_size: int = 16,
                      progress: bool | None = None, log: Callable[[str], None] | None = None) -> list[dict]:
    """Evaluate each variant on each task; one result dict per variant (see results.json)."""
    rows = []
    for variant in variants:
        model, tokenizer = variant.load()
        device = model.device
        warm_up(model, tokenizer)
        results: list[TaskResult] = []
        with PeakMemory(device) as memory:
            for task in tasks:
                if log:
                    log(f"{variant.name}: {task.name} ({task.kind}, {len(task.examples)} examples)")
                results.append(evaluate_task(model, tokenizer, task, batch_size=batch_size, progress=progress))
        gen = [r for r in results if r.tokens_generated]
        scored = [r for r in results if r.tokens_scored]
        rows.append({
            "variant": variant.name,
            "source": variant.source,
            "device": str(device),
            "dtype": str(model.dtype).removeprefix("torch."),
            "metrics": {f"{r.task}/{k}": v for r in results for k, v in r.metrics.items()},
            "tasks": {r.task: {"kind": r.kind, "metrics": r.metrics, "seconds": r.seconds,
                               "model_seconds": r.model_seconds,
                               "tokens_generated": r.tokens_generated, "tokens_scored": r.tokens_scored,
                               "outputs": r.outputs} for r in results},
            "gen_tokens_per_s": _rate(gen, "tokens_generated"),
            "score_tokens_per_s": _rate(scored, "tokens_scored"),
            "peak_memory_mib": memory.peak / 2**20,
            "memory_measure": memory.method,
            "weights_mib": _weights_bytes(model) / 2**20,
        })
        del model, tokenizer
    return rows


def _atomic_write(path: Path, data: str | bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):  # the write or the rename failed
            os.unlink(tmp)


def _fmt(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


def markdown_table(rows: Sequence[dict]) -> str:
    """One row per variant, one column per task metric, then throughput and memory."""
    columns = list(dict.fromkeys(k for row in rows for k in row["metrics"]))
    header = ["variant", *columns, "gen tok/s", "score tok/s", "peak MiB", "weights MiB"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["variant"], *(_fmt(row["metrics"].get(c)) for c in columns), _fmt(row["gen_tokens_per_s"]),
                 _fmt(row["score_tokens_per_s"]), _fmt(row["peak_memory_mib"]), _fmt(row["weights_mib"])]
        lines.append("| " + " | ".join(cells) + " |")
    methods = sorted({row["memory_measure"] for row in rows})
    notes = [f"Scales: {SCALES}.", f"Peak memory: {'; '.join(methods)}.",
             "gen tok/s: generated tokens / generation time; score tok/s: tokens run through the model / "
             "scoring time (multiple choice, perplexity)."]
    return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"


def bar_chart(rows: Sequence[dict], path: Path) -> str | None:
    """Write the metrics as grouped bars to ``path``; returns a message instead when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no results.png (pip install matplotlib)"
    columns = list(dict.fromkeys(k for row in rows for k in row["metrics"]))
    if not columns:
        return "no metrics to plot"
    ncols = min(4, len(columns))
    nrows = -(-len(columns) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 2.8 * nrows), squeeze=False)
    names = [row["variant"] for row in rows]
    for ax in axes.flat[len(columns):]:
        ax.set_visible(False)
    for ax, column in zip(axes.flat, columns):
        values = [row["metrics"].get(column) or 0.0 for row in rows]
        ax.bar(range(len(names)), values, color=[f"C{i % 10}" for i in range(len(names))])
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=7)
        ax.set_title(column, fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return None


def _samples(rows: Sequence[dict], n: int) -> list[dict]:
    """Up to n outputs per task that has outputs: prompt, reference and each variant's output."""
    out = []
    for task, first in rows[0]["tasks"].items():
        for i, item in enumerate(first["outputs"][:n]):
            out.append({"task": task, "prompt": item["prompt"], "reference": item["reference"],
                        "outputs": {row["variant"]: row["tasks"][task]["outputs"][i]["output"] for row in rows}})
    return out


def samples_markdown(samples: Sequence[dict]) -> str:
    lines = ["# Samples: each variant's output side by side", ""]
    for k, s in enumerate(samples, 1):
        fence = "````" if "```" in s["prompt"] else "```"
        lines += [f"## {k}. {s['task']}", "", fence, s["prompt"], fence, "", f"Reference: {s['reference']!r}", "",
                  "| variant | output |", "|---|---|"]
        for name, text in s["outputs"].items():
            cell = html.escape(text).replace("|", "&#124;").replace("\n", "<br>")
            lines.append(f"| {name} | {cell} |")
        lines.append("")
    return "\n".join(lines)


def samples_html(samples: Sequence[dict]) -> str:
    names = list(samples[0]["outputs"]) if samples else []
    head = "".join(f"<th>{html.escape(n)}</th>" for n in names)
    body = []
    for s in samples:
        cells = "".join(f"<td><pre>{html.escape(s['outputs'][n])}</pre></td>" for n in names)
        body.append(f"<tr><td>{html.escape(s['task'])}</td><td><pre>{html.escape(s['prompt'])}</pre></td>"
                    f"<td><pre>{html.escape(s['reference'])}</pre></td>{cells}</tr>")
    return ("<!doctype html><meta charset='utf-8'><title>fastlm eval samples</title>"
            "<style>td,th{border:1px solid #ccc;vertical-align:top;padding:4px}pre{white-space:pre-wrap}</style>"
            f"<table><tr><th>task</th><th>prompt</th><th>reference</th>{head}</tr>{''.join(body)}</table>\n")


def write_report(rows: Sequence[dict], tasks: Sequence[Task], out: str | Path, *, samples: int = 0) -> list[str]:
    """Write results.json, results.md, results.png (and samples.*); returns messages for the user."""
    import fastlm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    messages = []
    document = {
        "fastlm": fastlm.__version__, "torch": torch.__version__, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                         time.gmtime()),
        "scales": SCALES,
        "tasks": [{"name": t.name, "kind": t.kind, "path": t.path, "examples": len(t.examples),
                   "fewshot": t.option("fewshot"), "metrics": list(t.metrics)} for t in tasks],
        "variants": [{k: v for k, v in row.items() if k != "tasks"} |
                     {"tasks": {n: {k: v for k, v in r.items() if k != "outputs"} for n, r in row["tasks"].items()}}
                     for row in rows],
    }
    _atomic_write(out / "results.json", json.dumps(document, indent=2, ensure_ascii=False) + "\n")
    _atomic_write(out / "results.md", "# fastlm eval\n\n" + markdown_table(rows))
    message = bar_chart(rows, out / "results.png")
    if message:
        messages.append(message)
    if samples:
        chosen = _samples(rows, samples)
        if not chosen:
            messages.append("--samples: no generative or multiple-choice task, so no samples")
        else:
            _atomic_write(out / "samples.md", samples_markdown(chosen))
            _atomic_write(out / "samples.html", samples_html(chosen))
    return messages
