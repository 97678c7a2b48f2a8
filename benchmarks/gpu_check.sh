#!/usr/bin/env bash
# Every GPU check of the project in one command (issue #9): the library's tests on the GPU (those taking the
# `device` fixture, the 2:4 semi-structured ones, `common` under FSDP2 with nccl, and BERT's Trainer FSDP2 with the
# KD teacher sharded where `datasets` is installed), then benchmarks/bench_gpu.py.
# Needs a CUDA GPU and the packages of requirements.txt (jiwer and soundfile are not used; without datasets the
# pipeline test is skipped). ~8-10 min on an H200.
#   bash benchmarks/gpu_check.sh        # PY: the interpreter (default .venv/bin/python, else python3)
#                                       # OUT: where the logs and records go (default results/gpu_check)
# Then, where results/ lives: cat OUT/benchmarks_gpu.jsonl >> results/benchmarks_gpu.jsonl &&
#   python benchmarks/report.py         # rewrites results/benchmarks.md with its GPU section
set -o pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
OUT=${OUT:-results/gpu_check}
"$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'gpu_check.sh: no CUDA GPU here, so \
nothing to check (python benchmarks/bench_gpu.py --smoke runs the benchmark code on the CPU)')" || exit 2
mkdir -p "$OUT"
rc=0
"$PY" -m pytest -q -p no:cacheprovider tests/test_common_kernels.py tests/test_common_models.py \
    tests/test_common_architectures.py tests/test_common_sparsity.py tests/test_export.py tests/test_bench_gpu.py \
    tests/test_distributed.py \
    -k "cuda or gpu" \
    2>&1 | tee "$OUT/gpu_tests.log" || rc=1
"$PY" benchmarks/bench_gpu.py --json "$OUT/benchmarks_gpu.jsonl" 2>&1 | tee "$OUT/bench_gpu.log" || rc=1
echo "gpu_check.sh: exit $rc; logs and records in $OUT"
exit $rc
