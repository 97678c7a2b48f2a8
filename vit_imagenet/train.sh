#!/usr/bin/env bash
# vit_imagenet/train.sh STAGE [key=value ...]   (SCALE=mini picks configs/mini/; default paper scale)
# Multi-GPU: NPROC=8 vit_imagenet/train.sh qat4   (torchrun; more torchrun flags, e.g. multi-node, via TORCHRUN_ARGS:
#   TORCHRUN_ARGS="--nnodes 2 --node_rank 0 --master_addr HOST --master_port 29500" NPROC=8 vit_imagenet/train.sh qat4)
exec bash "$(dirname "$0")/../common/run_stage.sh" vit_imagenet "$@"
