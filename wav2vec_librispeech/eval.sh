#!/usr/bin/env bash
# wav2vec_librispeech/eval.sh RUN_DIR [key=value ...]: re-evaluate a saved run, rewriting its metrics.json
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"; root="$(dirname "$here")"
run="$(cd "${1:?usage: eval.sh RUN_DIR [key=value ...]}" && pwd)"; shift
py="$root/.venv/bin/python"; [ -x "$py" ] || py=python3
cd "$root" && exec "$py" -m wav2vec_librispeech.eval "$run" "$@"
