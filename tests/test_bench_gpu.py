"""benchmarks/bench_gpu.py on the CPU: its CUDA guard, its pure helpers, and render() on synthetic records (the
numbers below are test inputs, not measurements)."""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_gpu  # noqa: E402
import report  # noqa: E402

import common  # noqa: E402

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given where CUDA is unavailable")


@no_cuda
def test_exits_with_a_clear_message_without_cuda(tmp_path):
    out = tmp_path / "gpu.jsonl"
    with pytest.raises(SystemExit, match=r"benchmarks/bench_gpu\.py: needs a CUDA GPU"):
        bench_gpu.main(["--json", str(out)])
    assert not out.exists()  # nothing attempted, nothing recorded
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "--parts", "linears"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "needs a CUDA GPU" in p.stderr


@no_cuda
def test_gpu_check_script_says_there_is_nothing_to_check(tmp_path):
    p = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True,
                       timeout=120, env={**os.environ, "PY": sys.executable, "OUT": str(tmp_path / "out")})
    assert p.returncode == 2 and "no CUDA GPU here" in p.stderr and not (tmp_path / "out").exists()


def test_rejects_unknown_parts():
    with pytest.raises(SystemExit) as e:
        bench_gpu.main(["--parts", "linears,bogus"])
    assert e.value.code == 2  # argparse's usage error, before the CUDA check


def test_operands_are_2_4_pruned_4bit_codes():
    g = torch.Generator().manual_seed(0)
    w = bench_gpu.pruned_weight(32, 64, g)
    assert w.dtype == torch.float32 and common.check_nm(w) and int((w == 0).sum()) == w.numel() // 2
    wq, xq = bench_gpu.int8_operands(w, 20, g)
    assert wq.dtype == xq.dtype == torch.int8 and xq.shape == (20, 64) and wq.shape == w.shape
    assert common.check_nm(wq) and not wq[w == 0].any()  # pruned stays pruned
    assert -7 <= int(wq.min()) and int(wq.max()) <= 7 and -8 <= int(xq.min()) and int(xq.max()) <= 7


def test_shape_and_dtype_constraints():
    from torch.sparse import SparseSemiStructuredTensorCUSPARSELT as CSLT
    from torch.sparse import SparseSemiStructuredTensorCUTLASS as CUTLASS
    for cls in (CSLT, CUTLASS):  # every BERT-base shape fits both backends in fp16 and int8
        for out_f, in_f in bench_gpu.SHAPES.values():
            for dtype in bench_gpu.DTYPES.values():
                assert bench_gpu.sparse_shape_reason(cls, dtype, out_f, in_f) is None
    assert "16x128" in bench_gpu.sparse_shape_reason(CUTLASS, torch.int8, 768, 64)
    assert "not 8x768" in bench_gpu.sparse_shape_reason(CSLT, torch.float16, 8, 768)
    assert "no torch.float64 support" in bench_gpu.sparse_shape_reason(CSLT, torch.float64, 768, 768)
    assert bench_gpu.int_mm_reason(bench_gpu.TOKENS, 768, 3072) is None
    assert "m > 16" in bench_gpu.int_mm_reason(16, 768, 768)
    assert bench_gpu.int_mm_reason(4608, 770, 768) and bench_gpu.int_mm_reason(4608, 768, 772)


def test_linear_record_speedup_and_goal():
    d, s = {"gpu_ms": 0.1, "wall_ms": 0.2}, {"gpu_ms": 0.08, "wall_ms": 0.3}
    r = bench_gpu.linear_record("fp16", "cusparselt", "FFN up", 3072, 768, d, s, {"max_abs_diff": 0.0})
    assert r["speedup"] == 1.25 and r["goal_met"] is False and r["tokens"] == 12 * 384
    r = bench_gpu.linear_record("fp16", "cusparselt", "FFN up", 3072, 768, d, {"gpu_ms": 0.05, "wall_ms": 0.1})
    assert r["speedup"] == 2.0 and r["goal_met"] is True
    r = bench_gpu.linear_record("int8", "cutlass", "FFN up", 3072, 768, d, None, unsupported="RuntimeError: no")
    assert r["speedup"] is None and r["goal_met"] is None and r["sparse_ms"] is None and r["unsupported"]


