"""GPU benchmarks: 2:4 semi-structured linears vs dense (fp16, int8), BERT-base SQuAD inference with the 2:4
linears, and the training-step ratios of bench_train_step.py; the GPU model is recorded with every number.

    python benchmarks/bench_gpu.py [--parts linears,e2e,train] [--iters N] [--json results/benchmarks_gpu.jsonl]
    python benchmarks/bench_gpu.py --smoke     # no GPU: every part on the CPU at tiny sizes, in seconds

linears: M = 12 x 384 tokens (the paper's SQuAD batch) through BERT-base's weight shapes (out, in): 768x768
  (attention q/k/v/output), 3072x768 (FFN up), 768x3072 (FFN down), 2:4-pruned with common.nm_mask. fp16: F.linear
  with the dense weight (cuBLAS) vs with torch's SparseSemiStructuredTensor of it (cuSPARSELt and CUTLASS, each
  timed). int8 (4-bit codes, exact int32 sums): torch._int_mm vs torch._cslt_sparse_mm / _sparse_semi_structured_mm
  with out_dtype=int32. A backend that cannot run a case gets its error as the reason, not a number. Goal: >= 1.3x.
e2e: BERT-base QA in fp16, FP vs common.prepare(Recipe()) -> calibrate -> convert, its 2:4 linears dense (the same
  layers, weights stored dense) vs common.export.to_semi_structured (sparse).
train: bench_train_step's variants (FP, W4A4, W4A4+2:4, +KD) on the GPU: step time ratios and peak memory.
Times: GPU time from CUDA events with Python's launch overhead hidden behind a queued torch.cuda._sleep (the
kernels' time), and wall time of synchronized calls (what eager code waits); medians. A part that raises is recorded
as {"part", "error"} and the next part runs; the exit status is then non-zero. `render(records)` makes the markdown.
--smoke runs the same code on the CPU at tiny sizes (its records say "smoke": true, its times are CPU wall times and
mean nothing; the 2:4 kernels then fail and are recorded as such): device time is scarce, so the script's own code
is checked where there is no GPU.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import shlex
import statistics
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_train_step as bts  # noqa: E402
import common  # noqa: E402
from common.runs import cpu_model  # noqa: E402

PARTS = ("linears", "e2e", "train")
TOKENS = 12 * 384  # the paper's BERT-base SQuAD batch: 12 sequences of 384 tokens
E2E = dict(layers=12, batch=12, seq=384)
SHAPES = {"attention q/k/v/output": (768, 768), "FFN up": (3072, 768), "FFN down": (768, 3072)}  # (out, in)
DTYPES = {"fp16": torch.float16, "int8": torch.int8}
BACKENDS = ("cusparselt", "cutlass")
GOAL = 1.3          # 2:4 linear speed-up over dense (issue)
LINEAR_REPS = 20    # back-to-back calls per timed sample: a linear takes tens of microseconds
# the paper's training shapes on the GPU (the CPU script runs 2 layers, batch 2); seq is unused by vit (224² images)
# and kept as bench_train_step records it
TRAIN = {"bert": dict(layers=12, batch=12, seq=384), "vit": dict(layers=12, batch=64, seq=384)}
# --smoke: the same parts on the CPU at sizes that take seconds (the weight shapes stay BERT-base's)
SMOKE = dict(tokens=32, e2e=dict(layers=1, batch=2, seq=16),
             train={"bert": dict(layers=1, batch=2, seq=16), "vit": dict(layers=1, batch=2, seq=16)})
E2E_LABEL = {"fp": "FP BERT-base, fp16, SDPA attention",
             "frozen": "W4A4+2:4 as common.convert leaves it (4-bit codes dequantized every call)",
             "dense": "W4A4+2:4, the 2:4 linears' fp16 weights stored dense (cuBLAS)",
             "sparse_cusparselt": "W4A4+2:4, to_semi_structured(backend='cusparselt')",
             "sparse_cutlass": "W4A4+2:4, to_semi_structured(backend='cutlass')"}


# -- operands and constraints (pure CPU, tested) -------------------------------------------------------------------
def pruned_weight(out_f: int, in_f: int, gen: torch.Generator) -> torch.Tensor:
    """A random float32 weight, 2:4-pruned along its input dimension as the compressed models are."""
    w = torch.randn(out_f, in_f, generator=gen)
    return w * common.nm_mask(w)


def int8_operands(w: torch.Tensor, tokens: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """4-bit codes in int8 (the paper's W4A4): weight codes in [-7, 7] at w's kept positions, 0 at its pruned ones;
    input codes in [-8, 7]. Every int32 sum is exact (|sum| <= 56 k), so sparse and dense must agree bit for bit."""
    wq = torch.randint(-7, 8, tuple(w.shape), generator=gen, dtype=torch.int8).masked_fill_(w == 0, 0)
    return wq, torch.randint(-8, 8, (tokens, w.shape[1]), generator=gen, dtype=torch.int8)


def sparse_shape_reason(cls, dtype: torch.dtype, out_f: int, in_f: int) -> str | None:
    """Why torch's 2:4 tensor class `cls` cannot hold an (out_f, in_f) weight of `dtype` (its
    _DTYPE_SHAPE_CONSTRAINTS), or None if it can."""
    c = cls._DTYPE_SHAPE_CONSTRAINTS.get(dtype)
    if c is None:
        return f"{cls.BACKEND}: no {dtype} support in torch {torch.__version__}"
    if out_f < c.sparse_min_rows or out_f % c.sparse_min_rows or in_f < c.sparse_min_cols or in_f % c.sparse_min_cols:
        return f"{cls.BACKEND}: a {dtype} weight must be a multiple of {c.sparse_min_rows}x{c.sparse_min_cols}, " \
               f"not {out_f}x{in_f}"
    return None


def int_mm_reason(m: int, k: int, n: int) -> str | None:
    """Why torch._int_mm cannot multiply (m, k) by (k, n) int8 on CUDA (m > 16, k and n multiples of 8), or None."""
    if m <= 16 or k % 8 or n % 8:
        return f"torch._int_mm on CUDA needs m > 16 and k, n multiples of 8; got m={m}, k={k}, n={n}"
    return None


def linear_record(dtype: str, backend: str, layer: str, out_f: int, in_f: int, dense: dict | None,
                  sparse: dict | None, check: dict | None = None, unsupported: str | None = None,
                  tokens: int = TOKENS) -> dict:
    """One (dtype, backend, shape) result; `dense`/`sparse` are time_gpu() dicts, None where not measured."""
    r = {"part": "linears", "dtype": dtype, "backend": backend, "layer": layer, "out_features": out_f,
         "in_features": in_f, "tokens": tokens,
         "dense_ms": dense and dense["gpu_ms"], "sparse_ms": sparse and sparse["gpu_ms"],
         "dense_wall_ms": dense and dense["wall_ms"], "sparse_wall_ms": sparse and sparse["wall_ms"],
         "speedup": None, "goal": GOAL, "goal_met": None, **(check or {})}
    if dense and sparse:
        r["speedup"] = round(dense["gpu_ms"] / sparse["gpu_ms"], 3)
        r["goal_met"] = r["speedup"] >= GOAL
    if unsupported:
        r["unsupported"] = unsupported
    return r


def train_record(kind: str, args, step_s: dict, peak_mib: dict, compile_s: float | None) -> dict:
    """A train result in bench_train_step's record shape (benchmarks/report.py reads it), plus the GPU fields."""
    gpu_name = args.gpu_name
    return {"part": "train", "model": kind, **args.train[kind], "iters": args.train_iters, "warmup": args.train_warmup,
            # "cpu" is the hardware field benchmarks/report.py prints: here it names the GPU
            "cpu": f"GPU {gpu_name} (host CPU {cpu_model()})", "device": gpu_name,
            **compile_info(), "compile_warmup_s": compile_s,
            "int_matmul": f"{common.int_matmul.describe()} (CPU only: unused on the GPU)",
            "float32_matmul_precision": torch.get_float32_matmul_precision(),
            "fp_attention": "model default (SDPA / timm fused); compressed variants: explicit quantized attention",
            "memory": ("torch.cuda.max_memory_allocated above the allocation before the variant was built"
                       if args.device.type == "cuda" else "not measured (--smoke)"),
            **step_ratios(step_s, peak_mib)}


