"""common.runs: run-dir checks and the metrics a re-evaluation writes (unit level; the pipelines' eval tests run
the real entry points)."""
import json
import runpy
import sys
import warnings

import pytest
import torch
import yaml

from common.config import ConfigError
from common.hf import check_model_source
from common.runs import (DataError, RunError, check_run_of, cli, error_text, prepare_output_dir, rank_seed,
                         read_metrics, reevaluated)


def test_read_metrics_names_a_damaged_file(tmp_path):
    assert read_metrics(tmp_path) == {}
    (tmp_path / "metrics.json").write_text('{"f1": 8')
    with pytest.raises(RunError, match=r"metrics.json: not readable as JSON"):
        read_metrics(tmp_path)
    (tmp_path / "metrics.json").write_text("[1]")
    with pytest.raises(RunError, match="not a JSON object"):
        read_metrics(tmp_path)


def test_check_run_of_refuses_other_dirs(tmp_path):
    with pytest.raises(RunError, match="not a bert_squad run dir"):
        check_run_of(tmp_path, "bert_squad")
    (tmp_path / "config.yaml").write_text("stage: qat4\n")
    check_run_of(tmp_path, "bert_squad")  # an unfinished run: nothing says otherwise
    (tmp_path / "metrics.json").write_text(json.dumps({"pipeline": "vit_imagenet"}))
    with pytest.raises(RunError, match="a vit_imagenet run .*use python -m vit_imagenet.eval"):
        check_run_of(tmp_path, "bert_squad")
    check_run_of(tmp_path, "vit_imagenet")


def test_reevaluated_keeps_what_only_training_knows():
    trained = {"f1": 80.0, "date": "2026-01-01T00:00:00+00:00", "hardware": "8 processes on H100",
               "train_steps": 100, "train_runtime_s": 50.0, "stage_wall_s": 60.0, "effective_train_batch_size": 12,
               "learning_rate": 3e-5}
    new = {"f1": 81.0, "date": "2026-02-02T00:00:00+00:00", "hardware": "CPU", "train_steps": 0,
           "train_runtime_s": 0.0, "effective_train_batch_size": 4, "learning_rate": 3e-5, "eval_samples": 10}
    out = reevaluated(trained, new)
    assert out["f1"] == 81.0 and out["eval_samples"] == 10
    assert {k: out[k] for k in trained if k != "f1"} == {k: v for k, v in trained.items() if k != "f1"}
    assert out["eval_date"] == new["date"] and out["eval_hardware"] == "CPU"
    assert reevaluated({}, new)["date"] == new["date"]  # no training record: this evaluation's


@pytest.mark.parametrize("module", ["bert_squad.eval", "wav2vec_librispeech.eval", "vit_imagenet.eval"])
def test_eval_cli_on_a_wrong_dir_is_one_line(module, tmp_path, monkeypatch, capsys):
    """Each eval entry point run as a script (`python -m`, here in this process: a new one would spend ~15 s
    importing): a dir that is not its run ends with one line naming it (exit 2), not a traceback."""
    (tmp_path / "config.yaml").write_text("stage: fp\n")
    (tmp_path / "metrics.json").write_text(json.dumps({"pipeline": "some_other"}))
    monkeypatch.setattr(sys, "argv", [module, str(tmp_path)])
    with warnings.catch_warnings(), pytest.raises(SystemExit) as exit_:
        # runpy warns that the module was imported before (by other tests), which changes nothing here
        warnings.filterwarnings("ignore", "'.*' found in sys.modules", RuntimeWarning)
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: {tmp_path}: a some_other run (metrics.json), not a {module.split('.')[0]} one; use python -m "
        f"some_other.eval")


class _BadAudio(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, i):
        raise DataError("/data/train-clean-100/19/198/19-198-0001.flac: unreadable audio file")


def test_a_data_error_in_a_loader_worker_is_one_line(capsys):
    """torch re-raises a worker's error with the worker's traceback in its message: the line gives the error's own
    message, as for one raised in the main process."""
    def main():
        next(iter(torch.utils.data.DataLoader(_BadAudio(), num_workers=1)))
    with pytest.raises(SystemExit) as exit_:
        cli(main)
    assert exit_.value.code == 2
    assert capsys.readouterr().err == "error: /data/train-clean-100/19/198/19-198-0001.flac: unreadable audio file\n"
    assert error_text(DataError("a.json: line 3\nsecond line")) == "a.json: line 3\nsecond line"


def test_a_local_model_path_that_does_not_exist_is_named(tmp_path):
    """transformers would take it for a hub id and complain about the id's form."""
    for name in ("bert-base-uncased", "facebook/wav2vec2-large-lv60", str(tmp_path)):
        check_model_source({"model_name_or_path": name})
    for name in (str(tmp_path / "ckpt"), "./nope", "~/nope/bert", "data/ckpt/bert"):
        with pytest.raises(ConfigError, match="does not exist .a local checkpoint folder"):
            check_model_source({"model_name_or_path": name, "config_file": "fp.yaml"})


def test_a_failed_start_does_not_block_the_corrected_command(tmp_path):
    """A dir holding only what a stage writes before loading its inputs is reused; anything more is refused."""
    run = tmp_path / "fp"
    run.mkdir()
    (run / "config.yaml").write_text("stage: fp\n")
    (run / "vocab.json").write_text("{}")
    assert prepare_output_dir(run) == run and (run / "config.yaml").exists()
    (run / "model.safetensors").write_text("mine")
    with pytest.raises(RunError, match="exists and is not empty"):
        prepare_output_dir(run)
    assert (run / "model.safetensors").read_text() == "mine"


def test_resume_refuses_a_finished_run_and_names_changed_settings(tmp_path, capsys):
    """resume=true on a finished run would train it again from the start over its results: refused, the run kept.
    On an interrupted one it goes on, and says which settings differ from those the run started with."""
    run = tmp_path / "qat4"
    run.mkdir()
    cfg = {"stage": "qat4", "train": {"learning_rate": 3e-5, "per_device_train_batch_size": 4}, "resume": False}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    (run / "metrics.json").write_text('{"f1": 88.0}')
    with pytest.raises(RunError, match="a finished run .metrics.json.: resume=true has nothing to continue"):
        prepare_output_dir(run, resume=True, cfg=cfg)
    assert (run / "metrics.json").read_text() == '{"f1": 88.0}'
    assert prepare_output_dir(run, overwrite=True, resume=False) == run and not any(run.iterdir())  # when asked
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))  # interrupted: no metrics.json
    prepare_output_dir(run, resume=True, cfg={**cfg, "resume": True})
    assert capsys.readouterr().err == ""  # resume itself is not a setting of the run
    prepare_output_dir(run, resume=True, cfg={**cfg, "train": {**cfg["train"], "learning_rate": 1.0}})
    err = capsys.readouterr().err
    assert "settings other than its config.yaml's (train.learning_rate: 3e-05 -> 1.0)" in err
    assert (run / "config.yaml").exists()


def test_rank_seed_keeps_rank_0_and_gives_no_rank_another_seeds_streams():
    """Rank 0 draws with the seed itself (one process as before); the other ranks of neighbouring seeds, the ones
    `reproduce.py --seeds` runs, share no value with each other or with any seed's rank 0."""
    assert [rank_seed(s, 0) for s in (0, 42, 43)] == [0, 42, 43]
    values = [rank_seed(s, r) for s in range(40, 50) for r in range(8)]
    assert len(set(values)) == len(values) and all(0 <= v < 2 ** 31 for v in values)
    assert rank_seed(42, 1) == rank_seed(42, 1) != rank_seed(43, 1)
