#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the main job: train a BPE tokenizer and a tiny model on the
# Python standard library's own sources, report validation perplexity, save it, generate text.
# Extra arguments go to `fastlm demo` (see `fastlm demo --help`).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
exec "${PYTHON:-python3}" -m fastlm demo "$@"