def step_ratios(step_s: dict, peak_mib: dict) -> dict:
    """bench_train_step's result fields (same names, same rounding) from per-variant medians and peaks."""
    return {"step_s": {n: round(v, 4) for n, v in step_s.items()},
            "ratio_vs_fp": {n: round(v / step_s["fp"], 3) for n, v in step_s.items()},
            "peak_mib": peak_mib,
            "peak_ratio_vs_fp": {n: round(v / peak_mib["fp"], 3) for n, v in peak_mib.items()} if peak_mib else {}}


def short(e: BaseException, n: int = 600) -> str:
    """An exception as one line (torch's messages span lines), for records and tables."""
    s = " ".join(f"{type(e).__name__}: {e}".split())
    return s if len(s) <= n else s[: n - 1] + "…"


# -- timing -------------------------------------------------------------------------------------------------------
_cycles_per_ms: float | None = None


def cycles_per_ms() -> float:
    """torch.cuda._sleep cycles per millisecond on this GPU, measured once."""
    global _cycles_per_ms
    if _cycles_per_ms is None:
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(1_000_000)
        s.record()
        torch.cuda._sleep(20_000_000)
        e.record()
        e.synchronize()
        _cycles_per_ms = 20_000_000 / s.elapsed_time(e)
    return _cycles_per_ms


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def release(device: torch.device) -> None:
    """Free what the last measurement left, so the next starts from the same allocator state."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def time_gpu(fn, iters: int, warmup: int = 5, reps: int = 1, device: torch.device = torch.device("cuda")) -> dict:
    """Medians over `iters` samples of one fn() call, in ms: "wall_ms" of synchronized calls, and "gpu_ms" from
    CUDA events around `reps` back-to-back calls queued behind a torch.cuda._sleep that outlasts their launch, so
    that Python's dispatch overhead is hidden and the events time the kernels. On the CPU (--smoke) both are the
    wall time."""
    for _ in range(warmup):
        fn()
    sync(device)
    walls = []
    for _ in range(iters):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        sync(device)
        walls.append((time.perf_counter() - t0) * 1e3)
    if device.type != "cuda":
        wall = round(statistics.median(walls) / reps, 4)
        return {"gpu_ms": wall, "wall_ms": wall}
    sleep = int(cycles_per_ms() * (1.5 * statistics.median(walls) + 1.0))  # > the launch time of the reps
    gpu = []
    for _ in range(iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(sleep)
        s.record()
        for _ in range(reps):
            fn()
        e.record()
        e.synchronize()
        gpu.append(s.elapsed_time(e))
    return {"gpu_ms": round(statistics.median(gpu) / reps, 4), "wall_ms": round(statistics.median(walls) / reps, 4)}


_compile_s: float | None = None


def warm_kernels(device: torch.device) -> float:
    """Compile the quantizer kernels for the device once (common.kernels; a no-op with COMMON_COMPILE=0), seconds
    taken."""
    global _compile_s
    if _compile_s is None:
        t0 = time.perf_counter()
        common.kernels.warm_up(device)
        sync(device)
        _compile_s = round(time.perf_counter() - t0, 1)
    return _compile_s


def compile_info() -> dict:
    """The quantizer kernels' compile mode, and those whose compiling failed and that run eagerly instead."""
    broken = [k.__name__ for k in vars(common.kernels).values() if isinstance(k, common.kernels._Kernel) and k._broken]
    return {"compile": common.kernels.compile_mode(), "compile_fallback_eager": broken}


