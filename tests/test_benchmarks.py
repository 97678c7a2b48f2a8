"""The benchmark scripts: a real (tiny) measurement through both scripts, and bad records named."""
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_int_matmul  # noqa: E402
import bench_train_step  # noqa: E402
import report  # noqa: E402


HEADING = "## vit: 1 layers, batch 1 x 224²"


def test_bench_measures_every_variant_and_report_renders(tmp_path, monkeypatch, eager_quantizers):
    """ViT: its peak-memory children import the least (timm, not transformers); the other models below. The
    quantizer kernels stay eager here and in the children (compiling them took most of the test's time)."""
    monkeypatch.setenv("COMMON_COMPILE", "0")
    jl = tmp_path / "b.jsonl"
    res = bench_train_step.main(["--model", "vit", "--layers", "1", "--batch", "1", "--iters", "1", "--warmup", "0",
                                 "--json", str(jl)])
    variants = set(bench_train_step.VARIANTS)
    assert set(res["step_s"]) == variants and res["ratio_vs_fp"]["fp"] == 1.0
    assert all(v > 0 for v in res["step_s"].values())
    assert set(res["peak_mib"]) == variants and all(v > 0 for v in res["peak_mib"].values())
    # the KD variant holds a second (teacher) model: it must measure more than the student alone
    assert res["peak_mib"]["w4a4_2:4_kd"] > res["peak_mib"]["w4a4_2:4"]
    assert set(res["memory_env"]) == {"GLIBC_TUNABLES"}  # the children's allocator setting is recorded
    assert json.loads(jl.read_text().splitlines()[-1])["command"].startswith("python benchmarks/bench_train_step.py")
    out = tmp_path / "b.md"
    report.main([str(jl), "--out", str(out)])
    md = out.read_text()
    assert HEADING in md and "W4A4+2:4 +KD teacher" in md
    assert f"| {res['step_s']['w4a4_2:4']:.3f} | {res['ratio_vs_fp']['w4a4_2:4']:.3f} |" in md
    assert ("met" in md) or ("missed" in md)
    assert "memory environment: GLIBC_TUNABLES=" in md and f"integer matmul: {res['int_matmul']}" in md
    # a CPU of the same name without an int8 dot-product instruction adds its rows; a rerun replaces its own
    rec = json.loads(jl.read_text().splitlines()[-1])
    other = {**rec, "int_matmul": "auto (off: no int8 dot-product instruction)" if rec["int_matmul"] == "1" else "1",
             "date": "2999-01-01T00:00:00+00:00"}
    jl.write_text(jl.read_text() + json.dumps(other) + "\n" + json.dumps({**other, "date": "2999-01-02T00:00:00+00:00"})
                  + "\n")
    report.main([str(jl), "--out", str(out)])
    md = out.read_text()
    assert md.count(HEADING) == 2 and "2999-01-02" in md and "2999-01-01" not in md
    # a run with the models compiled is a mode of its own, named in its heading
    jl.write_text(jl.read_text() + json.dumps({**rec, "model_compiled": True}) + "\n")
    report.main([str(jl), "--out", str(out)])
    md = out.read_text()
    assert md.count(HEADING) == 3 and f"{HEADING} (COMMON_COMPILE=0, torch.compile'd models)" in md


def test_bench_compiles_every_variant_when_asked(tmp_path, monkeypatch, eager_quantizers):
    """--compile-model: every variant's model goes through torch.compile (here a stand-in that records it), the
    record says so, and no peak memory is measured (the compiler's memory would count). The quantizer kernels stay
    eager: compiled through the stand-in, they would keep it for the rest of the session."""
    import torch
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda m, **kw: compiled.append(m) or m)
    res = bench_train_step.main(["--model", "bert", "--layers", "1", "--batch", "1", "--seq", "16", "--iters", "1",
                                 "--warmup", "0", "--compile-model"])
    assert len(compiled) == len(bench_train_step.VARIANTS) and len({id(m) for m in compiled}) == len(compiled)
    assert res["model_compiled"] is True and "peak_mib" not in res


def test_every_variant_trains_as_the_pipelines_do_on_cpu():
    """FP included: the fast CPU dropout (a slower FP dropout would flatter the ratios); the wav2vec2 KD teacher
    replays the student's frozen feature encoder."""
    import argparse

    from torch import nn
    for model in ("bert", "wav2vec2"):
        args = argparse.Namespace(model=model, layers=1)
        base = bench_train_step.build(model, 1)
        batch = bench_train_step.make_batch(model, 1, 16)
        for name in ("fp", "w4a4_2:4_kd"):
            m, kd = bench_train_step.build_variant(args, name, base, batch)
            assert not any(type(x) is nn.Dropout for x in m.modules())
            if model == "wav2vec2" and kd is not None:
                assert type(kd.teacher.wav2vec2.feature_extractor).__name__ == "_Replay"


def test_report_names_a_broken_line(tmp_path):
    jl = tmp_path / "b.jsonl"
    jl.write_text('{"model": "bert"}\n')
    with pytest.raises(SystemExit, match=r"b.jsonl:1: not a benchmark record"):
        report.main([str(jl), "--out", str(tmp_path / "b.md")])


@pytest.mark.parametrize("model", ["bert", "wav2vec2"])
def test_bench_runs_the_other_models(tmp_path, model):
    jl = tmp_path / "b.jsonl"
    res = bench_train_step.main(["--model", model, "--layers", "1", "--batch", "1", "--seq", "24", "--iters", "1",
                                 "--warmup", "0", "--no-memory", "--json", str(jl)])
    assert set(res["step_s"]) == set(bench_train_step.VARIANTS) and all(v > 0 for v in res["step_s"].values())
    assert res["compile"] == common_kernels_mode() and res["int_matmul"] == int_matmul_described()
    out = tmp_path / "b.md"
    report.main([str(jl), "--out", str(out)])
    heading = {"bert": "## bert: 1 layers, batch 1 x seq 24", "wav2vec2": "## wav2vec2: 1 layers, batch 1 x 24 frames"}
    assert heading[model] in out.read_text()


def int_matmul_described():
    from common import int_matmul
    return int_matmul.describe()


def common_kernels_mode():
    from common import kernels
    return kernels.compile_mode()


def test_int_matmul_bench_prints_the_ratios_and_what_auto_chose(capsys):
    """A real (tiny) measurement: the products of the same operands timed with each kernel that runs here and in
    float32, the CPU's choice named, the mode left as it was."""
    from common import int_matmul
    mode = int_matmul.int_matmul_mode()
    rows = bench_int_matmul.main(["--tokens", "4", "--iters", "1", "--scale", "64"])
    kernels = ["int_mm", "onednn"] if int_matmul.onednn_qlinear_usable() else ["int_mm"]
    assert [r["shape"] for r in rows] == ["4x12 @ 12x12", "4x12 @ 12x48", "4x48 @ 48x12"]
    assert all(r["float32_ms"] > 0 and r[f"{k}_ms"] > 0 and r[f"{k}_over_float32"] > 0 for r in rows for k in kernels)
    out = capsys.readouterr().out
    assert f"COMMON_INT_MATMUL={int_matmul.describe()}" in out
    assert all(out.count(f"{k} / float32 = ") == 3 for k in kernels) and int_matmul.int_matmul_mode() == mode
