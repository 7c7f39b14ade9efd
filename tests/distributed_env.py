"""The environment of a 2-process ``torchrun`` test on the 2-core CI machine."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def torchrun_env() -> dict[str, str]:
    """os.environ plus: this checkout first on PYTHONPATH (the workers import it), one OpenMP
    thread per process (two processes on two cores), and gloo's pairs on the loopback
    interface, as the rendezvous (a run on the CI machine once hung with one worker left)."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