def _args(**kw):
    return argparse.Namespace(**{"train_iters": 10, "train_warmup": 3, "train": bench_gpu.TRAIN,
                                 "device": torch.device("cuda"), **kw})


def _meta(run):
    return {"gpu": "NVIDIA H200", "sm": "9.0", "torch": "2.14.1", "cuda": "13.0", "cusparselt": 801,
            "command": "python benchmarks/bench_gpu.py", "run": run, "date": run}


def _synthetic():
    t = lambda ms: {"gpu_ms": ms, "wall_ms": ms * 2}  # noqa: E731
    cutlass_sm8x = "RuntimeError: sparse_semi_structured_mad_op : Supported only on GPUs with compute capability 8.x"
    recs = []
    for (layer, (o, i)), sp in zip(bench_gpu.SHAPES.items(), (0.066, 0.07, 0.074)):
        recs += [bench_gpu.linear_record("fp16", "cusparselt", layer, o, i, t(0.1), t(sp),
                                         {"max_abs_diff": 0.0312, "max_abs_dense": 90.0}),
                 bench_gpu.linear_record("fp16", "cutlass", layer, o, i, t(0.1), None, unsupported=cutlass_sm8x),
                 bench_gpu.linear_record("int8", "cusparselt", layer, o, i, t(0.05), t(0.045),
                                         {"max_abs_diff": 0.0, "max_abs_dense": 900.0, "exact": True}),
                 bench_gpu.linear_record("int8", "cutlass", layer, o, i, t(0.05), None, unsupported=cutlass_sm8x)]
    recs = [{**r, **_meta("2027-01-02T00:00:00+00:00")} for r in recs]
    old = {**recs[0], **_meta("2027-01-01T00:00:00+00:00"), "dense_ms": 9.8765}  # an older run: replaced
    err = {"part": "e2e", "error": "RuntimeError: boom | `x`", **_meta("2027-01-02T00:00:00+00:00")}
    train = {**bench_gpu.train_record("bert", _args(gpu_name="NVIDIA H200"),
                                      {"fp": 0.05, "w4a4": 0.054, "w4a4_2:4": 0.0545, "w4a4_2:4_kd": 0.07},
                                      {"fp": 1000.0, "w4a4": 1100.0, "w4a4_2:4": 1150.0, "w4a4_2:4_kd": 1600.0}, 12.0),
             **_meta("2027-01-02T00:00:00+00:00")}
    return [old] + recs + [err, train]


def test_render_tables_verdicts_and_errors():
    md = bench_gpu.render(_synthetic())
    assert md.startswith("## GPU") and "GPU: NVIDIA H200 (compute capability 9.0)" in md and "cuSPARSELt 801" in md
    assert "9.8765" not in md  # only each part's latest run
    assert "| fp16 | cusparselt | attention q/k/v/output | 768x768 | 0.1000 | 0.0660 | 1.51x | met | " \
           "max abs diff 0.0312 (of 90) |" in md
    assert "| fp16 | cusparselt | FFN down | 768x3072 | 0.1000 | 0.0740 | 1.35x | met |" in md
    assert "| int8 | cusparselt | FFN up | 3072x768 | 0.0500 | 0.0450 | 1.11x | missed | exact |" in md
    assert ("| fp16 | cutlass | FFN up | 3072x768 | 0.1000 | unsupported: RuntimeError: sparse_semi_structured_mad_op"
            " : Supported only on GPUs with compute capability 8.x |  | n/a |  |") in md
    assert "- fp16 cusparselt: met (1.51x, 1.43x, 1.35x)" in md
    assert "- int8 cusparselt: missed (1.11x, 1.11x, 1.11x)" in md
    assert "- fp16 cutlass: n/a (unsupported)" in md and "- int8 cutlass: n/a (unsupported)" in md
    assert "**Failed:** RuntimeError: boom \\| 'x'" in md  # error records shown, markdown-safe
    assert "#### bert: 12 layers, batch 12 x seq 384" in md
    assert "| W4A4+2:4 | 0.0545 | 1.090 | ≤ 1.10x: met | 1150.0 | 1.15 | ≤ 1.30x: met |" in md
    assert "| W4A4+2:4 +KD teacher | 0.0700 | 1.400 | ≤ 1.45x: met | 1600.0 | 1.6 |  |" in md
    assert "No GPU measurements yet" in bench_gpu.render([])