# -- part 1: linears ----------------------------------------------------------------------------------------------
def sparse_fn(backend: str, cls, dtype: str, w: torch.Tensor, x: torch.Tensor):
    """The 2:4 matmul torch offers for this backend and dtype, as a function of no arguments."""
    ws = cls.from_dense(w)  # what torch.sparse.to_sparse_semi_structured(w) makes with that backend
    if dtype == "fp16":
        return lambda: F.linear(x, ws)  # tokens x out
    # int8: the tensor subclass's mm returns int8 (saturated) sums, so the kernels are called with int32 output,
    # as torch's tests call them; both give W·Xᵀ (out x tokens)
    if backend == "cusparselt":
        return lambda: torch._cslt_sparse_mm(ws.packed, x.t(), out_dtype=torch.int32)
    return lambda: torch._sparse_semi_structured_mm(ws.packed, ws.meta, x.t(), out_dtype=torch.int32)


def part_linears(args, rec) -> None:
    from torch.sparse import SparseSemiStructuredTensorCUSPARSELT, SparseSemiStructuredTensorCUTLASS
    classes = {"cusparselt": SparseSemiStructuredTensorCUSPARSELT, "cutlass": SparseSemiStructuredTensorCUTLASS}
    gen, dev, tokens = torch.Generator().manual_seed(0), args.device, args.tokens
    timed = lambda fn: time_gpu(fn, args.iters, warmup=10, reps=LINEAR_REPS, device=dev)  # noqa: E731
    for layer, (out_f, in_f) in SHAPES.items():
        w = pruned_weight(out_f, in_f, gen)
        x = torch.randn(tokens, in_f, generator=gen)
        w8, x8 = int8_operands(w, tokens, gen)
        operands = {"fp16": (w.half().to(dev), x.half().to(dev)), "int8": (w8.to(dev), x8.to(dev))}
        for dtype, (wd, xd) in operands.items():
            dense_fn = ((lambda: F.linear(xd, wd)) if dtype == "fp16" else (lambda: torch._int_mm(xd, wd.t())))
            dense = ref = dense_err = None
            try:
                reason = int_mm_reason(tokens, in_f, out_f) if dtype == "int8" and dev.type == "cuda" else None
                if reason:
                    raise RuntimeError(reason)
                ref = dense_fn()
                dense = timed(dense_fn)
            except Exception as e:  # noqa: BLE001 -- recorded as the reason of every backend's row
                dense_err = f"dense baseline failed: {short(e)}"
            for backend, cls in classes.items():
                try:
                    if dense is None:
                        raise RuntimeError(dense_err)
                    if backend == "cusparselt" and not torch.backends.cusparselt.is_available():
                        raise RuntimeError("cuSPARSELt is not available in this torch build")
                    reason = sparse_shape_reason(cls, DTYPES[dtype], out_f, in_f)
                    if reason:
                        raise RuntimeError(reason)
                    fn = sparse_fn(backend, cls, dtype, wd, xd)
                    y = fn()
                    y = y if dtype == "fp16" else y.t()
                    diff = float((y.double() - ref.double()).abs().max())
                    check = {"max_abs_diff": diff, "max_abs_dense": float(ref.double().abs().max())}
                    if dtype == "int8":
                        check["exact"] = diff == 0
                    rec(linear_record(dtype, backend, layer, out_f, in_f, dense, timed(fn), check, tokens=tokens))
                except Exception as e:  # noqa: BLE001 -- this backend cannot run this case: the reason, no number
                    rec(linear_record(dtype, backend, layer, out_f, in_f, dense, None, unsupported=short(e),
                                      tokens=tokens))


