#!/usr/bin/env bash
# One command for a GPU machine: install fastlm (building fastlm._C), run the GPU tests, then
# the benchmarks. Everything lands in ${OUT:-bench/results}: nvidia-smi.txt, pip-install.log,
# extension-status.txt, pytest-gpu.log, pytest-gpu.xml, bench.log, <module>.json|.md, summary.md.
# The benchmarks run even if the tests fail; the script exits 1 if either failed.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT_DIR="${OUT:-bench/results}"
mkdir -p "$OUT_DIR"
# Build the extension ahead of time, loudly failing if it cannot be built (override with =auto).
export FASTLM_BUILD_CUDA="${FASTLM_BUILD_CUDA:-1}"

nvidia-smi > "$OUT_DIR/nvidia-smi.txt" 2>&1 || echo "warning: nvidia-smi failed (see $OUT_DIR/nvidia-smi.txt)" >&2

echo "== pip install -e . (FASTLM_BUILD_CUDA=$FASTLM_BUILD_CUDA)"
python -m pip install -v -e . --no-deps --no-build-isolation > "$OUT_DIR/pip-install.log" 2>&1 \
  || { tail -n 60 "$OUT_DIR/pip-install.log" >&2; echo "install failed (see $OUT_DIR/pip-install.log)" >&2; exit 1; }
python -c 'import torch, fastlm._extension as e; print("torch", torch.__version__, "cuda", torch.version.cuda); print("extension_status:", e.extension_status())' \
  > "$OUT_DIR/extension-status.txt" 2>&1 || true
cat "$OUT_DIR/extension-status.txt"

echo "== GPU tests"
tests_rc=0
python -m pytest -m gpu -q --junitxml="$OUT_DIR/pytest-gpu.xml" 2>&1 | tee "$OUT_DIR/pytest-gpu.log" || tests_rc=$?
if [[ $tests_rc -eq 5 ]]; then
  echo "warning: no GPU tests were collected" >&2
  tests_rc=0
fi

echo "== benchmarks"
bench_rc=0
python -m bench.run --device cuda --out "$OUT_DIR" 2>&1 | tee "$OUT_DIR/bench.log" || bench_rc=$?

echo "== done: tests rc=$tests_rc, benchmarks rc=$bench_rc; results in $OUT_DIR"
if [[ $tests_rc -ne 0 || $bench_rc -ne 0 ]]; then
  exit 1
fi
