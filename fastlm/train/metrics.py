"""Training metrics: one JSON line per step in ``metrics.jsonl`` and a loss-curve PNG.

The PNG is drawn with matplotlib when it is installed, otherwise by a small built-in
rasterizer (lines, axes and numeric tick labels) so that no plotting dependency is needed.
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from pathlib import Path
from typing import Any

from fastlm._files import atomic_write, atomic_write_text

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss_curve.png"


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


def plot_losses(records: list[dict[str, Any]], path: str | Path) -> Path:
    """Training loss (and validation loss where logged) against step, as a PNG."""
    path = Path(path)
    train = [(r["step"], r["loss"]) for r in records if math.isfinite(r.get("loss", math.nan))]
    val = [(r["step"], r["val_loss"]) for r in records if math.isfinite(r.get("val_loss", math.nan))]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        atomic_write(path, lambda tmp: Path(tmp).write_bytes(_render_png(train, val)))
        return path
    fig, ax = plt.subplots(figsize=(8, 4.5))
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
    return path


# --- the built-in rasterizer --------------------------------------------------------------

_W, _H, _LEFT, _BOTTOM, _MARGIN = 640, 360, 56, 28, 12
# 3x5 bitmaps of the characters tick labels need, one string of 15 bits (rows top to bottom).
_GLYPHS = {
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111", "3": "111001111001111",
    "4": "101101111001001", "5": "111100111001111", "6": "111100111101111", "7": "111001001001001",
    "8": "111101111101111", "9": "111101111001111", ".": "000000000000010", "-": "000000111000000",
    "e": "000111111100111", "+": "000010111010000",
}


def _render_png(train: list[tuple[float, float]], val: list[tuple[float, float]]) -> bytes:
    pixels = bytearray(b"\xff" * (_W * _H * 3))

    def dot(x: int, y: int, color: tuple[int, int, int]) -> None:
        if 0 <= x < _W and 0 <= y < _H:
            i = (y * _W + x) * 3
            pixels[i : i + 3] = bytes(color)

    def line(x0, y0, x1, y1, color):
        steps = max(abs(x1 - x0), abs(y1 - y0), 1)
        for s in range(steps + 1):
            dot(round(x0 + (x1 - x0) * s / steps), round(y0 + (y1 - y0) * s / steps), color)

    def text(x: int, y: int, label: str) -> None:
        for n, char in enumerate(label):
            bits = _GLYPHS.get(char, "0" * 15)
            for k, bit in enumerate(bits):
                if bit == "1":
                    for dx in range(2):
                        for dy in range(2):
                            dot(x + n * 8 + (k % 3) * 2 + dx, y + (k // 3) * 2 + dy, (0, 0, 0))

    points = train + val
    x_lo, x_hi = (min(p[0] for p in points), max(p[0] for p in points)) if points else (0, 1)
    y_lo, y_hi = (min(p[1] for p in points), max(p[1] for p in points)) if points else (0, 1)
    x_hi, y_hi = max(x_hi, x_lo + 1), max(y_hi, y_lo + 1e-6)

    def px(step: float, loss: float) -> tuple[int, int]:
        x = _LEFT + (step - x_lo) / (x_hi - x_lo) * (_W - _LEFT - _MARGIN)
        y = _H - _BOTTOM - (loss - y_lo) / (y_hi - y_lo) * (_H - _BOTTOM - _MARGIN)
        return round(x), round(y)

    line(_LEFT, _MARGIN, _LEFT, _H - _BOTTOM, (0, 0, 0))
    line(_LEFT, _H - _BOTTOM, _W - _MARGIN, _H - _BOTTOM, (0, 0, 0))
    text(2, _MARGIN, f"{y_hi:.3g}")
    text(2, _H - _BOTTOM - 10, f"{y_lo:.3g}")
    text(_LEFT, _H - _BOTTOM + 8, f"{x_lo:g}")
    text(_W - _MARGIN - 8 * len(f"{x_hi:g}"), _H - _BOTTOM + 8, f"{x_hi:g}")
    for series, color in ((train, (31, 119, 180)), (val, (214, 39, 40))):
        for a, b in zip(series, series[1:]):
            line(*px(*a), *px(*b), color)
        for p in series if series is val else ():
            x, y = px(*p)
            for dx in range(-2, 3):
                for dy in range(-2, 3):
                    dot(x + dx, y + dy, color)
    raw = b"".join(b"\x00" + bytes(pixels[y * _W * 3 : (y + 1) * _W * 3]) for y in range(_H))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", _W, _H, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")
