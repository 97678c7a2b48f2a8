"""vit_imagenet/train.py under torchrun and under `accelerate launch` (2 CPU processes, gloo): a W4A4 + 2:4 stage
from a random init, so the ranks start from different weights and masks and only the broadcast from rank 0 makes
them agree; then a DistributedSampler epoch, KD off, a checkpoint with every rank's RNG state, and eval.py (one
process) reproducing the sharded top-1."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from common import check_nm
from common.runs import RunError
from launchers import run_launched, two_processes
from run_checks import assert_close_weights
from vit_imagenet import eval as vit_eval
from vit_imagenet import train as vit_train

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")


def _tiny_tree(root, n_train=8, n_val=4, classes=10):
    """Noise images in digit_<c> folders: only the mechanics are tested here."""
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        for c in range(classes):
            (root / split / f"digit_{c}").mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8)).save(
                    root / split / f"digit_{c}" / f"{i}.png")


def _args(digits, out, *extra):
    return ["vit_imagenet.train", "--config", str(ROOT / "vit_imagenet/configs/mini/qat4.yaml"),
            f"output_dir={out}", "init_from=null", "kd.enabled=false", f"data.data_dir={digits}",
            "data.make_mini_digits=false", "model.embed_dim=32", "model.depth=2", "model.num_heads=2",
            "data.train_subset=64", "data.val_subset=37", "train.batch_size=8", "train.global_batch_size=16",
            "train.grad_accum_steps=null", "train.max_steps=6", "train.log_every=2", "train.eval_every=3",
            "train.save_every=3", "train.keep_checkpoint=true", "compression.calib_batches=2", *extra]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    """`run(launch)`: the 2-process run under torchrun or accelerate launch (once per module), its dir and output.
    torchrun's runs without dropout: the resume test takes its checkpoint up in one process, whose dropout masks
    could not match the ranks'; accelerate's keeps the config's dropout (per-rank RNG streams)."""
    root = tmp_path_factory.mktemp("vit_ddp")
    _tiny_tree(root / "digits")
    runs = {}

    def run(launch):
        if launch not in runs:
            out = root / f"run_{launch}"
            extra = ["dropout.p=0.0"] if launch == "torchrun" else []
            runs[launch] = out, run_launched(two_processes(launch) + _args(root / "digits", out, *extra))
        return runs[launch]
    return root / "digits", run


@pytest.mark.parametrize("launch", ["torchrun", "accelerate"])
def test_two_processes(two_process_run, tmp_path, launch):
    out, output = two_process_run[1](launch)
    assert "world 2 x batch 8 x accumulation 1 = global batch 16" in output
    m = json.loads((out / "metrics.json").read_text())
    assert m["world_size"] == 2 and m["global_batch_size"] == 16 and m["train_steps"] == 6
    assert m["hardware"].startswith("2 processes on CPU ")
    assert m["eval_samples"] == 37  # sharded without padding: every image counted once
    state = load_file(str(out / "model.safetensors"))
    masks = [k for k in state if k.endswith(".mask")]
    assert len(masks) == 8 and all(check_nm(state[k], 2, 4) for k in masks)
    assert all(not state[k[:-5] + ".weight"][~state[k]].any() for k in masks)
    ckpt = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert ckpt["step"] == 3 and len(ckpt["rng_per_rank"]) == 2
    assert not torch.equal(ckpt["rng_per_rank"][0]["torch"], ckpt["rng_per_rank"][1]["torch"])
    again = vit_eval.main([str(out), "--out_dir", str(tmp_path / "ev")])
    assert again["top1"] == m["top1"] and again["top5"] == m["top5"]


def test_resume_on_another_world_size(two_process_run, tmp_path, capsys):
    """A checkpoint of 2 processes (batch 8 each; torchrun's run above, at step 3 of 6) resumes in 1 process (batch
    8, accumulation 2): the same global batches in the same order, so without dropout it ends where an
    uninterrupted 1-process run with batch 16 ends (float tolerance: DDP's average vs one batch). The clips too:
    both calibrate on global batches."""
    digits, run = two_process_run
    two, _ = run("torchrun")
    cut = tmp_path / "cut"  # the run as a job stopped right after its step-3 checkpoint leaves it
    cut.mkdir()
    for f in ("config.yaml", "checkpoint.pt"):
        shutil.copy2(two / f, cut / f)
    nodrop = ["dropout.p=0.0"]
    with pytest.raises(RunError, match="same global batch and step count"):  # another global batch: refused
        vit_train.main(_args(digits, cut, *nodrop, "resume=true", "train.global_batch_size=8")[1:])
    capsys.readouterr()
    # the 1-process runs in this process
    vit_train.main(_args(digits, cut, *nodrop, "resume=true")[1:])
    log = capsys.readouterr().out
    assert "resumed at step 3 on 1 processes a checkpoint saved by 2" in log
    assert "world 1 x batch 8 x accumulation 2 = global batch 16" in log
    vit_train.main(_args(digits, tmp_path / "full", *nodrop, "train.batch_size=16")[1:])
    assert_close_weights(*(load_file(str(tmp_path / d / "model.safetensors")) for d in ("cut", "full")))
    logged, full = ([r for r in json.loads((tmp_path / d / "log_history.json").read_text()) if "loss" in r]
                    for d in ("cut", "full"))
    assert [r["step"] for r in logged] == [2, 4, 6]  # step 4's mean also counts both ranks' step-3 losses
    assert [r["loss"] for r in logged] == pytest.approx([r["loss"] for r in full], rel=1e-4)
