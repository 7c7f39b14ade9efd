#!/usr/bin/env bash
# Set up (scripts/setup.sh: skipped when nothing changed) and run the main job: train a BPE
# tokenizer and a tiny model on the Python standard library's own sources, report validation
# perplexity, save it, generate text. Extra arguments go to `fastlm demo` (see `fastlm demo --help`);
# to run it again into the same folder, add --overwrite (or choose another --out).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
exec "${PYTHON:-python3}" -m fastlm demo "$@"
