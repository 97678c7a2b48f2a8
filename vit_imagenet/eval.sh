#!/usr/bin/env bash
# vit_imagenet/eval.sh RUN_DIR [--data_dir DIR] [--out_dir DIR] [key=value ...]
# Re-evaluates a saved run (config.yaml + model.safetensors); NPROC=8 shards the evaluation over GPUs (torchrun).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"; root="$(dirname "$here")"
run_dir="${1:?usage: eval.sh RUN_DIR [--data_dir DIR] [--out_dir DIR] [key=value ...]}"; shift
run_dir="$(cd "$run_dir" && pwd)"  # absolute: the command runs from the repo root
py="$root/.venv/bin/python"; [ -x "$py" ] || py=python3
cd "$root"
if [ "${NPROC:-1}" -gt 1 ]; then
  # shellcheck disable=SC2086
  exec "$py" -m torch.distributed.run --nproc_per_node "$NPROC" ${TORCHRUN_ARGS:-} -m vit_imagenet.eval "$run_dir" "$@"
fi
exec "$py" -m vit_imagenet.eval "$run_dir" "$@"
