"""Training-step time and peak memory of FP vs compressed recipes, measured in one run; prints ratios.

    python benchmarks/bench_train_step.py --model bert --layers 2 --batch 2 --seq 384 [--json results/benchmarks.jsonl]
Step times come from the same process, interleaved, so machine load affects all variants alike. Peak memory
(on by default) runs each variant alone in a fresh child process (all started together) and reads the kernel's
peak resident set (VmHWM) minus the resident set before the model was built: model, teacher, gradients,
optimizer state and activations of full steps (AdamW), without the interpreter and library baseline; memory freed
by building and preparing the model is returned to the OS before the steps (see `_release_freed_memory`).
`benchmarks/report.py` turns the JSON lines into results/benchmarks.md.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
from common.runs import cpu_model  # noqa: E402

# settings that change the timings, recorded with them
ENV_RECORDED = ("GLIBC_TUNABLES", "OMP_NUM_THREADS", "LD_PRELOAD", "COMMON_COMPILE", "COMMON_INT_MATMUL")

VARIANTS = {
    "fp": None,
    "w4a4": dict(sparsity=None),
    "w4a4_2:4": dict(),
    "w4a4_2:4_kd": dict(),
}


def cpu_name() -> str:
    return f"{cpu_model()}, {torch.get_num_threads()} threads"


def build(model: str, layers: int):
    if model == "bert":
        from transformers import BertConfig, BertForQuestionAnswering
        cfg = BertConfig(num_hidden_layers=layers, attn_implementation="sdpa")
        return BertForQuestionAnswering(cfg)
    if model == "wav2vec2":
        # Wav2vec2.0-large's transformer (the paper's model: layer-norm conv front end, stable layer norm), its
        # feature encoder frozen as in CTC fine-tuning
        from transformers import Wav2Vec2Config, Wav2Vec2ForCTC
        cfg = Wav2Vec2Config(hidden_size=1024, num_hidden_layers=layers, num_attention_heads=16,
                             intermediate_size=4096, feat_extract_norm="layer", do_stable_layer_norm=True,
                             conv_bias=True, vocab_size=32, attn_implementation="sdpa")
        m = Wav2Vec2ForCTC(cfg)
        m.freeze_feature_encoder()
        return m
    if model == "vit":
        import timm
        return timm.create_model("vit_base_patch16_224", pretrained=False, depth=layers, num_classes=1000)
    raise ValueError(model)


def make_batch(model: str, batch: int, seq: int):
    g = torch.Generator().manual_seed(0)
    if model == "bert":
        return dict(input_ids=torch.randint(1000, 20000, (batch, seq), generator=g),
                    attention_mask=torch.ones(batch, seq, dtype=torch.long),
                    start_positions=torch.randint(0, seq, (batch,), generator=g),
                    end_positions=torch.randint(0, seq, (batch,), generator=g))
    if model == "wav2vec2":  # `seq` frames of 20 ms (320 samples) each, 50 target characters
        return dict(input_values=torch.randn(batch, seq * 320 + 80, generator=g),
                    labels=torch.randint(1, 32, (batch, 50), generator=g))
    return dict(x=torch.randn(batch, 3, 224, 224, generator=g), y=torch.randint(0, 1000, (batch,), generator=g))


def model_inputs(batch: dict) -> dict:
    """The batch without its targets (what the teacher and calibration see)."""
    return {k: v for k, v in batch.items() if "positions" not in k and k not in ("labels", "y")}


def step_fn(model_kind, model, batch, distiller):
    if model_kind != "vit":
        out = model(**batch)
        loss = out.loss
        if distiller is not None:
            loss = distiller(loss, out, distiller.teacher_outputs(**model_inputs(batch)))
    else:
        logits = model(batch["x"])
        loss = torch.nn.functional.cross_entropy(logits, batch["y"])
        if distiller is not None:
            loss = distiller(loss, logits, distiller.teacher_outputs(batch["x"]))
    loss.backward()


def build_variant(args, name, base, batch, inplace=False, fast_dropout=True):
    kw = VARIANTS[name]
    distiller = common.DistillationLoss(copy.deepcopy(base)) if name.endswith("_kd") else None
    m = (base if inplace else copy.deepcopy(base)).train()
    if kw is not None:
        common.prepare(m, common.Recipe(**kw))
        calib = model_inputs(batch)
        common.calibrate(m, [calib["x"] if args.model == "vit" else calib])
        m.train()
    # as the pipelines train on CPU: every variant, FP included, with the fast dropout (ATen's serial CPU dropout
    # made the FP step slower and the ratios look better; on a GPU they keep ATen's); the KD teacher reuses the
    # student's frozen wav2vec2 feature encoder
    if fast_dropout:
        common.use_fast_dropout(m)
    if distiller is not None and args.model == "wav2vec2":
        distiller.share_frozen(m, "wav2vec2.feature_extractor")
    return m, distiller


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _release_freed_memory() -> None:
    """Hand memory freed while building/preparing back to the OS and restart the peak from here.

    Choice: `prepare` allocates one-off temporaries (mask sorting, weight copies); glibc keeps their pages
    resident and fragmented (measured: +740 MiB RSS after preparing 12-layer BERT-base, none of it live), which
    then inflates the training peak. Counting what training holds is the CPU analogue of CUDA's
    max_memory_allocated (live tensors only)."""
    import ctypes
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the peak then includes the allocator's leftovers
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        pass


def memory_child(args) -> None:
    """Runs in a fresh process: one variant, a few full training steps (AdamW), prints its peak in MiB."""
    torch.manual_seed(0)
    batch = make_batch(args.model, args.batch, args.seq)
    # choice: the quantizer kernels are compiled before the baseline, since the compiler's memory is a fixed
    # per-process cost like importing torch, not training state (it added ~130 MiB to ViT's peak otherwise)
    common.kernels.warm_up()
    _release_freed_memory()
    rss0 = _status_kib("VmRSS")
    m, distiller = build_variant(args, args.memory_child, build(args.model, args.layers), batch, inplace=True)
    _release_freed_memory()
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-5)
    for _ in range(3):
        opt.zero_grad(set_to_none=True)
        step_fn(args.model, m, batch, distiller)
        opt.step()
    print(json.dumps({"peak_mib": round((_status_kib("VmHWM") - rss0) / 1024, 1)}))


# Choice: the memory children run with glibc's mmap threshold fixed at 64 KiB, so every tensor-sized allocation
# is mapped on its own and unmapped when freed: the peak resident set then follows the live tensors (the same to
# 0.1 MiB run to run here) rather than heap fragmentation (the dynamic threshold gave +-20 MiB on ViT-2).
MEMORY_ENV = {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=65536"}


def memory_env() -> dict:
    """MEMORY_ENV, where the caller's environment does not set those variables itself."""
    return {k: os.environ.get(k, v) for k, v in MEMORY_ENV.items()}


