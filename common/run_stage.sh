#!/usr/bin/env bash
# common/run_stage.sh PIPELINE STAGE [key=value ...]: what every PIPELINE/train.sh runs.
# SCALE=mini picks PIPELINE/configs/mini/ (default: paper scale). NPROC=N launches N processes with torchrun;
# more torchrun flags (multi-node rendezvous) via TORCHRUN_ARGS.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
pipeline="${1:?usage: run_stage.sh PIPELINE STAGE [key=value ...]}"; shift
stage="${1:?usage: $pipeline/train.sh STAGE [key=value ...]}"; shift
cfgdir="$root/$pipeline/configs"
case "${SCALE:-paper}" in
  mini) cfgdir="$cfgdir/mini" ;;
  paper) ;;
  *) echo "$pipeline/train.sh: SCALE must be mini or paper, got '$SCALE'" >&2; exit 2 ;;
esac
[ -f "$cfgdir/$stage.yaml" ] || { echo "$pipeline/train.sh: no config $cfgdir/$stage.yaml" >&2; exit 2; }
py="$root/.venv/bin/python"; [ -x "$py" ] || py=python3
cd "$root"
if [ "${NPROC:-1}" -gt 1 ]; then
  # shellcheck disable=SC2086  # TORCHRUN_ARGS holds several flags
  exec "$py" -m torch.distributed.run --nproc_per_node "$NPROC" ${TORCHRUN_ARGS:-} -m "$pipeline.train" \
    --config "$cfgdir/$stage.yaml" "$@"
fi
exec "$py" -m "$pipeline.train" --config "$cfgdir/$stage.yaml" "$@"
