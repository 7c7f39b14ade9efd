#!/usr/bin/env bash
# Install fastlm into the active Python environment with everything the tests need.
# PyTorch comes first: a CPU build (torch==2.13.0) when none is installed, because an unpinned
# torch pulls several GB of CUDA packages. An installed torch (e.g. a CUDA build) is kept.
#
# Nothing is reinstalled when nothing changed: the install is stamped (build/setup-stamp) with a
# hash of pyproject.toml, setup.py, the C++/CUDA sources and the interpreter; a run with the same
# hash and an importable fastlm from this checkout returns at once. FASTLM_SETUP_FORCE=1 reinstalls.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python3}"
STAMP=build/setup-stamp

hash_inputs() {
  {
    "$PY" -c 'import sys; print(sys.executable, sys.version)'
    cat pyproject.toml setup.py
    find csrc -type f \( -name '*.cu' -o -name '*.cuh' -o -name '*.cpp' -o -name '*.h' \) -print0 2>/dev/null \
      | sort -z | xargs -0 cat 2>/dev/null
  } | sha256sum | cut -d' ' -f1
}

HASH="$(hash_inputs)"
installed_here() {
  # fastlm imports from this checkout (an editable install or the working directory itself)
  "$PY" -c 'import fastlm, pathlib, sys; sys.exit(pathlib.Path(fastlm.__file__).resolve().parents[1] != pathlib.Path.cwd().resolve())' 2>/dev/null
}
if [[ "${FASTLM_SETUP_FORCE:-0}" != 1 && -f "$STAMP" && "$(cat "$STAMP")" == "$HASH" ]] && installed_here; then
  echo "setup: fastlm is installed and pyproject.toml, setup.py and csrc/ are unchanged: nothing to do"
  exit 0
fi

if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "setup: installing PyTorch (CPU build torch==2.13.0; install a CUDA build first to keep it)..."
  "$PY" -m pip install --quiet "torch==2.13.0"
else
  echo "setup: keeping the installed PyTorch $("$PY" -c 'import torch; print(torch.__version__)')"
fi
echo "setup: installing fastlm from $(pwd) with its test dependencies (pip install -e '.[dev]')..."
"$PY" -m pip install --quiet -e ".[dev]"
mkdir -p build
echo "$HASH" > "$STAMP"
echo "setup: done (the next run skips the install unless pyproject.toml, setup.py or csrc/ change)"
