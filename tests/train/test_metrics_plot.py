"""The loss plot: drawn with matplotlib (the optional `plot` extra), skipped with one line without it."""

import logging
import sys

import pytest

from fastlm.train.metrics import plot_losses

RECORDS = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5, "val_loss": 2.7}]


def test_plot_is_a_png_with_matplotlib(tmp_path):
    pytest.importorskip("matplotlib")
    path = plot_losses(RECORDS, tmp_path / "loss_curve.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_is_skipped_with_one_line_without_matplotlib(tmp_path, monkeypatch, caplog):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    with caplog.at_level(logging.INFO, logger="fastlm.train.metrics"):
        assert plot_losses(RECORDS, tmp_path / "loss_curve.png") is None
    assert not (tmp_path / "loss_curve.png").exists()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "fastlm[plot]" in lines[0]
