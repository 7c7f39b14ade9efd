"""Stopping a training run cleanly on SIGINT (Ctrl-C) or SIGTERM.

Inside :class:`StopOnSignal`, the first SIGINT or SIGTERM only sets a flag: the trainer finishes
the current step, writes a checkpoint of it (atomically, as every checkpoint) and raises
:class:`TrainingInterrupted`; the ``fastlm`` command turns that into one line on how to resume
and exit status 128 + signal (130 for SIGINT, 143 for SIGTERM). A second signal exits at once
(``os._exit``): checkpoints are written to a temporary name and renamed into place, so this is as
safe as ``kill -9`` — an unfinished save is left as a temporary directory that ``--resume``
removes, and every earlier checkpoint stays intact.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from types import FrameType

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(Exception):
    """The run stopped on a signal after ``step`` completed steps; ``checkpoint`` holds that step
    (None when no step was completed in this run)."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None) -> None:
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        name = signal.Signals(signum).name
        where = f"checkpoint {checkpoint}" if checkpoint is not None else "no new checkpoint"
        super().__init__(f"stopped by {name} after step {step}; {where}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopOnSignal:
    """Context manager: SIGINT/SIGTERM set :attr:`signum` instead of ending the process (only in
    the main thread, where Python delivers signals; elsewhere it does nothing)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            os.write(2, b"fastlm: second interrupt: exiting now (the checkpoints written so far are intact)\n")
            os._exit(128 + signum)
        self.signum = signum
        os.write(2, f"fastlm: {signal.Signals(signum).name} received: stopping after the current step and saving "
                    "it (again to exit at once)\n".encode())

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
