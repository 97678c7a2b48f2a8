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