# -- part 2: end-to-end BERT-base inference -----------------------------------------------------------------------
class _DenseWeight:
    """Stands in for a sparse tensor class in common.export.SemiStructuredLinear: the layer keeps its dequantized,
    masked fp16 weight dense, so the dense and the sparse model differ only in the matmul."""

    @staticmethod
    def from_dense(w):
        return w


def _logits(out) -> torch.Tensor:
    return torch.cat([out.start_logits.float(), out.end_logits.float()])


def part_e2e(args, rec) -> None:
    from common.export import SemiStructuredLinear, semi_structured_skip_reason, to_semi_structured
    dev, size = args.device, args.e2e
    compile_s = warm_kernels(dev)
    torch.manual_seed(0)
    base = bts.build("bert", size["layers"]).eval()  # BertConfig() defaults: BERT-base, SDPA attention, random init
    batch = {k: v.to(dev) for k, v in bts.model_inputs(bts.make_batch("bert", size["batch"], size["seq"])).items()}
    fp = copy.deepcopy(base).to(dev).half().eval()
    m = base.to(dev)
    common.prepare(m, common.Recipe())  # W4A4 + 2:4, attention operands quantized
    m.to(dev)  # prepare creates the activation quantizers on the CPU
    common.calibrate(m, [batch])  # calibrated in float32, as the pipelines do
    common.convert(m)
    # fp16 compute throughout: the frozen layers dequantize their codes in the dtype of their (now fp16) steps
    m.half().eval()
    errors, infos, sparse = {}, {}, {}
    backends = [b for b in BACKENDS if b != "cusparselt" or torch.backends.cusparselt.is_available()]
    for b in backends:
        try:
            sm = copy.deepcopy(m)
            infos[b] = to_semi_structured(sm, torch.float16, backend=b)
            sparse[f"sparse_{b}"] = sm
        except Exception as e:  # noqa: BLE001
            errors[f"sparse_{b}"] = short(e)
    models = {"fp": fp, "frozen": m}
    names = next((i["converted"] for i in infos.values() if i["converted"]), None)
    if not names and dev.type != "cuda":  # --smoke: no backend converts on the CPU; the layers it would take
        names = [n for n, mod in m.named_modules() if isinstance(mod, common.FrozenCompressedLinear)
                 and semi_structured_skip_reason(mod) is None]
    if names:  # the layers to_semi_structured converted, with the same wrapper and a dense weight
        dense = copy.deepcopy(m)
        for name in names:
            parent, _, attr = name.rpartition(".")
            setattr(dense.get_submodule(parent) if parent else dense, attr,
                    SemiStructuredLinear(dense.get_submodule(name), torch.float16, _DenseWeight))
        models["dense"] = dense
    else:
        errors["dense"] = "no layer was converted to 2:4, so there is no same-layers dense model"
    models.update(sparse)
    times, outs = {}, {}
    with torch.no_grad():
        for name, model in models.items():
            try:
                outs[name] = _logits(model(**batch))
                times[name] = time_gpu(lambda: model(**batch), args.iters, warmup=3, device=dev)
            except Exception as e:  # noqa: BLE001 -- e.g. CUTLASS's 2:4 kernels on a GPU they were not built for
                errors[name] = short(e)
    gpu = {n: t["gpu_ms"] for n, t in times.items()}
    ref = outs.get("dense")
    rec({"part": "e2e", "model": f"bert-base QA (BertConfig() defaults: {size['layers']} layers, hidden 768; "
                                  "random init)",
         **size, "dtype": "fp16", "recipe": "common.Recipe(): W4A4 + 2:4",
         "iters": args.iters, "variants": {n: E2E_LABEL[n] for n in models},
         "gpu_ms": gpu, "wall_ms": {n: t["wall_ms"] for n, t in times.items()},
         "speedup_vs_fp": {n: round(gpu["fp"] / v, 3) for n, v in gpu.items()} if "fp" in gpu else {},
         "sparse_speedup_vs_dense": {n: round(gpu["dense"] / gpu[n], 3) for n in gpu
                                     if n.startswith("sparse_") and "dense" in gpu},
         "max_abs_diff_vs_dense": {n: float((o - ref).abs().max()) for n, o in outs.items()
                                   if ref is not None and n not in ("fp", "dense")},
         "converted": {b: len(i["converted"]) for b, i in infos.items()},
         "skipped": {b: i["skipped"] for b, i in infos.items()},
         "errors": errors, **compile_info(), "compile_warmup_s": compile_s})


