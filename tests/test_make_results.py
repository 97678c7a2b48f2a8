"""Tests for results/make_results.py on a fixture of FAKE runs.

Every number below is a fixture value chosen to make deltas easy to check;
none is a result of any training run.
"""
import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "results" / "make_results.py"
sys.path.insert(0, str(SCRIPT.parent))
import make_results  # noqa: E402

FAKE_MODEL = "FIXTURE-fake-model (not a result)"
GENERATED_MARK = "<!-- Generated from results/README.template.md by results/make_results.py -->"


def _metrics(pipeline, stage, **kw):
    base = {"pipeline": pipeline, "stage": stage, "scale": "mini", "model": FAKE_MODEL,
            "w_bits": 32, "a_bits": 32, "sparsity": None, "quantize_attention": False,
            "zero_preserving": False, "kd": False, "dropout_schedule": "none", "init_from": "fixture",
            "bits_per_backbone_weight": 32.0, "compression_ratio": 1.0, "train_steps": 10,
            "train_runtime_s": 1.0, "hardware": "fixture-cpu", "date": "2000-01-02T03:04:05",
            "mini_scale_note": "fixture"}
    if pipeline == "bert_squad":
        base.update(main_metric="f1", higher_is_better=True)
    else:
        base.update(main_metric="wer_test_clean", higher_is_better=False)
    base.update(kw)
    return base


def _write_run(runs, pipeline, stage, metrics, logs=True, sample=False):
    d = runs / "mini" / pipeline / stage
    d.mkdir(parents=True)
    (d / "metrics.json").write_text(json.dumps(metrics))
    (d / "config.yaml").write_text(f"fixture: true\nstage: {stage}\n")
    if logs:
        m = metrics["main_metric"]
        hist = [{"step": s, "loss": 2.0 / s} for s in (1, 2, 3, 4)]
        hist += [{"step": s, f"eval_{m}": metrics[m] - 4 + s} for s in (2, 4)]
        (d / "log_history.json").write_text(json.dumps(hist))
    if sample:
        rng = np.random.default_rng(0)
        before = rng.normal(0, 0.05, (32, 64))
        # fake "effective compressed" weight: 2:4 mask + 15 symmetric levels
        keep = np.argsort(-np.abs(before.reshape(-1, 4)), axis=1)[:, :2]
        mask = np.zeros_like(before.reshape(-1, 4), bool)
        np.put_along_axis(mask, keep, True, axis=1)
        scale = np.abs(before).max() / 7
        after = np.clip(np.round(before / scale), -7, 7) * scale * mask.reshape(before.shape)
        np.savez(d / "weight_sample.npz", before=before, after=after, layer=np.array(["fixture.layer0"]))
        (d / "compression.json").write_text(json.dumps(
            {"backbone_ratio_vs_fp32": 14.2, "model_ratio_vs_fp32": 9.1, "model_ratio_vs_fp16": 4.55,
             "bits_per_backbone_weight": 2.25, "file_bytes": 1234567}))
    return d


