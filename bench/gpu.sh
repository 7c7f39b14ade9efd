#!/usr/bin/env bash
# Everything a lent GPU machine should do, in one call that fits in 12 minutes (H100/H200):
#   1. nvidia-smi                      5. pytest -m gpu (per-test timeout)
#   2. pip install -e . (no network:   6. python -m bench.run --device cuda --quick
#      --no-deps --no-build-isolation,  7. bench/gpu_report.py: gpu_run.json + gpu_run.md (GPU,
#      FASTLM_BUILD_CUDA=1: builds        driver, torch/triton/CUDA versions, each part's seconds,
#      fastlm._C)                         exit status and budget, test counts), backend_speed.json
#   3. the extension's status             (measured speed per op and backend, for
#   4. fastlm build-ext (loads it)        FASTLM_SPEED_TABLE), logs.tar.gz, bench_results.tar.gz
# Each part runs under its own time budget (coreutils timeout) and the next part runs whatever
# happened; the script exits 1 if any part failed. At most 8 files land in ${OUT:-bench/results/gpu}
# (what the device tool brings back), none in sub-folders.
#
# usage: bash bench/gpu.sh [--dry-run]
#   --dry-run: print each part's command instead of running it (works on any machine; the
#              report step still runs, so the plumbing is exercised: tests/bench/test_gpu_script.py)
# env: OUT (results folder), PYTHON (default python3), GPU_SH_BUDGETS="install=200 tests=240 ...",
#      GPU_SH_WORKERS (pytest-xdist processes for the GPU tests, default 12: they are bound by
#      Triton's compiles on the CPU), GPU_SH_BENCH="bench_decode bench_hf" (only these modules)
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
DRY_RUN=0
if [[ "${1:-}" == "--dry-run" ]]; then
  DRY_RUN=1
elif [[ $# -gt 0 ]]; then
  echo "usage: bash bench/gpu.sh [--dry-run]" >&2
  exit 2
fi
OUT_DIR="${OUT:-bench/results/gpu}"
PYTHON="${PYTHON:-python3}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/fastlm-gpu.XXXXXX")"
mkdir -p "$OUT_DIR" "$WORK/bench"
PARTS="$WORK/parts.tsv"
: > "$PARTS"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the checkout's code even if the install fails
export PYTHONUNBUFFERED=1
export FASTLM_BUILD_CUDA="${FASTLM_BUILD_CUDA:-1}"   # build fastlm._C, or fail saying why
export MAX_JOBS="${MAX_JOBS:-16}"                     # parallel nvcc jobs (ninja)

# Seconds per part: 10+200+30+60+240+150+30 = 720 at most; the expected total is well under.
declare -A BUDGET=([nvidia-smi]=10 [install]=200 [extension-status]=30 [build-ext]=60 [tests]=240 [bench]=150
                   [report]=30)
for pair in ${GPU_SH_BUDGETS:-}; do
  BUDGET[${pair%%=*}]="${pair#*=}"
done

# run_part NAME COMMAND...: run under NAME's budget, log to $WORK/NAME.log, record the duration.
run_part() {
  local name="$1"
  shift
  local budget="${BUDGET[$name]}" start end rc ms
  echo "== $name (budget ${budget}s): $*"
  start="$(date +%s%N)"
  if [[ $DRY_RUN -eq 1 ]]; then
    printf '[dry-run] %s\n' "$*" > "$WORK/$name.log"
    rc=0
  else
    timeout --kill-after=10 "$budget" "$@" > "$WORK/$name.log" 2>&1
    rc=$?
  fi
  end="$(date +%s%N)"
  ms=$(( (end - start) / 1000000 ))
  printf '%s\t%d.%03d\t%s\t%s\n' "$name" $((ms / 1000)) $((ms % 1000)) "$rc" "$budget" >> "$PARTS"
  if [[ $rc -ne 0 ]]; then
    echo "   $name failed (exit $rc; 124 = over budget); last lines of its log:"
    tail -n 15 "$WORK/$name.log"
  fi
  return 0
}

run_part nvidia-smi nvidia-smi
run_part install "$PYTHON" -m pip install -v -e . --no-deps --no-build-isolation --no-index
run_part extension-status "$PYTHON" -c 'import fastlm._extension as e; print(e.extension_status()); print(e.extension_ready())'
run_part build-ext "$PYTHON" -m fastlm build-ext
WORKERS="${GPU_SH_WORKERS:-12}"
XDIST=()
if [[ "$WORKERS" != 0 ]] && "$PYTHON" -c 'import xdist' 2>/dev/null; then
  XDIST=(-n "$WORKERS")
fi
run_part tests "$PYTHON" -m pytest -m gpu -q -p no:cacheprovider --timeout=90 --durations=25 "${XDIST[@]}" \
  --junitxml="$WORK/pytest-gpu.xml" tests
ONLY=()
if [[ -n "${GPU_SH_BENCH:-}" ]]; then
  read -ra ONLY <<< "--only $GPU_SH_BENCH"
fi
run_part bench "$PYTHON" -m bench.run --device cuda --quick --out "$WORK/bench" "${ONLY[@]}"
run_part report "$PYTHON" -m bench.gpu_report --work "$WORK" --out "$OUT_DIR" --dry-run "$DRY_RUN"
if [[ $DRY_RUN -eq 1 ]]; then  # the report is the plumbing under test: run it for real
  "$PYTHON" -m bench.gpu_report --work "$WORK" --out "$OUT_DIR" --dry-run 1 || exit 1
fi

failed="$(awk -F '\t' '$3 != 0 {print $1}' "$PARTS" | tr '\n' ' ')"
echo "== done in ${WORK}; results in $OUT_DIR: $(cd "$OUT_DIR" && ls | tr '\n' ' ')"
if [[ -n "$failed" ]]; then
  echo "failed parts: $failed"
  exit 1
fi