# -- part 3: training steps ---------------------------------------------------------------------------------------
def gpu_variant(ns, name: str, base, batch, device: torch.device = torch.device("cuda")):
    """bench_train_step.build_variant without use_fast_dropout, which it applies as the pipelines do on CPU: on a
    GPU the pipelines keep ATen's dropout and SDPA's fused attention (common/stage.py), so FP times that path."""
    m, kd = bts.build_variant(ns, name, base, batch, fast_dropout=False)
    # .to(device): prepare creates the activation quantizers on the CPU (calibration only observes, so they may stay
    # there until now); the KD teacher is a copy of the GPU base
    return m.to(device), kd


def peak_mib(ns, name: str, base, batch) -> float:
    """The GPU analogue of bench_train_step.memory_child: this variant alone, three full AdamW steps; the peak of
    live tensors (max_memory_allocated) above what was allocated before the variant was built, with the peak
    restarted after building (prepare's one-off temporaries are not training state)."""
    release(ns.device)
    before = torch.cuda.memory_allocated()
    m, kd = gpu_variant(ns, name, base, batch, ns.device)
    sync(ns.device)
    torch.cuda.reset_peak_memory_stats()
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-5)
    for _ in range(3):
        opt.zero_grad(set_to_none=True)
        bts.step_fn(ns.model, m, batch, kd)
        opt.step()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - before) / 2**20
    del m, kd, opt
    return round(peak, 1)


def time_steps(ns, base, batch, warmup: int, iters: int) -> dict:
    """Median step time (s) per variant, all variants built first and timed interleaved, as bench_train_step does
    (GPU load then affects all alike), each step synchronized before and after."""
    models, kds = {}, {}
    for name in bts.VARIANTS:
        models[name], kds[name] = gpu_variant(ns, name, base, batch, ns.device)
    times = {n: [] for n in models}
    for it in range(warmup + iters):
        for n, m in models.items():
            m.zero_grad(set_to_none=True)
            sync(ns.device)
            t0 = time.perf_counter()
            bts.step_fn(ns.model, m, batch, kds[n])
            sync(ns.device)
            if it >= warmup:
                times[n].append(time.perf_counter() - t0)
    return {n: statistics.median(v) for n, v in times.items()}  # the models are freed on return


