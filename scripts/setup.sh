#!/usr/bin/env bash
# Install fastlm into the active Python environment with everything the tests need.
# PyTorch comes first: a CPU build (torch==2.13.0) when none is installed, because an unpinned
# torch pulls several GB of CUDA packages. An installed torch (e.g. a CUDA build) is kept.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python3}"
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install --quiet "torch==2.13.0"
fi
"$PY" -m pip install --quiet -e ".[dev]"
