#!/usr/bin/env bash
# The ahead-of-time compile check under Triton 3.6, the version on the project's GPU machine
# (torch 2.11 there): a kernel that Triton 3.9 accepts can fail to compile under 3.6 — the first
# H200 run found one (bench/results/gpu/h200-2026-11-30). Triton 3.6 goes into a venv beside the
# active Python (its other packages visible); sm_90, the GPU's arch. Compile errors, shared
# memory, registers and grids fail; register spills are warnings (the configs are tuned for the
# version CI tests with). The committed table bench/results/compile/kernels_triton36.json seeds the
# cache, so only kernels changed since it was written are compiled.
# usage: bash scripts/compile_kernels_triton36.sh [compile_kernels.py options, e.g. --no-write]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python3}"
VENV="${FASTLM_TRITON36_VENV:-${TMPDIR:-/tmp}/fastlm-triton36}"
if ! "$VENV/bin/python" -c 'import triton, sys; sys.exit(triton.__version__ != "3.6.0")' 2>/dev/null; then
  "$PY" -m venv --system-site-packages "$VENV"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check triton==3.6.0
fi
exec "$VENV/bin/python" scripts/compile_kernels.py --arch 90 --name kernels_triton36 --spills-warn \
  --cache "${HOME:-/tmp}/.cache/fastlm/compile_kernels_triton36.json" "$@"
