"""reproduce.py: stage selection, skip-if-done with an unchanged config, paper-scale input checks."""
import importlib
import json
import os
from pathlib import Path

import pytest
import yaml

import reproduce
from common.config import ConfigError
from common.runs import hardware


def test_stage_lists():
    assert reproduce.stages_of("bert_squad", "mini", quick=True) == ["fp", "sparse", "qat4", "qat4_dense"]
    full = reproduce.stages_of("bert_squad", "mini", quick=False)
    assert full[:4] == ["fp", "sparse", "qat4", "qat4_dense"] and "abl_no_kd" in full
    assert full.index("abl_quant_first") > full.index("qat4_dense")  # it starts from qat4_dense


def test_run_state_done_only_with_metrics_and_same_config(tmp_path, monkeypatch):
    monkeypatch.setenv("RUNS_DIR", str(tmp_path))
    cfg = reproduce.resolved("bert_squad", "mini", "qat4")
    run = tmp_path / "mini" / "bert_squad" / "qat4"
    assert cfg["output_dir"] == str(run)
    assert reproduce.run_state(cfg) == ""
    run.mkdir(parents=True)
    assert reproduce.run_state(cfg) == ""  # an empty dir holds nothing
    (run / "config.yaml").write_text(yaml.safe_dump({**cfg, "overwrite_output_dir": True}))
    assert reproduce.run_state(cfg) == "interrupted"  # no metrics.json yet
    (run / "metrics.json").write_text("{}")
    assert reproduce.run_state(cfg) == "done"
    changed = dict(cfg, train={**cfg["train"], "learning_rate": 1.0})
    assert reproduce.run_state(changed) == "other"
    # a key added to the configs later with a null default, at any depth, leaves a finished run done
    older = {**cfg, "dropout": {k: v for k, v in cfg["dropout"].items() if k != "step_at"}}
    assert cfg["dropout"]["step_at"] is None
    (run / "config.yaml").write_text(yaml.safe_dump(older))
    assert reproduce.run_state(cfg) == "done"
    # but not in the open sections, where an absent key is the consumer's default: no clipping is not clip 1.0
    (run / "config.yaml").write_text(yaml.safe_dump({**cfg, "train": {**cfg["train"], "max_grad_norm": None}}))
    assert reproduce.run_state(cfg) == "other"
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    monkeypatch.chdir(tmp_path)  # RUNS_DIR given relative this time: the same run dirs, the same config
    monkeypatch.setenv("RUNS_DIR", ".")
    assert reproduce.run_state(reproduce.resolved("bert_squad", "mini", "qat4")) == "done"
    (run / "config.yaml").write_text("train: [unclosed")
    assert reproduce.run_state(cfg) == "other"
    # a damaged metrics.json is not a finished run (it would be skipped for ever): set aside and redone
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    (run / "metrics.json").write_text('{"stage": "qat4", "da')
    state, why = reproduce.inspect_run(cfg)
    assert state == "other" and why.startswith(f"{run / 'metrics.json'}: not readable as JSON (Unterminated")


