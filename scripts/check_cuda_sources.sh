#!/usr/bin/env bash
# CI step: compile every torch-free CUDA source in csrc/ with `nvcc -c`, so that a syntax or
# template error in a kernel never lands, also on machines without a GPU or torch's CUDA headers.
#
# A file is torch-free when it includes none of torch/, ATen/, c10/, common.h or ops.h; those
# that do (the entry points, bindings) need torch's CUDA headers and are compiled by the
# setup.py / JIT build instead, and are listed as skipped. A .cuh is compiled through a one-line
# .cu that includes it, so it must be self-contained; a header that instantiates its kernels
# (e.g. in an inline launcher) gets its device code generated and assembled for every arch.
# Flags follow torch's extension build (C++17, --expt-relaxed-constexpr, no half operators).
#
# Without nvcc (NVCC, $CUDA_HOME/bin, PATH, /usr/local/cuda/bin) it says so and exits 0.
# Env: NVCC (compiler), CUDA_CHECK_ARCHS (default "80 90").
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

nvcc="${NVCC:-}"
if [[ -z "$nvcc" ]]; then
  for candidate in "${CUDA_HOME:+$CUDA_HOME/bin/nvcc}" "$(command -v nvcc || true)" /usr/local/cuda/bin/nvcc; do
    if [[ -n "$candidate" && -x "$candidate" ]]; then
      nvcc="$candidate"
      break
    fi
  done
fi
if [[ -z "$nvcc" ]]; then
  echo "check_cuda_sources: nvcc not found (set NVCC or CUDA_HOME); skipping the CUDA source check"
  exit 0
fi

archs="${CUDA_CHECK_ARCHS:-80 90}"
gencode=()
for arch in $archs; do
  gencode+=("-gencode=arch=compute_${arch},code=sm_${arch}")
done
flags=(-std=c++17 -O2 --expt-relaxed-constexpr -Icsrc
  -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
  -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__)

echo "check_cuda_sources: $("$nvcc" --version | grep -o 'release [0-9.]*' || echo "nvcc at $nvcc"), archs: $archs"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

compiled=0
skipped=0
failed=0
shopt -s nullglob
for src in csrc/*.cu csrc/*.cuh; do
  if grep -Eq '^[[:space:]]*#[[:space:]]*include[[:space:]]*[<"](torch/|ATen/|c10/|common\.h|ops\.h)' "$src"; then
    echo "  skipped  $src (includes torch headers: built by setup.py / the JIT build)"
    skipped=$((skipped + 1))
    continue
  fi
  name="$(basename "$src")"
  unit="$src"
  if [[ "$src" == *.cuh ]]; then
    unit="$tmp/${name%.cuh}_include.cu"
    printf '#include "%s"\n' "$name" > "$unit"
  fi
  if "$nvcc" -x cu -c "$unit" -o "$tmp/${name}.o" "${flags[@]}" "${gencode[@]}"; then
    echo "  compiled $src"
    compiled=$((compiled + 1))
  else
    echo "  FAILED   $src"
    failed=$((failed + 1))
  fi
done
echo "check_cuda_sources: $compiled compiled, $skipped skipped (need torch), $failed failed"
[[ "$failed" -eq 0 ]]
