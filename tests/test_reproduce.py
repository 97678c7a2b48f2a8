"""reproduce.py: stage selection, skip-if-done with an unchanged config, paper-scale input checks."""
import yaml

import reproduce


def test_stage_lists():
    assert reproduce.stages_of("bert_squad", "mini", quick=True) == ["fp", "sparse", "qat4", "qat4_dense"]
    full = reproduce.stages_of("bert_squad", "mini", quick=False)
    assert full[:4] == ["fp", "sparse", "qat4", "qat4_dense"] and "abl_no_kd" in full
    assert full.index("abl_quant_first") > full.index("qat4_dense")  # it starts from qat4_dense


def test_done_only_with_metrics_and_same_config(tmp_path, monkeypatch):
    monkeypatch.setenv("RUNS_DIR", str(tmp_path))
    cfg = reproduce.resolved("bert_squad", "mini", "qat4")
    run = tmp_path / "mini" / "bert_squad" / "qat4"
    assert cfg["output_dir"] == str(run)
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({**cfg, "overwrite_output_dir": True}))
    assert not reproduce.is_done(cfg)  # no metrics.json yet
    (run / "metrics.json").write_text("{}")
    assert reproduce.is_done(cfg)
    changed = dict(cfg, train={**cfg["train"], "learning_rate": 1.0})
    assert not reproduce.is_done(changed)


def test_paper_scale_lists_what_is_missing(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(reproduce, "hub_reachable", lambda name, kind: False)
    monkeypatch.setenv("RUNS_DIR", str(tmp_path))  # main() sets RUNS_DIR for its subprocesses; undone after the test
    problems = reproduce.missing_inputs("bert_squad", "paper")
    assert any("'bert-base-uncased'" in p for p in problems)
    assert any("'squad'" in p for p in problems)
    rc = reproduce.main(["--scale", "paper", "--pipelines", "bert_squad"])
    assert rc == 2 and "bert-base-uncased" in capsys.readouterr().err