def test_a_stage_is_redone_when_a_run_it_starts_or_distils_from_was_trained_again(tmp_path, monkeypatch, capsys):
    """fp retrained (another config) after sparse, qat4 and qat4_dense were built on it: they are set aside and
    redone in the same call, in order; the next call finds them all done. A stage interrupted before its upstream
    was retrained is not resumed either."""
    import datetime
    ran = []

    def fake_call_main(module, argv, isolate):
        cfg = reproduce.resolved("vit_imagenet", "mini", argv[1].rsplit("/", 1)[1][:-5], argv[3:])
        out = Path(cfg["output_dir"])
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(cfg))
        date = datetime.datetime.now(datetime.timezone.utc).isoformat()  # distinct: microseconds
        (out / "metrics.json").write_text(json.dumps({"date": date}))
        ran.append(out.name)
        return 0
    monkeypatch.setattr(reproduce, "call_main", fake_call_main)
    monkeypatch.setattr(reproduce, "export_if_quantized", lambda *a, **k: 0)
    monkeypatch.setattr(reproduce.subprocess, "call", lambda cmd, **kw: 0)
    monkeypatch.setenv("RUNS_DIR", str(tmp_path))
    args = ["--runs-dir", str(tmp_path), "--quick", "1", "--pipelines", "vit_imagenet"]
    assert reproduce.main(args) == 0 and ran == reproduce.MAIN
    ran.clear()
    assert reproduce.main(args + ["--set", "vit_imagenet/fp:train.seed=9"]) == 0 and ran == reproduce.MAIN
    out = capsys.readouterr().out
    assert f"sparse: {tmp_path}/mini/vit_imagenet/sparse: its init_from {tmp_path}/mini/vit_imagenet/fp was " \
           "trained again since" in out
    assert len(list((tmp_path / "mini" / "vit_imagenet" / ".replaced").iterdir())) == 4
    ran.clear()
    assert reproduce.main(args + ["--set", "vit_imagenet/fp:train.seed=9"]) == 0 and ran == []
    qat4 = reproduce.resolved("vit_imagenet", "mini", "qat4")
    (Path(qat4["output_dir"]) / "metrics.json").unlink()  # as if interrupted, then its init_from retrained:
    os.utime(Path(qat4["output_dir"]) / "config.yaml", (0, 0))  # started in 1970
    assert reproduce.inspect_run(qat4)[0] == "other"


def test_existing_runs_are_resumed_or_set_aside_never_deleted(tmp_path, monkeypatch, capsys):
    """A stage interrupted with the same config is resumed (resume=true), a run dir made with another config is
    moved under .replaced/ with its files, and FORCE=1 replaces a finished run in place (it asks to)."""
    launched = []
    monkeypatch.setattr(reproduce, "call_main", lambda module, argv, isolate: launched.append(argv) or 0)
    monkeypatch.setattr(reproduce.subprocess, "call", lambda cmd, **kw: 0)
    monkeypatch.setenv("RUNS_DIR", str(tmp_path))
    pipe = tmp_path / "mini" / "vit_imagenet"
    fp, sparse = pipe / "fp", pipe / "sparse"
    for run, stage in ((fp, "fp"), (sparse, "sparse")):
        run.mkdir(parents=True)
        cfg = reproduce.resolved("vit_imagenet", "mini", stage)
        (run / "config.yaml").write_text(yaml.safe_dump(cfg if stage == "fp" else {**cfg, "seed_repeat": 9}))
        (run / "mine.txt").write_text(stage)
    assert reproduce.main(["--runs-dir", str(tmp_path), "--quick", "1", "--pipelines", "vit_imagenet"]) == 0
    starts = {Path(argv[1]).stem: argv[2] for argv in launched}
    assert starts == {"fp": "resume=true", "sparse": "overwrite_output_dir=true",
                      "qat4": "overwrite_output_dir=true", "qat4_dense": "overwrite_output_dir=true"}
    assert (fp / "mine.txt").read_text() == "fp"
    aside = list((pipe / ".replaced").iterdir())
    assert len(aside) == 1 and aside[0].name.startswith("sparse-") and (aside[0] / "mine.txt").read_text() == "sparse"
    assert f"made with another config (seed_repeat: 9 -> None); moved to {aside[0]}" in capsys.readouterr().out
    launched.clear()
    (sparse.mkdir(), (sparse / "config.yaml").write_text(yaml.safe_dump({"other": 1})))
    assert reproduce.main(["--runs-dir", str(tmp_path), "--quick", "1", "--pipelines", "vit_imagenet",
                           "--force", "1"]) == 0
    assert all(argv[2] == "overwrite_output_dir=true" for argv in launched)
    assert len(list((pipe / ".replaced").iterdir())) == 1