def part_train(args, rec) -> None:
    dev = args.device
    compile_s = warm_kernels(dev)
    for kind in args.train_models.split(","):
        cfg = args.train[kind]
        ns = argparse.Namespace(model=kind, layers=cfg["layers"], device=dev)
        torch.manual_seed(0)
        base = bts.build(kind, cfg["layers"]).to(dev)
        batch = {k: v.to(dev) for k, v in bts.make_batch(kind, cfg["batch"], cfg["seq"]).items()}
        step_s = time_steps(ns, base, batch, args.train_warmup, args.train_iters)
        # peak memory from CUDA's allocator only (bench_train_step measures the CPU's)
        peaks = {n: peak_mib(ns, n, base, batch) for n in bts.VARIANTS} if dev.type == "cuda" else {}
        rec(train_record(kind, args, step_s, peaks, compile_s))
        del base, batch
        release(dev)


PART_FNS = {"linears": part_linears, "e2e": part_e2e, "train": part_train}


# -- markdown -----------------------------------------------------------------------------------------------------
def _md(s) -> str:
    return str(s).replace("|", "\\|").replace("`", "'")


def _ms(v) -> str:
    return "" if v is None else f"{v:.4f}" if v < 1 else f"{v:.2f}"


def _compile_text(r: dict) -> str:
    broken = r.get("compile_fallback_eager")
    return f"{r.get('compile')}" + (f" (compiling failed, eager: {', '.join(broken)})" if broken else "")


def _x(v) -> str:
    return "" if v is None else f"{v:.2f}x"


def _render_linears(recs: list[dict]) -> list[str]:
    tokens = recs[0]["tokens"]
    out = [f"2:4-pruned weights x {tokens} tokens{' (12 x 384)' if tokens == TOKENS else ''}. fp16: F.linear with "
           "the dense weight (cuBLAS) vs with "
           "`SparseSemiStructuredTensor<backend>.from_dense(W)`; int8 (4-bit codes): `torch._int_mm` vs "
           "`torch._cslt_sparse_mm` / `torch._sparse_semi_structured_mm` with int32 output. GPU time per call "
           "(launch overhead hidden), median.", "",
           "| dtype | backend | layer | weight (out x in) | dense (ms) | 2:4 sparse (ms) | speed-up | "
           f"goal ≥ {GOAL}x | sparse vs dense |", "|---|---|---|---|---|---|---|---|---|"]
    for r in recs:
        if r.get("unsupported"):
            sparse, goal, check = f"unsupported: {_md(r['unsupported'])}", "n/a", ""
        else:
            sparse, goal = _ms(r["sparse_ms"]), "met" if r["goal_met"] else "missed"
            check = f"max abs diff {r['max_abs_diff']:.3g} (of {r['max_abs_dense']:.3g})"
            if r["dtype"] == "int8":
                check = "exact" if r.get("exact") else f"not exact: {check}"
        out.append(f"| {r['dtype']} | {r['backend']} | {r['layer']} | {r['out_features']}x{r['in_features']} | "
                   f"{_ms(r['dense_ms'])} | {sparse} | {_x(r['speedup'])} | {goal} | {check} |")
    out += ["", f"Goal ≥ {GOAL}x on the linears, per dtype and backend:"]
    for dtype in DTYPES:
        for backend in BACKENDS:
            rows = [r for r in recs if r["dtype"] == dtype and r["backend"] == backend]
            got = [r for r in rows if r["speedup"] is not None]
            if not rows:
                continue
            if not got:
                out.append(f"- {dtype} {backend}: n/a (unsupported)")
                continue
            verdict = "met" if all(r["goal_met"] for r in got) else "missed"
            part = "" if len(got) == len(rows) else f" on the {len(got)} of {len(rows)} shapes measured"
            out.append(f"- {dtype} {backend}: {verdict}{part} ({', '.join(_x(r['speedup']) for r in got)})")
    return out + [""]