def test_render_e2e_and_partial_goal():
    e2e = {"part": "e2e", "model": "bert-base QA", "batch": 12, "seq": 384, "dtype": "fp16", "recipe": "W4A4 + 2:4",
           "compile": "auto", "variants": {n: bench_gpu.E2E_LABEL[n] for n in ("fp", "dense", "sparse_cusparselt",
                                                                                "sparse_cutlass")},
           "gpu_ms": {"fp": 8.0, "dense": 10.0, "sparse_cusparselt": 8.0}, "wall_ms": {"fp": 9.0, "dense": 25.0,
                                                                                     "sparse_cusparselt": 24.0},
           "speedup_vs_fp": {"fp": 1.0, "dense": 0.8, "sparse_cusparselt": 1.0},
           "sparse_speedup_vs_dense": {"sparse_cusparselt": 1.25}, "max_abs_diff_vs_dense": {"sparse_cusparselt": 0.01},
           "converted": {"cusparselt": 72, "cutlass": 72}, "skipped": {"cusparselt": {}, "cutlass": {}},
           "errors": {"sparse_cutlass": "RuntimeError: sm8x only"}, **_meta("2027-01-02T00:00:00+00:00")}
    lin = [{**bench_gpu.linear_record("fp16", "cusparselt", "a", 768, 768, {"gpu_ms": 0.1, "wall_ms": 0.1},
                                      {"gpu_ms": 0.05, "wall_ms": 0.1}, {"max_abs_diff": 0, "max_abs_dense": 1}),
            **_meta("r")},
           {**bench_gpu.linear_record("fp16", "cusparselt", "b", 768, 3072, None, None, unsupported="no"),
            **_meta("r")}]
    md = bench_gpu.render([e2e] + lin)
    assert "| W4A4+2:4, to_semi_structured(backend='cusparselt') | 8.00 | 24.00 | 1.00x | 1.25x |" in md
    assert "| W4A4+2:4, to_semi_structured(backend='cutlass') | failed: RuntimeError: sm8x only | | | |" in md
    assert "cusparselt: 72 converted, 0 skipped" in md
    assert "- fp16 cusparselt: met on the 1 of 2 shapes measured (2.00x)" in md


def test_train_record_is_read_by_the_cpu_report():
    rec = _synthetic()[-1]
    md = report.render([rec], "results/benchmarks_gpu.jsonl")
    assert "## bert: 12 layers, batch 12 x seq 384" in md and "Hardware: GPU NVIDIA H200 (host CPU" in md
    assert "| W4A4+2:4 | 0.054 | 1.090 | ≤ 1.10x: met |" in md


