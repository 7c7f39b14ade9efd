"""Training metrics: one JSON line per step in ``metrics.jsonl`` and a loss-curve PNG.

The PNG is drawn with matplotlib, an optional dependency (``pip install 'fastlm[plot]'``);
without it the plot is skipped with one log line (metrics.jsonl holds the same numbers).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from fastlm._files import atomic_write, atomic_write_text

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss_curve.png"

logger = logging.getLogger(__name__)


class MetricsLog:
    """Appends ``{"step": ..., "loss": ..., ...}`` lines to ``<out>/metrics.jsonl``."""

    def __init__(self, out: str | Path, *, resume_step: int | None = None) -> None:
        self.path = Path(out) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            atomic_write_text(self.path, "")
        elif self.path.exists():
            # Drop lines of steps after the checkpoint: they are redone (and logged again) now.
            kept = [line for line in self.read() if line["step"] <= resume_step]
            atomic_write_text(self.path, "".join(json.dumps(line) + "\n" for line in kept))

    def log(self, record: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def read(self) -> list[dict[str, Any]]:
        with open(self.path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]


def plot_losses(records: list[dict[str, Any]], path: str | Path) -> Path | None:
    """Training loss (and validation loss where logged) against step, as a PNG; None (and one
    log line) when matplotlib is not installed."""
    path = Path(path)
    train = [(r["step"], r["loss"]) for r in records if math.isfinite(r.get("loss", math.nan))]
    val = [(r["step"], r["val_loss"]) for r in records if math.isfinite(r.get("val_loss", math.nan))]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.info("matplotlib is not installed: %s not drawn (pip install 'fastlm[plot]'; the numbers are in %s)",
                    path.name, METRICS_FILE)
        return None
    fig, ax = plt.subplots(figsize=(8, 4.5))
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if train or val:
        ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
    return path
