#!/usr/bin/env bash
# vit_imagenet/train.sh STAGE [key=value ...]   (SCALE=mini picks configs/mini/; default paper scale)
# Multi-GPU: NPROC=8 vit_imagenet/train.sh qat4   (torchrun; more torchrun flags, e.g. multi-node, via TORCHRUN_ARGS:
#   TORCHRUN_ARGS="--nnodes 2 --node_rank 0 --master_addr HOST --master_port 29500" NPROC=8 vit_imagenet/train.sh qat4)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"; root="$(dirname "$here")"
stage="${1:?usage: train.sh STAGE [key=value ...]}"; shift
cfgdir="$here/configs"; [ "${SCALE:-paper}" = mini ] && cfgdir="$here/configs/mini"
[ -f "$cfgdir/$stage.yaml" ] || { echo "train.sh: no config $cfgdir/$stage.yaml" >&2; exit 2; }
py="$root/.venv/bin/python"; [ -x "$py" ] || py=python3
cd "$root"
if [ "${NPROC:-1}" -gt 1 ]; then
  # shellcheck disable=SC2086
  exec "$py" -m torch.distributed.run --nproc_per_node "$NPROC" ${TORCHRUN_ARGS:-} -m vit_imagenet.train \
    --config "$cfgdir/$stage.yaml" "$@"
fi
exec "$py" -m vit_imagenet.train --config "$cfgdir/$stage.yaml" "$@"