def test_gpu_variant_keeps_the_gpu_paths(eager_quantizers):
    """FP keeps SDPA attention and ATen's dropout (use_fast_dropout is for CPU training only); the compressed
    variants run the quantized attention."""
    import bench_train_step as bts
    from common.fast_dropout import FastDropout
    ns = argparse.Namespace(model="bert", layers=1, device=torch.device("cpu"))
    from transformers import BertConfig, BertForQuestionAnswering
    cfg = BertConfig(vocab_size=20000, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,  # ids < 20000
                     intermediate_size=128, attn_implementation="sdpa")
    base = BertForQuestionAnswering(cfg)
    batch = bts.make_batch("bert", 1, 16)
    fp, kd = bench_gpu.gpu_variant(ns, "fp", base, batch, ns.device)
    q, qkd = bench_gpu.gpu_variant(ns, "w4a4_2:4_kd", base, batch, ns.device)
    assert kd is None and fp.config._attn_implementation == "sdpa"
    assert not any(isinstance(m, FastDropout) for m in list(fp.modules()) + list(q.modules()))
    assert q.config._attn_implementation == "compressed" and common.compressed_linears(q)
    assert qkd.teacher.config._attn_implementation == "sdpa"


def test_report_page_gains_the_gpu_section(tmp_path):
    """benchmarks/report.py appends bench_gpu's section where its records exist, and names a broken line."""
    train = _synthetic()[-1]
    cpu, gpu, out = tmp_path / "b.jsonl", tmp_path / "g.jsonl", tmp_path / "b.md"
    cpu.write_text(json.dumps({**train, "part": None}) + "\n")
    report.main([str(cpu), "--out", str(out), "--gpu", str(tmp_path / "none.jsonl")])
    assert "## GPU" not in out.read_text()
    gpu.write_text("\n".join(json.dumps(r) for r in _synthetic()) + "\n")
    report.main([str(cpu), "--out", str(out), "--gpu", str(gpu)])
    md = out.read_text()
    assert "## GPU" in md and "### 2:4 semi-structured linears vs dense" in md
    gpu.write_text('{"gpu": "x"}\n')
    with pytest.raises(SystemExit, match=r"g.jsonl:1: not a GPU benchmark record"):
        report.main([str(cpu), "--out", str(out), "--gpu", str(gpu)])


def test_smoke_runs_every_part_on_the_cpu(tmp_path, eager_quantizers):
    """--smoke: the script's own code, every part, at tiny sizes on the CPU (no GPU was ever lent to check it there).
    What needs CUDA fails as recorded reasons; everything else runs and lands in the records."""
    out = tmp_path / "smoke.jsonl"
    recs = bench_gpu.main(["--smoke", "--iters", "1", "--train-iters", "1", "--train-warmup", "0", "--json", str(out)])
    assert [json.loads(line) for line in out.read_text().splitlines()] == recs
    assert all(r["smoke"] and "error" not in r for r in recs)
    lin = [r for r in recs if r["part"] == "linears"]
    assert len(lin) == len(bench_gpu.SHAPES) * len(bench_gpu.DTYPES) * len(bench_gpu.BACKENDS)
    assert all(r["dense_ms"] > 0 and r["tokens"] == bench_gpu.SMOKE["tokens"] and r["unsupported"] for r in lin)
    (e2e,) = [r for r in recs if r["part"] == "e2e"]
    assert set(e2e["gpu_ms"]) == {"fp", "frozen", "dense"} and set(e2e["errors"]) == {"sparse_cusparselt",
                                                                                      "sparse_cutlass"}
    assert e2e["max_abs_diff_vs_dense"] == {"frozen": 0.0}  # the dense stand-in computes what the frozen model does
    assert e2e["layers"] == 1 and e2e["batch"] == 2
    train = {r["model"]: r for r in recs if r["part"] == "train"}
    assert set(train) == {"bert", "vit"}
    assert all(set(r["step_s"]) == set(bench_gpu.bts.VARIANTS) for r in train.values())
    assert all(r["peak_mib"] == {} and r["memory"] == "not measured (--smoke)" for r in train.values())
    md = bench_gpu.render(recs)
    assert md.count("**Smoke run (--smoke)") == 3 and ": met" not in md and ": missed" not in md
    real = [r for r in _synthetic()[1:] if r["part"] != "e2e"]  # measured linears and train replace their smoke
    md = bench_gpu.render(recs + real)
    assert md.count("**Smoke run (--smoke)") == 1 and "### End-to-end" in md