@pytest.fixture
def runs(tmp_path):
    r = tmp_path / "runs"
    _write_run(r, "bert_squad", "fp", _metrics("bert_squad", "fp", exact_match=50.0, f1=60.0))
    _write_run(r, "bert_squad", "qat4", _metrics(
        "bert_squad", "qat4", exact_match=45.0, f1=55.0, w_bits=4, a_bits=4, sparsity="2:4",
        bits_per_backbone_weight=2.25, compression_ratio=14.2, kd=True), sample=True)
    _write_run(r, "bert_squad", "abl_no_kd", _metrics(
        "bert_squad", "abl_no_kd", exact_match=40.0, f1=52.5, w_bits=4, a_bits=4, sparsity="2:4",
        ablation={"factor": "distillation", "variant": "no KD"}), logs=False)
    _write_run(r, "wav2vec_librispeech", "qat4", _metrics(
        "wav2vec_librispeech", "qat4", wer_test_clean=20.0, wer_test_other=30.0, compression_ratio=14.2))
    _write_run(r, "wav2vec_librispeech", "abl_no_kd", _metrics(
        "wav2vec_librispeech", "abl_no_kd", wer_test_clean=23.0, wer_test_other=33.0,
        ablation={"factor": "distillation", "variant": "no KD"}), logs=False)
    broken = r / "mini" / "vit_imagenet" / "qat4_broken"
    broken.mkdir(parents=True)
    (broken / "metrics.json").write_text('{"pipeline": "vit_imagenet", "stage": ')
    incomplete = r / "mini" / "vit_imagenet" / "fp_incomplete"
    incomplete.mkdir(parents=True)
    (incomplete / "metrics.json").write_text(json.dumps({"pipeline": "vit_imagenet", "stage": "fp"}))
    return r


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _check_png(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    assert len(data) > 1024, path


def test_tables_plots_and_broken_runs(runs, tmp_path, capsys):
    out = tmp_path / "out"
    assert make_results.main([str(runs), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "qat4_broken" in err and "not valid JSON" in err
    assert "fp_incomplete" in err and "lacks required keys" in err

    rows = _rows(out / "main_table.csv")
    main = {(r["pipeline"], r["row"]): r for r in rows if r["status"] == "ok"}
    assert set(main) == {("bert_squad", "FP"), ("bert_squad", "W4A4+2:4"), ("wav2vec_librispeech", "W4A4+2:4")}
    # the fixture's other main stages were never run: their rows stay, marked and empty (vit_imagenet has no
    # usable run at all, so it gets no rows; its broken dirs are in the skipped list)
    gone = {(r["pipeline"], r["stage"]): r for r in rows if r["status"] != "ok"}
    assert set(gone) == {("bert_squad", "sparse"), ("bert_squad", "qat4_dense"), ("wav2vec_librispeech", "fp"),
                         ("wav2vec_librispeech", "sparse"), ("wav2vec_librispeech", "qat4_dense")}
    assert all(r["status"] == "not run" and r["main_value"] == "" for r in gone.values())
    assert all(r["scale"] == "mini" for r in main.values())
    q = main[("bert_squad", "W4A4+2:4")]
    assert q["f1"] == "55.0000" and q["delta_vs_fp"] == "-5.0000"
    assert q["export_backbone_ratio_vs_fp32"] == "14.2000" and q["export_file_bytes"] == "1234567"
    assert main[("bert_squad", "FP")]["paper_f1"] == "88.5000"  # Devlin et al. 2019, from paper_reference.csv
    assert main[("wav2vec_librispeech", "W4A4+2:4")]["paper_wer_test_clean"] == ""  # unknown: stays empty

    abl = {r["pipeline"]: r for r in _rows(out / "ablations.csv")}
    assert abl["bert_squad"]["factor"] == "distillation" and abl["bert_squad"]["variant"] == "no KD"
    assert abl["bert_squad"]["delta"] == "-2.5000" and abl["bert_squad"]["effect"] == "worse"
    # WER: lower is better, so +3 points is worse
    assert abl["wav2vec_librispeech"]["delta"] == "3.0000" and abl["wav2vec_librispeech"]["effect"] == "worse"
    assert abl["bert_squad"]["shows_paper_effect"] == "yes"
    assert "mini bert_squad: 1 of 1 ablations show the paper's effect" in (out / "ablations.md").read_text()

    md = (out / "main_table.md").read_text()
    assert "not** a reproduction" in md and "| mini | W4A4+2:4 |" in md
    assert "Δ = ablation − full recipe" in (out / "ablations.md").read_text()

    for name in ("plot_metric_vs_compression.png", "plot_ablations.png",
                 "plot_training_curves_mini_bert_squad.png", "plot_training_curves_mini_wav2vec_librispeech.png",
                 "plot_weight_histogram_mini_bert_squad.png"):
        _check_png(out / name)
    assert not (out / "plot_weight_histogram_mini_wav2vec_librispeech.png").exists()  # no sample saved

    readme = (out / "README.md").read_text()
    assert "{{" not in readme and "python results/make_results.py runs" in readme
    assert "fixture-cpu" in readme and "2000-01-02" in readme and "qat4_broken" in readme


def test_rerun_is_byte_identical_and_cli_works(runs, tmp_path):
    out = tmp_path / "out"
    assert make_results.main([str(runs), "--out", str(out)]) == 0
    first = {p.name: p.read_bytes() for p in out.iterdir() if p.suffix in (".md", ".csv")}
    proc = subprocess.run([sys.executable, str(SCRIPT), str(runs), "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "qat4_broken" in proc.stderr
    second = {p.name: p.read_bytes() for p in out.iterdir() if p.suffix in (".md", ".csv")}
    assert set(first) == {"main_table.md", "main_table.csv", "ablations.md", "ablations.csv", "seeds.md",
                          "seeds.csv", "README.md"}
    assert first == second


def test_init_from_is_shown_relative_to_the_runs_dir(runs, tmp_path, monkeypatch):
    """reproduce records init_from with its absolute RUNS_DIR: the tables show it as the run_dir column does, so
    that results/ does not name the machine's paths; a hub name or a path elsewhere stays as recorded."""
    q = runs / "mini" / "bert_squad" / "qat4" / "metrics.json"
    q.write_text(json.dumps({**json.loads(q.read_text()), "init_from": str(runs / "mini" / "bert_squad" / "fp")}))
    out = tmp_path / "out"
    assert make_results.main([str(runs), "--out", str(out)]) == 0
    main = {(r["pipeline"], r["stage"]): r for r in _rows(out / "main_table.csv") if r["status"] == "ok"}
    assert main[("bert_squad", "qat4")]["init_from"] == "mini/bert_squad/fp"
    assert main[("bert_squad", "fp")]["init_from"] == "fixture"
    assert "| mini/bert_squad/fp |" in (out / "README.md").read_text()
    # relative paths as the stages ran them, from the repository root (or the current dir)
    monkeypatch.chdir(tmp_path)
    assert make_results.under_runs_dir("runs/mini/bert_squad/sparse", runs) == "mini/bert_squad/sparse"
    assert make_results.under_runs_dir(str(tmp_path / "elsewhere"), runs) == str(tmp_path / "elsewhere")
    assert make_results.under_runs_dir("bert-base-uncased", runs) == "bert-base-uncased"
    assert make_results.under_runs_dir(None, runs) is None


def _filled_out(out):
    """An --out that already holds results (FIXTURE text): what a bad run of the script must leave alone."""
    out.mkdir()
    for name in ("main_table.md", "main_table.csv", "README.md", "plot_training_curves_mini_bert_squad.png"):
        (out / name).write_text(f"FIXTURE earlier {name}\n")
    (out / "README.md").write_text(f"{GENERATED_MARK}\nFIXTURE earlier README.md\n")  # one an earlier run wrote
    return {p.name: p.read_bytes() for p in out.iterdir()}


@pytest.mark.parametrize("where,hint", [
    ("rusn", "does not exist"),  # a typo
    ("runs/mini", "looks 1 level too deep"),  # the scale dir, not the runs root
    ("runs/mini/bert_squad", "looks 2 levels too deep"),
    (".", "looks one level too shallow: did you mean {tmp}/runs?"),  # the folder above the runs root
    ("empty", "no dirs at"),
])
def test_wrong_runs_dir_is_an_error_and_writes_nothing(runs, tmp_path, capsys, where, hint):
    """A wrong RUNS_DIR used to rewrite every table as 'No runs found' and delete the per-run plots of --out
    (default: the committed results/); now it stops, says what layout it expected, and --out is untouched."""
    (tmp_path / "empty").mkdir()
    out = tmp_path / "out"
    before = _filled_out(out)
    runs_dir = tmp_path / where
    assert make_results.main([str(runs_dir), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"runs dir {runs_dir}" in err and "<scale>/<pipeline>/<stage>/metrics.json" in err
    assert hint.format(tmp=tmp_path) in err and "Nothing was written" in err
    if where.startswith("runs/"):
        assert f"did you mean {runs}?" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_a_dir_of_broken_runs_only_is_an_error(tmp_path, capsys):
    runs = tmp_path / "runs"
    _write_run(runs, "bert_squad", "fp", {"pipeline": "bert_squad"}, logs=False)
    out = tmp_path / "out"
    assert make_results.main([str(runs), "--out", str(out)]) == 2
    assert "no run found in runs dir" in capsys.readouterr().err and not out.exists()


def test_bad_out_template_and_paper_reference_are_clear_errors(runs, tmp_path, capsys):
    """FIXTURE files: each bad input names itself and the problem; nothing is written, and no traceback."""
    out = tmp_path / "out"
    before = _filled_out(out)
    afile = tmp_path / "a_file"
    afile.write_text("FIXTURE not a folder\n")
    assert make_results.main([str(runs), "--out", str(afile)]) == 2
    assert f"--out {afile}: {afile} is a file, not a folder" in capsys.readouterr().err
    assert afile.read_text() == "FIXTURE not a folder\n"
    assert make_results.main([str(runs), "--out", str(out), "--template", str(tmp_path / "READNE.md")]) == 2
    assert f"README template {tmp_path / 'READNE.md'} (--template) does not exist" in capsys.readouterr().err
    good = (SCRIPT.parent / "paper_reference.csv").read_text().splitlines()
    for text, msg in [
        ("\n".join(good[:2] + [good[2].replace(",88.5,", ",88.5%,")] + good[3:]),
         "line 3, column 'value': '88.5%' is not a number"),
        ("\n".join([good[0].replace("metric", "measure")] + good[1:]), "line 1 (header): no column metric"),
    ]:
        ref = tmp_path / "ref.csv"
        ref.write_text(text + "\n")
        assert make_results.main([str(runs), "--out", str(out), "--paper-ref", str(ref)]) == 2
        assert f"{ref}, {msg}" in capsys.readouterr().err
    assert make_results.main([str(runs), "--out", str(out), "--paper-ref", str(tmp_path / "nope.csv")]) == 2
    assert "nope.csv (--paper-ref) does not exist" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_a_backup_copy_does_not_replace_the_stage_own_run(runs, tmp_path, capsys):
    """A copy of qat4 (FIXTURE, edited F1) whose name sorts first: the dir named as reproduce.py names the stage
    wins and the copy is reported; two copies without the real dir are both refused, not picked by name."""
    real = runs / "mini" / "bert_squad" / "qat4"
    for name, f1 in (("0_qat4_old", 99.0), ("qat4_dense_a", 1.0), ("qat4_dense_b", 2.0)):
        stage = "qat4" if name == "0_qat4_old" else "qat4_dense"
        _write_run(runs, "bert_squad", name, _metrics("bert_squad", stage, exact_match=f1, f1=f1), logs=False)
    out = tmp_path / "out"
    assert make_results.main([str(runs), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    rows = {r["stage"]: r for r in _rows(out / "main_table.csv") if r["pipeline"] == "bert_squad"}
    assert rows["qat4"]["f1"] == "55.0000" and rows["qat4"]["run_dir"] == "mini/bert_squad/qat4"
    assert "skipped" in err and "0_qat4_old: duplicate of mini/bert_squad/qat4" in err and f"skipped {real}:" not in err
    assert rows["qat4_dense"]["status"].startswith("not used: mini/bert_squad/qat4_dense_a and "
                                                   "mini/bert_squad/qat4_dense_b all say they are")
    assert rows["qat4_dense"]["f1"] == ""
    skipped = dict(make_results.load_runs(runs)[1])
    assert "mini/bert_squad/qat4 is that stage's own run dir" in skipped["mini/bert_squad/0_qat4_old"]
    assert "none is used" in skipped["mini/bert_squad/qat4_dense_a"]


def test_missing_and_unreadable_stages_keep_marked_rows(runs, tmp_path, capsys):
    """bert_squad/sparse with a truncated metrics.json, abl_oneshot with a NaN F1 (FIXTURE): their rows stay,
    marked, with empty values; the tally says how many configured ablations have a result."""
    _write_run(runs, "bert_squad", "sparse", _metrics("bert_squad", "sparse", f1=1.0))
    (runs / "mini" / "bert_squad" / "sparse" / "metrics.json").write_text('{"pipeline": "bert_squad", "st')
    _write_run(runs, "bert_squad", "abl_oneshot", _metrics("bert_squad", "abl_oneshot", f1=float("nan")))
    out = tmp_path / "out"
    assert make_results.main([str(runs), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "mini/bert_squad/sparse: main stage unreadable: metrics.json is not valid JSON" in err
    assert "mini/wav2vec_librispeech/fp: main stage not run" in err
    main = {(r["pipeline"], r["stage"]): r for r in _rows(out / "main_table.csv")}
    sparse = main[("bert_squad", "sparse")]
    assert sparse["status"].startswith("unreadable: metrics.json is not valid JSON") and sparse["f1"] == ""
    assert sparse["run_dir"] == "mini/bert_squad/sparse" and sparse["row"] == "2:4"
    md = (out / "main_table.md").read_text()
    assert "| mini | 2:4 | sparse | **unreadable** |" in md and "| mini | FP | fp | **not run** |" in md
    for table in md.split("\n\n"):  # a marked row has as many cells as the header
        if table.startswith("| Scale"):
            assert len({line.count(" | ") for line in table.splitlines() if not line.startswith("|---")}) == 1
    assert "Without an FP result, Δ vs FP is empty." in md  # wav2vec_librispeech has no fp run
    abl = {(r["pipeline"], r["stage"]): r for r in _rows(out / "ablations.csv")}
    one = abl[("bert_squad", "abl_oneshot")]
    assert one["status"] == "unreadable: metrics.json has no numeric value for its main_metric 'f1'"
    assert one["value"] == "" and one["delta"] == "" and one["shows_paper_effect"] == "n/a"
    n_cfg = len(list((ROOT / "bert_squad" / "configs" / "mini").glob("abl_*.yaml")))
    text = (out / "ablations.md").read_text()
    assert (f"- mini bert_squad: 1 of 1 ablations show the paper's effect (the full recipe better than the "
            f"ablation). 1 of the {n_cfg} configured ablations have a result; no result for ") in text
    assert "`abl_oneshot` (unreadable: metrics.json has no numeric value" in text
    assert "`abl_quant_first` (not run)" in text


def test_seed_means_over_different_seeds_give_no_delta(tmp_path):
    """qat4's default seed unreadable (FIXTURE): its mean is over seeds 43 44, the ablation's over 42 43 44, so
    no Δ of those means is shown, and the table says why."""
    runs = tmp_path / "runs"
    for stage in ("qat4", "abl_no_kd"):
        for k, v in enumerate([55.0, 55.5, 54.5]):
            _write_run(runs, "bert_squad", stage + (f"_seed{k}" if k else ""), _metrics(
                "bert_squad", stage, f1=v, seed=42 + k, **({"seed_repeat": k} if k else {}),
                ablation={"factor": "distillation", "variant": "no KD"}), logs=False)
    (runs / "mini" / "bert_squad" / "qat4" / "metrics.json").write_text("{")
    out = tmp_path / "out"
    assert make_results.main([str(runs), "--out", str(out)]) == 0
    rows = {r["stage"]: r for r in _rows(out / "seeds.csv")}
    assert rows["qat4"]["seeds"] == "43 44" and rows["abl_no_kd"]["seeds"] == "42 43 44"
    a = rows["abl_no_kd"]
    assert a["delta"] == "" and a["se"] == "" and a["full_recipe_mean"] == ""
    assert a["shows_paper_effect"] == "no Δ: the full recipe has seeds 43 44, this one 42 43 44"
    assert ("1 ablation not compared: not run on the same seeds as the full recipe"
            in (out / "seeds.md").read_text())


def test_wall_time_table_sums_main_rows_and_ablations(tmp_path, capsys):
    """reproduce_times.json (FIXTURE seconds) -> minutes per pipeline; failed stages and bad files left out."""
    scale = tmp_path / "mini"
    scale.mkdir()
    t = {f"bert_squad/{s}": {"pipeline": "bert_squad", "stage": s, "main_row": s in ("fp", "qat4"),
                             "seconds": sec, "status": st, "hardware": "fixture-cpu", "date": "2000-01-02T03:04:05"}
         for s, sec, st in [("fp", 120, "ok"), ("qat4", 60, "ok"), ("abl_no_kd", 30, "ok"),
                            ("abl_oneshot", 600, "FAILED (exit 1)")]}
    t["vit_imagenet/fp"] = {"pipeline": "vit_imagenet", "stage": "fp", "main_row": True, "seconds": 6,
                            "status": "ok", "hardware": "fixture-cpu", "date": "2000-01-03T00:00:00"}
    t["bert_squad/qat4_seed1"] = {**t["bert_squad/qat4"], "main_row": False, "seconds": 90, "seed_repeat": 1}
    (scale / "reproduce_times.json").write_text(json.dumps(t))
    md = make_results.wall_times_md(tmp_path)
    rows = {line.split("|")[2].strip(): [c.strip() for c in line.split("|")[3:7]] for line in md.splitlines()[2:]}
    assert rows["bert_squad"] == ["3.0 (2)", "0.5 (1)", "1.5 (1)", "5.0"]
    assert rows["vit_imagenet"] == ["0.1 (1)", "0.0 (0)", "0.0 (0)", "0.1"]
    assert rows["**all**"] == ["3.1 (3)", "0.5 (1)", "1.5 (1)", "5.1"]
    (scale / "reproduce_times.json").write_text("{not json")
    assert "No `reproduce_times.json`" in make_results.wall_times_md(tmp_path)
    assert "reproduce_times.json" in capsys.readouterr().err


def test_extra_seeds_give_the_spread_and_leave_the_default_seed_tables_alone(runs, tmp_path):
    """Runs of extra seeds (FIXTURE values) -> seeds.md/csv: mean, sample std, Δ of means with its SE and a
    verdict; the main and ablation tables keep the default seed's numbers."""
    out0, out = tmp_path / "out0", tmp_path / "out"
    make_results.main([str(runs), "--out", str(out0)])
    assert "No stage has runs with more than one seed" in (out0 / "seeds.md").read_text()
    f1 = {"qat4": [58.0, 52.0], "abl_no_kd": [52.5, 52.5]}  # with the default seeds 55.0 and 52.5
    for stage, vals in f1.items():
        for k, v in enumerate(vals, 1):
            d = _write_run(runs, "bert_squad", f"{stage}_seed{k}", _metrics(
                "bert_squad", stage, exact_match=v - 10, f1=v, seed=42 + k, seed_repeat=k,
                ablation={"factor": "distillation", "variant": "no KD"} if stage.startswith("abl") else None),
                logs=False)
            assert d.name == f"{stage}_seed{k}"
    make_results.main([str(runs), "--out", str(out)])
    for name in ("main_table.csv", "ablations.csv"):
        assert (out / name).read_bytes() == (out0 / name).read_bytes()
    rows = {r["stage"]: r for r in _rows(out / "seeds.csv")}
    assert set(rows) == {"qat4", "abl_no_kd"}
    q, a = rows["qat4"], rows["abl_no_kd"]
    assert q["n"] == "3" and q["values"] == "55.00 58.00 52.00" and q["mean"] == "55.0000" and q["std"] == "3.0000"
    assert a["std"] == "0.0000" and a["delta"] == "-2.5000" and a["full_recipe_mean"] == "55.0000"
    se = 3 ** 0.5  # sqrt(3² / 3 + 0² / 3) = 1.73: |Δ| = 2.5 < 2 SE
    assert abs(float(a["se"]) - se) < 1e-4 and a["shows_paper_effect"] == "in its direction, within noise"
    md = (out / "README.md").read_text()
    assert "## Spread over seeds" in md and "qat4 (seed 43)" in md  # and the runs table lists the extra seeds
    assert ("bert_squad, 1 ablations: the paper's effect beyond seed noise in 0, in its direction but within "
            "noise in 1 more.") in md
    # a second copy of an extra seed is reported as a duplicate, not counted twice
    _write_run(runs, "bert_squad", "qat4_seed1_copy", _metrics("bert_squad", "qat4", f1=0.0, exact_match=0.0,
                                                               seed=43, seed_repeat=1), logs=False)
    loaded, skipped = make_results.load_runs(runs)
    assert any("duplicate of mini/bert_squad/qat4_seed1" in why for _, why in skipped)


@pytest.mark.parametrize("abl,verdict", [([50.0, 50.5, 49.5], "yes, beyond noise"),
                                         ([60.0, 60.5, 59.5], "no: ablation better, beyond noise"),
                                         ([55.5, 56.5, 54.5], "no, within noise"),
                                         ([54.5, 55.5, 55.0], "no (no difference)")])
def test_seed_verdicts(tmp_path, abl, verdict):
    """FIXTURE values: full recipe 55 ± 0.5 over three seeds against an ablation's three seeds."""
    runs = tmp_path / "runs"
    for stage, vals in {"qat4": [55.0, 55.5, 54.5], "abl_no_kd": abl}.items():
        for k, v in enumerate(vals):
            extra = dict(seed=42 + k, **({"seed_repeat": k} if k else {}))
            if stage.startswith("abl"):
                extra["ablation"] = {"factor": "distillation", "variant": "no KD"}
            _write_run(runs, "bert_squad", stage + (f"_seed{k}" if k else ""),
                       _metrics("bert_squad", stage, exact_match=v, f1=v, **extra), logs=False)
    recs = {r["stage"]: r for r in make_results.seed_records(make_results.load_runs(runs)[0])}
    assert recs["abl_no_kd"]["shows_paper_effect"] == verdict and recs["qat4"]["n"] == 3



# FIXTURE values: top-1 on 360 images moves in steps of 100/360 = 0.2778 points; the full recipe's three seeds
# score the same count (SD 0), so the SE is the ablation's alone.
@pytest.mark.parametrize("abl,n_eval,verdict", [
    ([95.8333] * 3, 360, "no, within one eval example"),  # +1 image, SE 0: beyond 2 SE, not beyond one image
    ([95.2778] * 3, 360, "in its direction, within one eval example"),  # −1 image
    ([95.8333] * 3, None, "no: ablation better, beyond noise"),  # N unknown: the 2-SE screen alone
    ([96.1111] * 3, 360, "no: ablation better, beyond noise"),  # +2 images
    ([94.7222, 95.0, 95.0], 360, "yes, beyond noise"),  # −2 images on average
    ([95.8333, 95.2778, 96.1111], 360, "no, within noise"),  # +0.67 images, SE 0.25 images
    ([95.8333] * 3, [360, 360, 720], "no: ablation better, beyond noise")])  # mixed N: no step known
def test_seed_screen_does_not_resolve_less_than_one_eval_example(tmp_path, abl, n_eval, verdict):
    runs = tmp_path / "runs"
    for stage, vals in {"qat4": [95.5556] * 3, "abl_quant_first": abl}.items():
        for k, v in enumerate(vals):
            extra = dict(seed=k, **({"seed_repeat": k} if k else {}))
            if stage.startswith("abl"):
                extra["ablation"] = {"factor": "order", "variant": "quantize first"}
            n = n_eval[k] if isinstance(n_eval, list) else n_eval
            if n is not None:
                extra["eval_samples"] = n
            _write_run(runs, "vit_imagenet", stage + (f"_seed{k}" if k else ""),
                       _metrics("vit_imagenet", stage, main_metric="top1", higher_is_better=True, top1=v, **extra),
                       logs=False)
    recs = {r["stage"]: r for r in make_results.seed_records(make_results.load_runs(runs)[0])}
    a = recs["abl_quant_first"]
    assert a["shows_paper_effect"] == verdict
    assert a["one_example"] == (100 / 360 if n_eval == 360 else None)


def test_out_keeps_the_files_make_results_did_not_write(runs, tmp_path, capsys, monkeypatch):
    """A README.md of the user's in --out stops the call (nothing written); a plot_*.png of the user's own
    survives a run, a stale per-run plot of this script's naming does not."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "README.md").write_text("FIXTURE: the user's own notes\n")
    assert make_results.main([str(runs), "--out", str(out)]) == 2
    assert "README.md was not written by make_results.py" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["README.md"]
    (out / "README.md").unlink()  # a table of the user's own, and no README.md: stops the call too
    (out / "main_table.md").write_text("FIXTURE: the user's own table\n")
    assert make_results.main([str(runs), "--out", str(out)]) == 2
    assert "holds main_table.md but no README.md written by make_results.py" in capsys.readouterr().err
    assert (out / "main_table.md").read_text() == "FIXTURE: the user's own table\n"
    (out / "main_table.md").unlink()  # a first call into a fresh folder that stops midway leaves it its own
    monkeypatch.setattr(make_results, "plot_metric_vs_compression", lambda *a: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        make_results.main([str(runs), "--out", str(out)])
    assert (out / "main_table.md").exists() and "by results/make_results.py" in (out / "README.md").read_text()
    monkeypatch.undo()
    assert make_results.main([str(runs), "--out", str(out)]) == 0
    (out / "README.md").write_text(f"{GENERATED_MARK}\nFIXTURE earlier README.md\n")
    for name in ("plot_training_curves_my_experiment.png", "plot_weight_histogram_final_v2.png",
                 "plot_training_curves_mini_vit_imagenet.png"):  # the last: of a pipeline with no usable run
        (out / name).write_text("FIXTURE\n")
    assert make_results.main([str(runs), "--out", str(out)]) == 0
    assert (out / "plot_training_curves_my_experiment.png").read_text() == "FIXTURE\n"
    assert (out / "plot_weight_histogram_final_v2.png").read_text() == "FIXTURE\n"
    assert not (out / "plot_training_curves_mini_vit_imagenet.png").exists()
    assert make_results.main([str(runs), "--out", str(out)]) == 0  # its own README is replaced on a rerun
    # a template of the user's own without the mark: the mark is added, so the next run may replace it
    tpl = tmp_path / "tpl.md"
    tpl.write_text("FIXTURE template\n{{main_table}}\n")
    assert make_results.main([str(runs), "--out", str(out), "--template", str(tpl)]) == 0
    assert make_results.main([str(runs), "--out", str(out), "--template", str(tpl)]) == 0


def test_stage_times_without_their_run_are_left_out(runs, tmp_path):
    """reproduce_times.json (FIXTURE seconds) names bert_squad/sparse, whose run dir is gone: the wall-time table
    counts the stages in the tables only, and says how many it left out."""
    t = {f"bert_squad/{s}": {"pipeline": "bert_squad", "stage": s, "main_row": True, "seconds": 60, "status": "ok",
                             "hardware": "fixture-cpu", "date": "2000-01-02T03:04:05"} for s in ("fp", "sparse")}
    (runs / "mini" / "reproduce_times.json").write_text(json.dumps(t))
    out = tmp_path / "out"
    assert make_results.main([str(runs), "--out", str(out)]) == 0
    readme = (out / "README.md").read_text()
    assert "| mini | bert_squad | 1.0 (1) |" in readme
    assert "1 recorded stage time left out: its run dir is not in the tables" in readme


@pytest.mark.parametrize("key,value,reason", [
    ("main_metric", ["f1"], "main_metric ['f1']: must be a name"),
    ("pipeline", "bert_squad/v2", "pipeline 'bert_squad/v2': must be a name"),
    ("stage", {"a": 1}, "stage {'a': 1}: must be a name"),
])
def test_names_that_cannot_be_table_keys_or_file_names_are_skipped(runs, tmp_path, capsys, key, value, reason):
    """FIXTURE metrics.json with a list, a path or a dict where a name belongs: skipped with the reason, the
    other runs' tables and plots written."""
    m = _metrics("bert_squad", "abl_oneshot", f1=50.0)
    m[key] = value
    _write_run(runs, "bert_squad", "abl_oneshot", m, logs=False)
    assert make_results.main([str(runs), "--out", str(tmp_path / "out")]) == 0
    assert reason in capsys.readouterr().err
    assert (tmp_path / "out" / "plot_training_curves_mini_bert_squad.png").is_file()


def test_runs_set_aside_only_get_their_own_hint(tmp_path, capsys):
    runs = tmp_path / "runs"
    _write_run(runs, "bert_squad", ".replaced/qat4-20000102T030405Z", _metrics("bert_squad", "qat4", f1=1.0))
    assert make_results.main([str(runs), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "only runs there are under <pipeline>/.replaced/" in err and "too shallow" not in err
    assert not (tmp_path / "out").exists()


def test_an_interrupted_stage_is_not_finished_and_unrun_ablations_are_named(tmp_path, capsys):
    """bert_squad with fp and qat4 (FIXTURE) and a sparse dir holding config.yaml only (what an interrupted
    stage leaves): its row says not finished; no ablation ran (QUICK=1), and ablations.md says which."""
    runs = tmp_path / "runs"
    _write_run(runs, "bert_squad", "fp", _metrics("bert_squad", "fp", f1=60.0))
    _write_run(runs, "bert_squad", "qat4", _metrics("bert_squad", "qat4", f1=55.0))
    (runs / "mini" / "bert_squad" / "sparse").mkdir()
    (runs / "mini" / "bert_squad" / "sparse" / "config.yaml").write_text("fixture: true\n")
    out = tmp_path / "out"
    assert make_results.main([str(runs), "--out", str(out)]) == 0
    rows = {r["stage"]: r for r in _rows(out / "main_table.csv")}
    assert rows["sparse"]["status"].startswith("not finished: config.yaml but no metrics.json")
    assert rows["sparse"]["run_dir"] == "mini/bert_squad/sparse" and rows["qat4_dense"]["status"] == "not run"
    assert "| mini | 2:4 | sparse | **not finished** |" in (out / "main_table.md").read_text()
    n_cfg = len(list((ROOT / "bert_squad" / "configs" / "mini").glob("abl_*.yaml")))
    text = (out / "ablations.md").read_text()
    assert text.startswith("# Ablations\n\nNo ablation runs found")
    assert (f"- mini bert_squad: no ablation result. 0 of the {n_cfg} configured ablations have a result; "
            "no result for `abl_const_dropout` (not run);") in text


def test_ablation_seeds_without_full_recipe_seeds_say_why_there_is_no_delta(tmp_path):
    runs = tmp_path / "runs"
    _write_run(runs, "bert_squad", "qat4", _metrics("bert_squad", "qat4", f1=55.0, seed=42), logs=False)
    for k, v in enumerate([52.0, 53.0]):
        _write_run(runs, "bert_squad", "abl_no_kd" + (f"_seed{k}" if k else ""), _metrics(
            "bert_squad", "abl_no_kd", f1=v, seed=42 + k, **({"seed_repeat": k} if k else {})), logs=False)
    out = tmp_path / "out"
    assert make_results.main([str(runs), "--out", str(out)]) == 0
    row = {r["stage"]: r for r in _rows(out / "seeds.csv")}["abl_no_kd"]
    assert row["delta"] == "" and row["shows_paper_effect"] == ("no Δ: the full recipe (`qat4`) has fewer than two "
                                                                "usable seeds")
