# Two commands do all the set-up: `make test` and `make reproduce` (each creates .venv on first use).
SHELL := /bin/bash
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
SCALE ?= mini
RUNS_DIR ?= runs
QUICK ?= 0
FORCE ?= 0
ISOLATE ?= 0
SEEDS ?= 1
NPROC ?= 1
PIPELINES ?= bert_squad vit_imagenet wav2vec_librispeech
RESULTS_DIR ?= results
OVERRIDES ?=
TEST_WORKERS ?= 2

.PHONY: test reproduce results venv clean-venv bench bench-gpu gpu-check

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-nodeps.txt
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -r requirements.txt
	$(VPY) -m pip install -q --no-deps -r requirements-nodeps.txt
	touch $@

# 2 pytest-xdist workers (the CI machine's 2 cores; TEST_WORKERS=0: one process), grouped as tests/conftest.py says
test: venv
	$(VPY) -m pytest -q tests $(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadgroup)

# The main job: every stage (and ablation) of every pipeline at SCALE, then results/ regenerated from the runs.
reproduce: venv
	$(VPY) reproduce.py --scale $(SCALE) --runs-dir $(RUNS_DIR) --quick $(QUICK) --force $(FORCE) --isolate $(ISOLATE) --seeds $(SEEDS) --nproc $(NPROC) --results-dir $(RESULTS_DIR) --pipelines $(PIPELINES) $(if $(strip $(OVERRIDES)),--set $(OVERRIDES))

results: venv
	$(VPY) results/make_results.py $(RUNS_DIR) --out $(RESULTS_DIR)

# CPU step-time and peak-memory ratios (run on a quiet machine), appended to results/benchmarks.jsonl, then
# results/benchmarks.md rewritten from all the lines there
bench: venv
	$(VPY) benchmarks/bench_train_step.py --model bert --iters 10 --json results/benchmarks.jsonl
	$(VPY) benchmarks/bench_train_step.py --model vit --iters 10 --json results/benchmarks.jsonl
	$(VPY) benchmarks/bench_train_step.py --model wav2vec2 --iters 10 --json results/benchmarks.jsonl
	$(VPY) benchmarks/report.py results/benchmarks.jsonl --out results/benchmarks.md

# the same on a CUDA GPU, with 2:4 semi-structured linear speed and BERT-base inference (benchmarks/bench_gpu.py)
bench-gpu: venv
	$(VPY) benchmarks/bench_gpu.py --json results/benchmarks_gpu.jsonl
	$(VPY) benchmarks/report.py results/benchmarks.jsonl --out results/benchmarks.md

# every GPU check in one go: the library's tests on the GPU, then bench_gpu.py (logs and records in results/gpu_check)
gpu-check: venv
	PY=$(VPY) bash benchmarks/gpu_check.sh

clean-venv:
	rm -rf $(VENV)