def _render_e2e(recs: list[dict]) -> list[str]:
    out = []
    for r in recs:
        out += [f"{r['model']}, batch {r['batch']} x seq {r['seq']}, {r['dtype']}, {r['recipe']}; "
                f"quantizer kernels: {_compile_text(r)}.", "",
                "| Variant | GPU time (ms) | wall (ms) | speed-up vs FP (GPU time) | sparse vs same layers dense |",
                "|---|---|---|---|---|"]
        for n, label in r["variants"].items():
            if n in r["errors"]:
                out.append(f"| {_md(label)} | failed: {_md(r['errors'][n])} | | | |")
                continue
            sp, vs_fp = r["sparse_speedup_vs_dense"].get(n), r["speedup_vs_fp"].get(n)
            out.append(f"| {_md(label)} | {_ms(r['gpu_ms'].get(n))} | {_ms(r['wall_ms'].get(n))} | "
                       f"{_x(vs_fp)} | {_x(sp)} |")
        for n, e in r["errors"].items():
            if n not in r["variants"]:
                out.append(f"| {_md(E2E_LABEL.get(n, n))} | failed: {_md(e)} | | | |")
        conv = ", ".join(f"{b}: {k} converted, {len(r['skipped'].get(b, {}))} skipped"
                         for b, k in r["converted"].items())
        diffs = ", ".join(f"{n}: {d:.3g}" for n, d in r["max_abs_diff_vs_dense"].items())
        out += ["", f"2:4 linears: {conv or 'none converted'}. Max abs diff of the QA logits vs the same layers "
                    f"dense: {diffs or 'n/a'}.", ""]
    return out


def _render_train(recs: list[dict]) -> list[str]:
    import report  # benchmarks/report.py: the same goals and labels as the CPU table
    out = []
    for r in recs:
        shape = f"batch {r['batch']} x 224²" if r["model"] == "vit" else f"batch {r['batch']} x seq {r['seq']}"
        out += [f"#### {r['model']}: {r['layers']} layers, {shape}", "",
                f"{r['iters']} timed steps (interleaved, synchronized), quantizer kernels: {_compile_text(r)}, "
                f"float32 matmul precision: {r.get('float32_matmul_precision')}; FP attention: "
                f"{r.get('fp_attention')}. Peak memory: {r.get('memory')}.", "",
                "| Variant | Step (s) | Step ratio vs FP | Goal | Peak memory (MiB) | Memory ratio vs FP | Goal |",
                "|---|---|---|---|---|---|---|"]
        pr = r.get("peak_ratio_vs_fp", {})
        for v, t in r["step_s"].items():
            ratio = r["ratio_vs_fp"][v]
            goal = (f"≤ {report.GOALS[v]:.2f}x: {report.verdict(ratio, report.GOALS[v])}"
                    if v in report.GOALS and not r.get("smoke") else "")
            mgoal = (f"≤ {report.MEMORY_GOAL:.2f}x: {report.verdict(pr.get(v), report.MEMORY_GOAL)}"
                     if v != "fp" and not v.endswith("_kd") and v in pr else "")
            out.append(f"| {report.VARIANT_LABEL.get(v, v)} | {t:.4f} | {ratio:.3f} | {goal} | "
                       f"{r.get('peak_mib', {}).get(v, '')} | {pr.get(v, '')} | {mgoal} |")
        out.append("")
    return out


TITLES = {"linears": "2:4 semi-structured linears vs dense (BERT-base shapes)",
          "e2e": "End-to-end BERT-base SQuAD inference with the 2:4 linears",
          "train": "Training step time and peak memory on the GPU (bench_train_step's variants)"}
RENDER = {"linears": _render_linears, "e2e": _render_e2e, "train": _render_train}


