"""The train.sh wrappers (one shared script): a missing stage config is named, with exit code 2."""
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("pipeline", ["bert_squad", "wav2vec_librispeech", "vit_imagenet"])
@pytest.mark.parametrize("scale", ["paper", "mini"])
def test_missing_stage_config_is_named(pipeline, scale):
    r = subprocess.run(["bash", str(ROOT / pipeline / "train.sh"), "no_such_stage"], capture_output=True, text=True,
                       env={**os.environ, "SCALE": scale})
    cfg = ROOT / pipeline / "configs" / ("mini/" if scale == "mini" else "") / "no_such_stage.yaml"
    assert r.returncode == 2 and f"{pipeline}/train.sh: no config {cfg}" in r.stderr


def test_an_unknown_scale_is_named():
    """SCALE=Mini is not paper scale (it ran the paper configs on the mini machine)."""
    r = subprocess.run(["bash", str(ROOT / "vit_imagenet" / "train.sh"), "fp"], capture_output=True, text=True,
                       env={**os.environ, "SCALE": "Mini"})
    assert r.returncode == 2 and "vit_imagenet/train.sh: SCALE must be mini or paper, got 'Mini'" in r.stderr


@pytest.mark.parametrize("torchrun_args", [None, "", "--nnodes 2 --node_rank 0 --master_addr node0 --master_port 1"])
def test_nproc_launches_torchrun_like_reproduce(tmp_path, monkeypatch, torchrun_args):
    """NPROC=N train.sh runs the command reproduce.py runs for NPROC=N, with TORCHRUN_ARGS' flags. Without them,
    torch 2.14's torchrun rendezvouses one node on a free port of its own, so that jobs can share a node."""
    import reproduce
    (tmp_path / "common").mkdir()
    (tmp_path / "common" / "run_stage.sh").write_text((ROOT / "common" / "run_stage.sh").read_text())
    (tmp_path / "pipe" / "configs").mkdir(parents=True)
    (tmp_path / "pipe" / "configs" / "fp.yaml").write_text("{}\n")
    fake = tmp_path / ".venv" / "bin" / "python"  # run_stage.sh prefers the repository's .venv: prints its argv
    fake.parent.mkdir(parents=True)
    fake.write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "TORCHRUN_ARGS"}
    if torchrun_args is None:
        monkeypatch.delenv("TORCHRUN_ARGS", raising=False)
    else:
        env["TORCHRUN_ARGS"] = torchrun_args
        monkeypatch.setenv("TORCHRUN_ARGS", torchrun_args)
    r = subprocess.run(["bash", str(tmp_path / "common" / "run_stage.sh"), "pipe", "fp", "a=1"], capture_output=True,
                       text=True, env={**env, "NPROC": "2"}, check=True)
    args = r.stdout.splitlines()
    assert args == reproduce.torchrun(2)[1:] + ["-m", "pipe.train", "--config", str(tmp_path / "pipe/configs/fp.yaml"),
                                                "a=1"]