def test_paper_scale_lists_what_is_missing(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(reproduce, "hub_reachable", lambda name, kind: False)
    monkeypatch.setenv("RUNS_DIR", str(tmp_path))  # main() sets RUNS_DIR for its subprocesses; undone after the test
    problems = reproduce.missing_inputs("bert_squad", "paper")
    assert any("'bert-base-uncased'" in p for p in problems)
    assert any("'squad'" in p for p in problems)
    rc = reproduce.main(["--scale", "paper", "--runs-dir", str(tmp_path), "--pipelines", "bert_squad"])
    assert rc == 2 and "bert-base-uncased" in capsys.readouterr().err


def test_paper_scale_checks_the_timm_weights(monkeypatch, tmp_path):
    """ViT's `model:` block: pretrained weights must be cached or on the hub unless local files are configured;
    a stage that starts from a run dir (init_from) needs none."""
    asked = []
    monkeypatch.setattr(reproduce, "hub_reachable", lambda name, kind: asked.append(name) or False)
    cfg = reproduce.resolved("vit_imagenet", "paper", "fp")
    (problem,) = reproduce.timm_model_problems(cfg, "vit_imagenet/fp")
    assert asked == ["timm/vit_base_patch16_224.augreg_in21k_ft_in1k"] and "model.pretrained_cfg_overlay" in problem
    assert any("'vit_base_patch16_224.augreg_in21k'" in p for p in reproduce.missing_inputs("vit_imagenet", "paper"))
    qat4 = reproduce.resolved("vit_imagenet", "paper", "qat4")
    assert reproduce.timm_model_problems(qat4, "q") == []
    gone = {"checkpoint_path": str(tmp_path / "gone.pth"), "pretrained_cfg_overlay": {"file": str(tmp_path / "x")}}
    assert reproduce.timm_model_problems(dict(qat4, model={**qat4["model"], **gone}), "q") == []  # not read there
    weights = tmp_path / "vit.safetensors"
    local = dict(cfg, model={**cfg["model"], "pretrained_cfg_overlay": {"file": str(weights)}})
    assert reproduce.timm_model_problems(local, "w") == [f"w: model.pretrained_cfg_overlay.file={weights} does not exist"]
    weights.write_bytes(b"")
    assert reproduce.timm_model_problems(local, "w") == []
    bad = dict(cfg, model={**cfg["model"], "name": "vit_base_patch16_224.nosuchtag"})
    assert "nosuchtag" in reproduce.timm_model_problems(bad, "b")[0]


def test_vit_hub_imagenet_is_checked_instead_of_data_dir(monkeypatch, tmp_path):
    """data.source=hf reads ImageNet from the hub: the unused data_dir is not asked for, the hub data set is."""
    asked, nowhere = [], f"data.data_dir={tmp_path / 'imagenet'}"
    monkeypatch.setattr(reproduce, "hub_reachable", lambda name, kind: asked.append((name, kind)) or kind == "model")
    assert reproduce.missing_inputs("vit_imagenet", "paper", ["fp"], [nowhere]) == \
        [f"vit_imagenet/fp: data_dir={tmp_path / 'imagenet'} does not exist"]
    assert ("ILSVRC/imagenet-1k", "dataset") not in asked
    problems = reproduce.missing_inputs("vit_imagenet", "paper", ["fp"], [nowhere, "data.source=hf"])
    assert problems == ["vit_imagenet/fp: data set 'ILSVRC/imagenet-1k' is neither in the local Hugging Face cache "
                        "nor reachable on the hub, and data.source is hf"]
    monkeypatch.setattr(reproduce, "hub_reachable", lambda name, kind: True)
    assert reproduce.missing_inputs("vit_imagenet", "paper", ["fp"], [nowhere, "data.source=hf"]) == []


def test_hub_reachable_accepts_the_local_cache(tmp_path, monkeypatch):
    """An offline machine with the files already downloaded passes the paper-scale check."""
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    repo = tmp_path / "models--timm--tiny-test"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("a" * 40)
    (repo / "snapshots" / ("a" * 40)).mkdir(parents=True)
    (repo / "snapshots" / ("a" * 40) / "config.json").write_text("{}")
    assert reproduce.hub_reachable("timm/tiny-test", "model")
    assert not reproduce.hub_reachable("timm/other-test", "model")


def test_set_overrides_reach_every_stage_and_the_checks(tmp_path, monkeypatch):
    """--set KEY=VALUE (all pipelines) and PIPELINE:KEY=VALUE (one): in every stage's command line, in the configs
    the skip and paper-scale checks read; QUICK=1 checks only the stages it runs; --results-dir gets the tables."""
    launched, tables = [], []
    monkeypatch.setattr(reproduce, "call_main", lambda module, argv, isolate: launched.append(argv) or 0)
    monkeypatch.setattr(reproduce.subprocess, "call", lambda cmd, **kw: tables.append(cmd) or 0)
    monkeypatch.setenv("RUNS_DIR", str(tmp_path))
    sets = ["vit_imagenet:train.seed=7", "bert_squad:train.seed=9", "train.log_every=3",
            "vit_imagenet/qat4:train.eval_every=2"]
    assert reproduce.main(["--runs-dir", str(tmp_path), "--quick", "1", "--pipelines", "vit_imagenet",
                           "--results-dir", str(tmp_path / "res"), "--set", *sets]) == 0
    assert len(launched) == 4
    for argv in launched:
        # unprefixed first, then the pipeline's, then the stage's: the more specific wins, whatever the order given
        assert argv[3:] == ["train.log_every=3", "train.seed=7"] + (["train.eval_every=2"] if "qat4.yaml" in argv[1]
                                                                     else []), argv
    assert tables[0][-2:] == ["--out", str(tmp_path / "res")]
    # the finished run is judged with the overrides: the same --set skips it, another reruns it
    cfg = reproduce.resolved("vit_imagenet", "mini", "fp", ["train.log_every=3", "train.seed=7"])
    run = tmp_path / "mini" / "vit_imagenet" / "fp"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    (run / "metrics.json").write_text("{}")
    launched.clear()
    monkeypatch.setattr(reproduce, "export_if_quantized", lambda *a, **k: None)
    reproduce.main(["--runs-dir", str(tmp_path), "--quick", "1", "--pipelines", "vit_imagenet", "--set", *sets])
    assert len(launched) == 3
    # paper scale, QUICK=1: abl_pretrained_init's checkpoint is not asked for
    monkeypatch.setattr(reproduce, "hub_reachable", lambda name, kind: False)
    quick = reproduce.missing_inputs("vit_imagenet", "paper", reproduce.MAIN, ["data.data_dir=/x"])
    assert quick and not any("augreg_in21k'" in p or "abl_" in p for p in quick)
    assert all("data_dir=/x does not exist" in p or "augreg_in21k_ft_in1k" in p for p in quick)
    with pytest.raises(SystemExit):
        reproduce.main(["--runs-dir", str(tmp_path), "--pipelines", "vit_imagenet", "--set", "vit:train.seed=1"])
    (tmp_path / "a_file").write_text("mine")
    for flag in ("--runs-dir", "--results-dir"):
        with pytest.raises(SystemExit):
            reproduce.main([flag, str(tmp_path / "a_file"), "--pipelines", "vit_imagenet"])
    assert reproduce.main(["--runs-dir", str(tmp_path), "--quick", "1", "--pipelines", "vit_imagenet", "--set",
                           "vit_imagenet:output_dir=" + str(tmp_path / "own" / "{stage}")]) == 0  # one per stage
    for bad in ("train.seed", "vit_imagenet/nostage:train.seed=1", "output_dir=/x", "vit_imagenet:output_dir=/x"):
        with pytest.raises(SystemExit):
            reproduce.main(["--runs-dir", str(tmp_path), "--pipelines", "vit_imagenet", "--set", bad])
    launched.clear()
    assert reproduce.main(["--runs-dir", str(tmp_path), "--pipelines", "vit_imagenet", "--set", "model.nme=x"]) == 2 and not launched


@pytest.mark.parametrize("pipeline,typo,hint", [("bert_squad", "train.learnig_rate", "train.learning_rate"),
                                                ("wav2vec_librispeech", "train.warmup_step", "train.warmup_steps"),
                                                ("vit_imagenet", "train.momentun", "train.momentum")])
def test_a_typo_under_train_stops_everything_up_front(tmp_path, monkeypatch, capsys, pipeline, typo, hint):
    """`train` is open in common.config (TrainingArguments takes ~150 keys), so each pipeline's load_stage_config
    checks it; reproduce resolves every stage through it, so a typo stops the whole call before any stage runs,
    rather than when its stage starts hours later."""
    launched = []
    monkeypatch.setattr(reproduce, "call_main", lambda module, argv, isolate: launched.append(argv) or 0)
    assert reproduce.main(["--runs-dir", str(tmp_path), "--pipelines", pipeline, "--set", f"{typo}=1"]) == 2
    err = capsys.readouterr().err
    assert f"unknown config key '{typo}'; did you mean {hint}" in err and not launched, err
    assert not any(tmp_path.iterdir())
    # in a stage file (or its _base_ chain), the file is named
    cfg = tmp_path / "typo.yaml"
    cfg.write_text(yaml.safe_dump({"_base_": str(reproduce.config_path(pipeline, "mini", "qat4")),
                                   "train": {typo.split(".")[1]: 1}}))
    load = importlib.import_module(f"{pipeline}.train").load_stage_config
    with pytest.raises(ConfigError, match=f"{cfg} \\(or a file in its _base_ chain\\): unknown config key '{typo}'"):
        load(cfg)


def test_a_stage_override_wins_over_its_pipeline_one_in_any_order():
    """abl_pretrained_init's own model path must not be replaced by a pipeline-wide one given after it: the
    ablation would then start from the fine-tuned model and measure nothing."""
    own, wide = "wav2vec_librispeech/abl_pretrained_init:model_name_or_path=/ckpt/lv60", \
        "wav2vec_librispeech:model_name_or_path=/ckpt/960h"
    for given in ([own, wide], [wide, own]):
        user = reproduce.overrides_for("wav2vec_librispeech", "abl_pretrained_init", given)
        assert user == ["model_name_or_path=/ckpt/960h", "model_name_or_path=/ckpt/lv60"]
        assert reproduce.resolved("wav2vec_librispeech", "paper", "abl_pretrained_init", user)[
            "model_name_or_path"] == "/ckpt/lv60"
        assert reproduce.overrides_for("wav2vec_librispeech", "qat4", given) == ["model_name_or_path=/ckpt/960h"]


@pytest.mark.parametrize("pipeline,bad,message", [
    ("bert_squad", "compression.w_bitz=8", "command line: unknown config key 'compression.w_bitz'; did you mean "
                                           "compression.w_bits"),
    ("wav2vec_librispeech", "compression.sparsity=5:4", "impossible N:M sparsity '5:4'"),
    ("vit_imagenet", "dropout.schedule=linearr", "command line: 'dropout.schedule' must be one of constant, linear"),
    ("bert_squad", "dropout.step_at=2", "'dropout.step_at' must be a fraction of training in [0, 1]"),
    ("wav2vec_librispeech", "dropout.p=1.5", "command line: 'dropout.p' must be a probability in [0, 1] or null, "
                                             "got 1.5"),
    ("vit_imagenet", "dropout.end_p=high", "'dropout.end_p' must be a number (the base config has 0.0), got 'high'"),
    ("bert_squad", "dropout.end_p=null", "'dropout.end_p' must be a probability in [0, 1], got None"),
    ("bert_squad", "compression=8", "command line: 'compression' must be a mapping (or null), got 8"),
    ("vit_imagenet", "compression.calib_percentile=abc", "compression: a value of the wrong type"),
])
def test_compression_and_dropout_mistakes_stop_everything_up_front(tmp_path, monkeypatch, capsys, pipeline, bad,
                                                                  message):
    """The compression section is built into a Recipe only when its stage starts (after fp and sparse have
    trained, at paper scale: hours), so its keys and values, and the dropout schedule, are checked at load."""
    launched = []
    monkeypatch.setattr(reproduce, "call_main", lambda module, argv, isolate: launched.append(argv) or 0)
    # on the last stage of the chain: the check must not wait for the stages before it
    assert reproduce.main(["--runs-dir", str(tmp_path), "--pipelines", pipeline, "--set",
                           f"{pipeline}/abl_quant_first:{bad}"]) == 2
    err = capsys.readouterr().err
    assert message in err and not launched, err
    assert not any(tmp_path.iterdir())


def test_unknown_pipeline_names_are_refused(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("RUNS_DIR", str(tmp_path))  # restored after the test, should main() set it
    with pytest.raises(SystemExit):
        reproduce.main(["--runs-dir", str(tmp_path), "--pipelines", "bert", "vit_imagenet"])
    assert "unknown pipeline(s) bert; choose from bert_squad, vit_imagenet, wav2vec_librispeech" in \
        capsys.readouterr().err


def test_in_process_stage_failures_are_reported_not_fatal(tmp_path, monkeypatch, capsys):
    """call_main runs a stage's main() in this process: an exception or a SystemExit becomes an exit status, a
    stage's own torch thread count does not leak into the next stage."""
    import torch
    (tmp_path / "fake_stage.py").write_text(
        "import sys, torch\n"
        "def main(argv):\n"
        "    torch.set_num_threads(1)\n"
        "    if argv[0] == 'raise': raise ValueError('broken config.yaml: no key x')\n"
        "    if argv[0] == 'exit': sys.exit(3)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    threads = torch.get_num_threads()
    assert reproduce.call_main("fake_stage", ["ok"], isolate=False) == 0
    assert reproduce.call_main("fake_stage", ["exit"], isolate=False) == 3
    assert reproduce.call_main("fake_stage", ["raise"], isolate=False) == 1
    assert "broken config.yaml: no key x" in capsys.readouterr().err
    assert torch.get_num_threads() == threads


def test_main_records_stage_times_and_failures(tmp_path, monkeypatch):
    """main() with the stages stubbed: each stage's time and status land in reproduce_times.json, a failed stage
    makes the exit status 1 without stopping the others, and the tables step is called on the runs dir."""
    calls, tables = [], []

    def fake_call_main(module, argv, isolate):
        calls.append(module)
        if argv[1].endswith("fp.yaml"):  # a run that names its hardware: one thread, set by the stage
            run = tmp_path / "mini" / "bert_squad" / "fp"
            run.mkdir(parents=True)
            (run / "metrics.json").write_text(json.dumps({"hardware": "CPU X (x86_64), 2 cores, 1 threads"}))
        return 1 if "qat4.yaml" in argv[1] else 0
    monkeypatch.setattr(reproduce, "call_main", fake_call_main)
    monkeypatch.setattr(reproduce.subprocess, "call", lambda cmd, **kw: tables.append(cmd) or 0)
    monkeypatch.setenv("RUNS_DIR", str(tmp_path))
    rc = reproduce.main(["--runs-dir", str(tmp_path), "--quick", "1", "--pipelines", "bert_squad"])
    assert rc == 1
    assert calls == ["bert_squad.train"] * 4  # no metrics.json from the stubs: nothing to export
    times = json.loads((tmp_path / "mini" / "reproduce_times.json").read_text())
    assert sorted(times) == sorted(f"bert_squad/{s}" for s in reproduce.MAIN)
    assert times["bert_squad/qat4"]["status"] == "FAILED (exit 1)" and times["bert_squad/fp"]["status"] == "ok"
    assert all(t["main_row"] and t["in_process"] for t in times.values())
    # the hardware of the run itself where its metrics.json names it, else this process's
    assert times["bert_squad/fp"]["hardware"] == "CPU X (x86_64), 2 cores, 1 threads"
    assert times["bert_squad/sparse"]["hardware"] == hardware(1)
    assert tables and str(tmp_path) in tables[0]


def test_nproc_launches_every_stage_with_torchrun(tmp_path, monkeypatch):
    """NPROC=N: each stage through torchrun on N processes (TORCHRUN_ARGS passed on), the same stage config and
    overrides as in process; the export and the tables stay single-process."""
    launched = []
    monkeypatch.setattr(reproduce, "call_main", lambda *a: pytest.fail("a stage ran in process"))
    monkeypatch.setattr(reproduce, "export_if_quantized", lambda *a, **k: None)
    monkeypatch.setattr(reproduce.subprocess, "call", lambda cmd, **kw: launched.append(cmd) or 0)
    monkeypatch.setenv("RUNS_DIR", str(tmp_path))
    monkeypatch.setenv("TORCHRUN_ARGS", "--master_port 29511")
    assert reproduce.main(["--runs-dir", str(tmp_path), "--quick", "1", "--pipelines", "vit_imagenet",
                           "--nproc", "2"]) == 0
    stages, tables = launched[:-1], launched[-1]
    assert len(stages) == 4 and "make_results.py" in tables[1]
    for cmd, stage in zip(stages, reproduce.MAIN):
        assert cmd[1:9] == ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29511", "-m",
                            "vit_imagenet.train"]
        assert cmd[9:] == ["--config", str(reproduce.config_path("vit_imagenet", "mini", stage)),
                           "overwrite_output_dir=true"]
    times = json.loads((tmp_path / "mini" / "reproduce_times.json").read_text())
    assert not any(t["in_process"] for t in times.values())
    assert all(t["hardware"].startswith("2 processes on ") for t in times.values())
    with pytest.raises(SystemExit):
        reproduce.main(["--nproc", "0"])


def test_a_relative_runs_dir_means_the_same_dirs_to_the_stage_processes(tmp_path, monkeypatch):
    """Stages in subprocesses (ISOLATE=1, NPROC>1) run in the repository root, the done/replace check in the
    caller's dir: a relative RUNS_DIR would make them two different dirs, so that a finished run in the
    repository's runs/ was overwritten unasked. Both are made absolute first."""
    seen = []
    monkeypatch.setattr(reproduce.subprocess, "call", lambda cmd, **kw: seen.append(
        (cmd, os.environ["RUNS_DIR"], kw.get("cwd"))) or 0)
    monkeypatch.setattr(reproduce, "export_if_quantized", lambda *a, **k: 0)
    monkeypatch.chdir(tmp_path)
    assert reproduce.main(["--runs-dir", "rel", "--results-dir", "res", "--quick", "1", "--pipelines",
                           "vit_imagenet", "--isolate", "1"]) == 0
    stages, tables = seen[:-1], seen[-1]
    assert len(stages) == 4 and all(env == str(tmp_path / "rel") for _, env, _ in stages)
    assert tables[0][-3:] == [str(tmp_path / "rel"), "--out", str(tmp_path / "res")]
    in_process = []  # and stages run in this process run in the repository root too
    monkeypatch.setattr(reproduce, "call_main", lambda *a: in_process.append(os.getcwd()) or 0)
    assert reproduce.main(["--runs-dir", "rel2", "--results-dir", "res", "--quick", "1", "--pipelines",
                           "vit_imagenet"]) == 0
    assert in_process == [str(reproduce.ROOT)] * 4 and os.getcwd() == str(tmp_path)


def test_set_aside_twice_in_a_second_keeps_both(tmp_path):
    runs = []
    for k in range(3):
        run = tmp_path / "qat4"
        run.mkdir()
        (run / "mine.txt").write_text(str(k))
        runs.append(reproduce.set_aside(run))
    assert len(set(runs)) == 3 and [int((r / "mine.txt").read_text()) for r in runs] == [0, 1, 2]


def test_bad_input_of_an_in_process_stage_is_one_line(tmp_path, capsys):
    """As the scripts' own entry points (common.runs.cli) say it: exit 2 and one line naming the problem."""
    missing = tmp_path / "nope.yaml"
    assert reproduce.call_main("vit_imagenet.train", ["--config", str(missing)], isolate=False) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_a_failed_export_counts_as_a_failure(tmp_path, monkeypatch, capsys):
    """The export (the compression columns) of a finished compressed stage that fails makes the call fail, with
    the stage named, rather than exit 0."""
    monkeypatch.setattr(reproduce.subprocess, "call", lambda cmd, **kw: 0)
    monkeypatch.setattr(reproduce, "call_main", lambda module, argv, isolate: 1 if module == "common.export" else 0)

    def finished(cfg):  # every stage already done: only the exports run
        run = Path(cfg["output_dir"])
        run.mkdir(parents=True, exist_ok=True)
        (run / "config.yaml").write_text(yaml.safe_dump(cfg))
        (run / "metrics.json").write_text("{}")
    monkeypatch.setenv("RUNS_DIR", str(tmp_path))
    for stage in reproduce.MAIN:
        finished(reproduce.resolved("vit_imagenet", "mini", stage))
    assert reproduce.main(["--runs-dir", str(tmp_path), "--quick", "1", "--pipelines", "vit_imagenet",
                           "--results-dir", str(tmp_path / "res")]) == 1
    out = capsys.readouterr().out
    assert "FAILED stages: ['vit_imagenet/qat4 (export)', 'vit_imagenet/qat4_dense (export)']" in out


def test_nproc_that_cannot_keep_a_global_batch_stops_before_anything_runs(tmp_path, monkeypatch, capsys):
    """Paper scale on 8 GPUs: BERT's global batch of 12 does not split over 8 processes; every such stage is listed
    with the process counts that work, and nothing is launched (wav2vec2's 32 and ViT's 512 would be kept)."""
    monkeypatch.setattr(reproduce.subprocess, "call", lambda *a, **k: pytest.fail("something was launched"))
    monkeypatch.setenv("RUNS_DIR", str(tmp_path))
    assert reproduce.main(["--scale", "paper", "--runs-dir", str(tmp_path), "--nproc", "8", "--quick", "1"]) == 2
    err = capsys.readouterr().err
    assert "bert_squad/configs/qat4.yaml: global_batch_size 12 does not split over 8 processes; run [1, 2, 3, 4, 6, 12]" \
        in err
    assert "vit_imagenet" not in err and "wav2vec" not in err and "PIPELINES=bert_squad NPROC=4" in err
    assert reproduce.batch_problems("wav2vec_librispeech", "paper", reproduce.MAIN, 8) == []
    assert len(reproduce.batch_problems("vit_imagenet", "paper", reproduce.MAIN, 3)) == 4


def test_seeds_rerun_every_stage_but_fp_into_their_own_dirs(tmp_path, monkeypatch):
    """--seeds 3 with the stages stubbed: the default seeds first, then two more seeds of every stage but fp, each
    with its own seed, dir and seed_repeat; a finished extra seed is skipped on the next call."""
    import json

    import yaml
    runs = []

    def fake_call_main(module, argv, isolate):
        cfg = reproduce.resolved("vit_imagenet", "mini", argv[1].rsplit("/", 1)[1][:-5], argv[3:])
        out = tmp_path / "mini" / "vit_imagenet" / cfg["output_dir"].rsplit("/", 1)[1]
        assert cfg["output_dir"] == str(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(cfg))
        (out / "metrics.json").write_text("{}")
        runs.append((out.name, cfg["train"]["seed"], cfg["seed_repeat"]))
        return 0
    monkeypatch.setattr(reproduce, "call_main", fake_call_main)
    monkeypatch.setattr(reproduce, "export_if_quantized", lambda *a, **k: None)
    monkeypatch.setattr(reproduce.subprocess, "call", lambda cmd, **kw: 0)
    monkeypatch.setenv("RUNS_DIR", str(tmp_path))
    args = ["--runs-dir", str(tmp_path), "--quick", "1", "--pipelines", "vit_imagenet", "--seeds", "3"]
    assert reproduce.main(args) == 0
    seed = reproduce.resolved("vit_imagenet", "mini", "qat4")["train"]["seed"]
    assert runs[:4] == [(s, seed, None) for s in reproduce.MAIN]
    assert runs[4:] == [(f"{s}_seed{k}", seed + k, k) for k in (1, 2) for s in reproduce.MAIN if s != "fp"]
    times = json.loads((tmp_path / "mini" / "reproduce_times.json").read_text())
    assert times["vit_imagenet/qat4_seed2"]["seed_repeat"] == 2 and not times["vit_imagenet/qat4_seed2"]["main_row"]
    runs.clear()
    assert reproduce.main(args) == 0 and runs == []  # all done: nothing reruns
    with pytest.raises(SystemExit):
        reproduce.main(args[:-1] + ["0"])