def render(records: list[dict]) -> str:
    """Markdown "GPU" section from bench_gpu records: each part from its latest run, failed parts named."""
    out = ["## GPU", ""]
    if not records:
        return "\n".join(out + ["No GPU measurements yet: run `python benchmarks/bench_gpu.py --json "
                                "results/benchmarks_gpu.jsonl` on a machine with a CUDA GPU.", ""])
    for part in PARTS:
        recs = [r for r in records if r.get("part") == part]
        if any(not r.get("smoke") for r in recs):  # a --smoke run never hides a measurement
            recs = [r for r in recs if not r.get("smoke")]
        if not recs:
            continue
        last = max(r.get("run", "") for r in recs)  # a rerun replaces the part's older numbers
        recs = [r for r in recs if r.get("run", "") == last]
        r0 = recs[0]
        out += [f"### {TITLES[part]}", "",
                f"GPU: {r0.get('gpu', '?')} (compute capability {r0.get('sm', '?')}) · torch {r0.get('torch', '?')} "
                f"· CUDA {r0.get('cuda', '?')} · cuSPARSELt {r0.get('cusparselt') or 'n/a'} · date: "
                f"{r0.get('date', '?')}", "", f"Command: `{r0.get('command', '?')}`", ""]
        if r0.get("smoke"):
            out += ["**Smoke run (--smoke): CPU, tiny sizes. It checks the script's code paths; its times are CPU "
                    "wall times and measure nothing.**", ""]
        out += [f"**Failed:** {_md(r['error'])}" for r in recs if "error" in r]
        good = [r for r in recs if "error" not in r]
        out += ([""] if len(good) < len(recs) else []) + (RENDER[part](good) if good else [])
    return "\n".join(out)


# -- main ---------------------------------------------------------------------------------------------------------
def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {','.join(PARTS)} (default: all)")
    ap.add_argument("--iters", type=int, default=50, help="timed samples per linear and e2e measurement (median)")
    ap.add_argument("--train-iters", type=int, default=10, help="timed training steps per variant (median)")
    ap.add_argument("--train-warmup", type=int, default=3)
    ap.add_argument("--train-models", default="bert,vit", help="comma-separated, of bert,vit")
    ap.add_argument("--json", type=str, default=None, help="append one JSON line per record to this file")
    ap.add_argument("--smoke", action="store_true",
                    help="no GPU needed: run every part on the CPU at tiny sizes to check this script's code paths "
                         "(CPU wall times, meaningless; records marked \"smoke\")")
    args = ap.parse_args(argv)
    parts = [p for p in args.parts.split(",") if p]
    if not parts or set(parts) - set(PARTS):
        ap.error(f"--parts: expected a comma-separated subset of {','.join(PARTS)}, got {args.parts!r}")
    if set(args.train_models.split(",")) - set(TRAIN):
        ap.error(f"--train-models: expected a comma-separated subset of {','.join(TRAIN)}, got {args.train_models!r}")
    if args.smoke:
        args.device, args.gpu_name = torch.device("cpu"), "none (--smoke on the CPU)"
        args.tokens, args.e2e, args.train = SMOKE["tokens"], SMOKE["e2e"], SMOKE["train"]
    else:
        if not torch.cuda.is_available():
            raise SystemExit("benchmarks/bench_gpu.py: needs a CUDA GPU (torch.cuda.is_available() is False); "
                             "nothing was measured (--smoke checks the script on the CPU)")
        args.device, args.gpu_name = torch.device("cuda"), torch.cuda.get_device_name()
        args.tokens, args.e2e, args.train = TOKENS, E2E, TRAIN
    run = datetime.now(timezone.utc).isoformat(timespec="seconds")  # shared by this run's records
    meta = {"gpu": args.gpu_name, "sm": "%d.%d" % torch.cuda.get_device_capability() if not args.smoke else None,
            "torch": torch.__version__, "cuda": torch.version.cuda, "cusparselt": torch.backends.cusparselt.version(),
            "command": "python benchmarks/bench_gpu.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
            "run": run, **({"smoke": True} if args.smoke else {})}
    records = []

    def rec(r: dict) -> None:
        r = {**r, **meta, "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        records.append(r)
        if args.json:  # written at once: a later crash keeps what was measured
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            with open(args.json, "a") as f:
                f.write(json.dumps(r) + "\n")

    failed, t_start = [], time.perf_counter()
    for part in parts:
        t0 = time.perf_counter()
        try:
            PART_FNS[part](args, rec)
        except Exception as e:  # noqa: BLE001 -- device time is scarce: record it, go on with the next part
            traceback.print_exc()
            failed.append(part)
            rec({"part": part, "error": short(e, 2000)})
        release(args.device)
        print(render([r for r in records if r["part"] == part]))
        print(f"[{part}: {time.perf_counter() - t0:.0f} s]\n", flush=True)
    print(f"[bench_gpu: {time.perf_counter() - t_start:.0f} s in all]")
    if failed:
        raise SystemExit(f"benchmarks/bench_gpu.py: part(s) failed: {', '.join(failed)} (recorded as error records)")
    return records


if __name__ == "__main__":
    main()
