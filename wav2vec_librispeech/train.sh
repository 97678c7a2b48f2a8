#!/usr/bin/env bash
# wav2vec_librispeech/train.sh STAGE [key=value ...]   (SCALE=mini picks configs/mini/, default paper scale)
# Multi-GPU: NPROC=8 wav2vec_librispeech/train.sh qat4 train.gradient_accumulation_steps=1 train.per_device_train_batch_size=4
#   (torchrun; keep per-device batch x accumulation x GPUs = 32; extra torchrun flags via TORCHRUN_ARGS, e.g.
#   TORCHRUN_ARGS="--nnodes 2 --node_rank 0 --master_addr HOST --master_port 29500" for multi-node)
exec bash "$(dirname "$0")/../common/run_stage.sh" wav2vec_librispeech "$@"
