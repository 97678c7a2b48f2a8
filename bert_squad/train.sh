#!/usr/bin/env bash
# bert_squad/train.sh STAGE [key=value ...]   (SCALE=mini picks configs/mini/, default paper scale)
# Multi-GPU: NPROC=8 bert_squad/train.sh qat4   (torchrun; extra torchrun flags via TORCHRUN_ARGS)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"; root="$(dirname "$here")"
stage="${1:?usage: train.sh STAGE [key=value ...]}"; shift
cfgdir="$here/configs"; [ "${SCALE:-paper}" = mini ] && cfgdir="$here/configs/mini"
[ -f "$cfgdir/$stage.yaml" ] || { echo "train.sh: no config $cfgdir/$stage.yaml" >&2; exit 2; }
py="$root/.venv/bin/python"; [ -x "$py" ] || py=python3
cd "$root"
if [ "${NPROC:-1}" -gt 1 ]; then
  exec "$py" -m torch.distributed.run --nproc_per_node "$NPROC" ${TORCHRUN_ARGS:-} -m bert_squad.train --config "$cfgdir/$stage.yaml" "$@"
fi
exec "$py" -m bert_squad.train --config "$cfgdir/$stage.yaml" "$@"
