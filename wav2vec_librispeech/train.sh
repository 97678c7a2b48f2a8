#!/usr/bin/env bash
# wav2vec_librispeech/train.sh STAGE [key=value ...]   (SCALE=mini picks configs/mini/, default paper scale)
# Multi-GPU: NPROC=8 wav2vec_librispeech/train.sh qat4 train.gradient_accumulation_steps=1 train.per_device_train_batch_size=4
#   (torchrun; keep per-device batch x accumulation x GPUs = 32; extra torchrun flags via TORCHRUN_ARGS, e.g.
#   TORCHRUN_ARGS="--nnodes 2 --node_rank 0 --master_addr HOST --master_port 29500" for multi-node)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"; root="$(dirname "$here")"
stage="${1:?usage: train.sh STAGE [key=value ...]}"; shift
cfgdir="$here/configs"; [ "${SCALE:-paper}" = mini ] && cfgdir="$here/configs/mini"
[ -f "$cfgdir/$stage.yaml" ] || { echo "train.sh: no config $cfgdir/$stage.yaml" >&2; exit 2; }
py="$root/.venv/bin/python"; [ -x "$py" ] || py=python3
cd "$root"
if [ "${NPROC:-1}" -gt 1 ]; then
  exec "$py" -m torch.distributed.run --nproc_per_node "$NPROC" ${TORCHRUN_ARGS:-} -m wav2vec_librispeech.train --config "$cfgdir/$stage.yaml" "$@"
fi
exec "$py" -m wav2vec_librispeech.train --config "$cfgdir/$stage.yaml" "$@"