def measure_memory(args) -> dict:
    """Every variant's peak, its children started together: each reads its own process's peak, and none is timed,
    so they need not wait for each other (4 one-after-another children took most of a short run)."""
    env = {**os.environ, **memory_env()}
    children = {}
    for name in VARIANTS:
        cmd = [sys.executable, __file__, "--model", args.model, "--layers", str(args.layers), "--batch",
               str(args.batch), "--seq", str(args.seq), "--memory-child", name]
        children[name] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    outputs = {name: p.communicate() for name, p in children.items()}
    failed = [name for name, p in children.items() if p.returncode != 0]
    if failed:
        raise RuntimeError(f"the peak-memory child of {failed[0]} failed:\n{outputs[failed[0]][1][-3000:]}")
    return {name: json.loads(out.strip().splitlines()[-1])["peak_mib"] for name, (out, _) in outputs.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["bert", "vit", "wav2vec2"], default="bert")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=384, help="tokens (bert) or 20 ms frames (wav2vec2); vit: 224^2")
    ap.add_argument("--iters", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--json", type=str, default=None, help="append the result as one JSON line to this file")
    ap.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory children")
    ap.add_argument("--compile-model", action="store_true",
                    help="torch.compile every variant's model, FP included (the KD teacher stays eager); implies "
                         "--no-memory, as the compiler's own memory would count in the peak")
    ap.add_argument("--memory-child", choices=list(VARIANTS), default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.memory_child:
        return memory_child(args)
    torch.manual_seed(0)
    base = build(args.model, args.layers)
    batch = make_batch(args.model, args.batch, args.seq)
    models, distillers = {}, {}
    for name in VARIANTS:
        models[name], distillers[name] = build_variant(args, name, base, batch)
        if args.compile_model:  # compiled in the first warm-up step
            models[name] = torch.compile(models[name])
    times = {n: [] for n in models}
    for it in range(args.warmup + args.iters):  # interleaved: each round times every variant once
        for n, m in models.items():
            m.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            step_fn(args.model, m, batch, distillers[n])
            if it >= args.warmup:
                times[n].append(time.perf_counter() - t0)
    med = {n: statistics.median(v) for n, v in times.items()}
    res = {"model": args.model, "layers": args.layers, "batch": args.batch, "seq": args.seq,
           "iters": args.iters, "threads": torch.get_num_threads(), "cpu": cpu_name(),
           "env": {k: os.environ[k] for k in ENV_RECORDED if k in os.environ},
           "compile": common.kernels.compile_mode(), "int_matmul": common.int_matmul.describe(),
           "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "command": "python benchmarks/bench_train_step.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
           **({"model_compiled": True} if args.compile_model else {}),
           "step_s": {n: round(v, 4) for n, v in med.items()},
           "ratio_vs_fp": {n: round(v / med["fp"], 3) for n, v in med.items()}}
    if args.memory and not args.compile_model:
        peaks = measure_memory(args)
        res["memory_env"] = memory_env()
        res["peak_mib"] = peaks
        res["peak_ratio_vs_fp"] = {n: round(v / peaks["fp"], 3) for n, v in peaks.items()}
    print(json.dumps(res, indent=1))
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(res) + "\n")
    return res


if __name__ == "__main__":
    main()
