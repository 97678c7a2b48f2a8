#!/usr/bin/env bash
# bert_squad/train.sh STAGE [key=value ...]   (SCALE=mini picks configs/mini/, default paper scale)
# Multi-GPU: NPROC=8 bert_squad/train.sh qat4   (torchrun; extra torchrun flags via TORCHRUN_ARGS)
exec bash "$(dirname "$0")/../common/run_stage.sh" bert_squad "$@"
