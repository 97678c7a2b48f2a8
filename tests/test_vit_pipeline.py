"""Smoke tests of the real vit_imagenet/train.py and eval.py (called in-process) on a tiny ViT and the digits tree:
the fp -> sparse -> qat4 chain through real run dirs, bit-identical resume, clear errors, eval reproducing top-1."""
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from common import CompressedLinear, act_quantizers, check_nm, compressed_linears
from common.config import ConfigError
from common.runs import RunError
from run_checks import assert_same_weights, with_scalar_clips
from vit_imagenet import eval as vit_eval
from vit_imagenet import train as vit_train
from vit_imagenet.make_mini_digits import make_mini_digits

CONFIGS = Path(vit_train.__file__).resolve().parent / "configs" / "mini"
METRIC_KEYS = {"pipeline", "stage", "scale", "model", "main_metric", "higher_is_better", "top1", "top5", "w_bits",
               "a_bits", "sparsity", "compression_ratio", "bits_per_backbone_weight", "kd", "dropout_schedule",
               "init_from", "train_steps", "train_runtime_s", "hardware", "date", "mini_scale_note"}


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    make_mini_digits(root, seed=0)
    return root


def tiny(runs_dir, digits, *extra):
    """Overrides that shrink a mini stage to a tiny ViT, a few steps and small data subsets."""
    return [f"runs_dir={runs_dir}", f"data.data_dir={digits}", "data.make_mini_digits=false",
            "model.embed_dim=32", "model.depth=2", "model.num_heads=2", "data.train_subset=64",
            "data.val_subset=40", "train.batch_size=8", "train.global_batch_size=8", "train.max_steps=4",
            "train.log_every=2", "train.eval_every=2", "train.eval_subset=16", *extra]


def train(stage, runs_dir, digits, *extra):
    calib = [] if stage in ("fp", "sparse") else ["compression.calib_batches=2"]  # fp has no recipe to override
    return vit_train.main(["--config", str(CONFIGS / f"{stage}.yaml"), *tiny(runs_dir, digits, *calib, *extra)])


@pytest.fixture(scope="module")
def chain(tmp_path_factory, digits):
    runs = tmp_path_factory.mktemp("runs")
    out = {}
    for stage in ("fp", "sparse", "qat4"):
        out[stage] = train(stage, runs, digits)
    return runs / "mini" / "vit_imagenet", out


def _prepared(run_dir):
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    return vit_eval.load_run_model(run_dir, cfg)


def test_chain_outputs(chain):
    base, returned = chain
    for stage in ("fp", "sparse", "qat4"):
        d = base / stage
        m = json.loads((d / "metrics.json").read_text())
        assert METRIC_KEYS <= set(m), METRIC_KEYS - set(m)
        assert (m["pipeline"], m["stage"], m["scale"], m["main_metric"], m["higher_is_better"]) == \
            ("vit_imagenet", stage, "mini", "top1", True)
        assert m["top1"] == pytest.approx(returned[stage]["top1"], abs=1e-4) and m["train_steps"] == 4
        assert 0 <= m["top1"] <= m["top5"] <= 100 and m["eval_samples"] == 40
        # the compressed stages record which matmul they ran (the integer one rounds differently)
        assert ("int_matmul" in m) == (stage == "qat4")
        hist = json.loads((d / "log_history.json").read_text())
        assert any("loss" in h for h in hist) and any("eval_top1" in h for h in hist)
        with open(d / "predictions.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == 40 and rows[0]["label"].startswith("digit_") and "top5" in rows[0]
        assert yaml.safe_load((d / "config.yaml").read_text())["stage"] == stage
    fp, sparse, qat4 = (json.loads((base / s / "metrics.json").read_text()) for s in ("fp", "sparse", "qat4"))
    assert fp["compression_ratio"] == 1.0 and not fp["kd"] and "from scratch" in fp["mini_scale_note"]
    assert fp["init_from"] == "random (from scratch)"  # where the starting weights came from, not the model name
    assert sparse["sparsity"] == "2:4" and sparse["kd"] and sparse["init_from"].endswith("vit_imagenet/fp")
    assert (qat4["w_bits"], qat4["a_bits"], qat4["sparsity"], qat4["compression_ratio"]) == (4, 4, "2:4", 16.0)
    assert qat4["quantize_attention"] and qat4["dropout_schedule"] == "linear"
    assert qat4["init_from"].endswith("vit_imagenet/sparse")
    ws = np.load(base / "qat4" / "weight_sample.npz")
    assert ws["before"].shape == ws["after"].shape


def test_saved_compressed_model(chain):
    base, _ = chain
    state = load_file(str(base / "qat4" / "model.safetensors"))
    sparse_state = load_file(str(base / "sparse" / "model.safetensors"))
    model = _prepared(base / "qat4")
    lins = compressed_linears(model)
    assert len(lins) == 2 * 4  # qkv, proj, fc1, fc2 per block; patch_embed and head stay full precision
    assert not any(n.startswith(("head", "patch_embed")) for n in lins)
    for name, lin in lins.items():
        assert isinstance(lin, CompressedLinear)
        mask = state[name + ".mask"]
        assert check_nm(mask, 2, 4) and mask.float().mean() == 0.5
        assert torch.equal(mask, sparse_state[name + ".mask"])  # qat4 keeps the sparse stage's masks
        assert not state[name + ".weight"][~mask].any()  # pruned weights are stored as exact zeros
        w = lin.effective_weight()
        assert check_nm(w, 2, 4) and w.unique().numel() <= 16
        assert name + ".input_quant.lo" in state and name + ".input_quant.hi" in state
    # activation clips: every linear input and each attention operand (q, k, v, softmax), calibrated (not +-8)
    quants = act_quantizers(model)
    assert len(quants) == 2 * 4 + 2 * 4
    for name in quants:
        assert name + ".hi" in state and float(state[name + ".hi"]) != 8.0
    # the sparse stage: masks on weights, no quantizers
    assert not any(k.endswith((".lo", ".hi")) for k in sparse_state)
    masks = [k for k in sparse_state if k.endswith(".mask")]
    assert masks and all(not sparse_state[k[:-5] + ".weight"][~sparse_state[k]].any() for k in masks)


def test_eval_reproduces_metrics(chain, tmp_path):
    base, _ = chain
    out = vit_eval.main([str(base / "qat4"), "--out_dir", str(tmp_path)])
    saved = json.loads((base / "qat4" / "metrics.json").read_text())
    again = json.loads((tmp_path / "metrics.json").read_text())
    assert out["top1"] == saved["top1"] == again["top1"] and again["top5"] == saved["top5"]
    assert again["train_steps"] == saved["train_steps"] and again["compression_ratio"] == 16.0
    assert again["date"] == saved["date"] and again["eval_date"] >= saved["date"]  # when it trained, kept
    assert again["stage_wall_s"] == saved["stage_wall_s"]
    assert (tmp_path / "predictions.csv").read_text() == (base / "qat4" / "predictions.csv").read_text()
    again = vit_eval.main([str(base / "qat4"), "--out_dir", str(tmp_path), "data.eval_batch_size=7"])  # as eval.sh
    assert again["top1"] == saved["top1"]  # shows it: the overrides after the options; the same run's eval redone
    sparse = json.loads((base / "sparse" / "metrics.json").read_text())
    with pytest.raises(RunError, match=f"--out_dir {base / 'sparse'} is a run dir of its own"):
        vit_eval.main([str(base / "qat4"), "--out_dir", str(base / "sparse")])
    with pytest.raises(RunError, match=f"--out_dir {tmp_path} holds the metrics.json of .*qat4, not of "):
        vit_eval.main([str(base / "sparse"), "--out_dir", str(tmp_path)])
    assert json.loads((base / "sparse" / "metrics.json").read_text()) == sparse
    older = json.loads((tmp_path / "metrics.json").read_text())  # an evaluation from before evaluated_run: redone
    (tmp_path / "metrics.json").write_text(json.dumps({k: v for k, v in older.items() if k != "evaluated_run"}))
    assert vit_eval.main([str(base / "sparse"), "--out_dir", str(tmp_path)])["top1"] == sparse["top1"]
    (tmp_path / "metrics.json").write_text('{"f1": 1}')
    with pytest.raises(RunError, match="holds the metrics.json of something other than an evaluation"):
        vit_eval.main([str(base / "sparse"), "--out_dir", str(tmp_path)])
    # a --data_dir is the user's: a wrong one is an error, never filled with the mini digits
    with pytest.raises(Exception, match="nope"):
        vit_eval.main([str(base / "qat4"), "--data_dir", str(tmp_path / "nope"), "--out_dir", str(tmp_path / "o")])
    assert not (tmp_path / "nope").exists()


def test_resume_is_bit_identical(chain, digits, tmp_path):
    """qat4 (KD, quantizers, masks, scheduled dropout, augmentation, accumulation): interrupted at step 3 and resumed
    to 6 (across an epoch boundary at 4) = one uninterrupted run, tensor for tensor; also from a checkpoint written
    while the clips were 0-dim."""
    base, _ = chain
    runs = base.parent.parent
    common = ["train.max_steps=6", "train.batch_size=4", "train.global_batch_size=8", "train.grad_accum_steps=2",
              "train.log_every=1",
              "train.eval_every=5"]
    full = train("qat4", runs, digits, *common, f"output_dir={tmp_path / 'full'}")
    part = train("qat4", runs, digits, *common, f"output_dir={tmp_path / 'part'}", "interrupt_at_step=3")
    assert part == {"interrupted": True, "step": 3}
    assert (tmp_path / "part" / "checkpoint.pt").exists() and not (tmp_path / "part" / "model.safetensors").exists()
    ckpt = torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=False)  # as written by earlier versions:
    ckpt["model"], ckpt["optimizer"] = with_scalar_clips(ckpt["model"], ckpt["optimizer"])  # 0-dim clips
    torch.save(ckpt, tmp_path / "part" / "checkpoint.pt")
    resumed = train("qat4", runs, digits, *common, f"output_dir={tmp_path / 'part'}", "resume=true")
    a = assert_same_weights(tmp_path / "full", tmp_path / "part")
    assert any(k.endswith(".mask") for k in a) and any(k.endswith(".hi") for k in a)
    assert resumed["top1"] == full["top1"]
    ha = json.loads((tmp_path / "full" / "log_history.json").read_text())
    hb = json.loads((tmp_path / "part" / "log_history.json").read_text())
    assert ha == hb and len([h for h in ha if "loss" in h]) == 6
    with pytest.raises(RunError, match="a finished run"):  # it would train it again from the start
        train("qat4", runs, digits, *common, f"output_dir={tmp_path / 'full'}", "resume=true")
    assert_same_weights(tmp_path / "full", tmp_path / "part")


def test_missing_init_checkpoint(chain, digits, tmp_path):
    with pytest.raises(RunError, match=r"'init_from' points to " + str(tmp_path / "mini" / "vit_imagenet" / "sparse")):
        train("qat4", tmp_path, digits)
    assert not (tmp_path / "mini" / "vit_imagenet" / "qat4").exists()  # nothing left that blocks the rerun
    empty = tmp_path / "empty_run"
    empty.mkdir()
    with pytest.raises(RunError, match=r"empty_run: no model for 'kd.teacher' found"):
        train("qat4", tmp_path, digits, f"init_from={chain[0] / 'sparse'}", f"kd.teacher={empty}")


def test_checkpoint_path_inits_only_where_nothing_else_does(digits, tmp_path):
    """model.checkpoint_path gives the weights of a stage without init_from (kept when it trains 0 steps); the
    builds whose weights come from elsewhere (a later stage, its teacher, eval of a run) do not read it, so it may
    be gone by then."""
    from vit_imagenet.pipeline import create_model, load_stage_config
    ckpt = tmp_path / "vit.pth"
    cfg = load_stage_config(str(CONFIGS / "fp.yaml"), tiny(tmp_path, digits))
    torch.save(create_model(cfg, init_weights=False).state_dict(), ckpt)
    fp = train("fp", tmp_path, digits, f"model.checkpoint_path={ckpt}", "train.max_steps=null",
               "train.epochs=0")
    run = tmp_path / "mini" / "vit_imagenet" / "fp"
    assert fp["init_from"] == f"checkpoint {ckpt}"
    saved, original = load_file(str(run / "model.safetensors")), torch.load(ckpt)
    assert saved.keys() == original.keys() and all(torch.equal(saved[k], original[k]) for k in saved)
    ckpt.rename(tmp_path / "moved.pth")
    assert vit_eval.main([str(run), "--out_dir", str(tmp_path / "ev")])["top1"] == fp["top1"]
    qat4 = train("qat4", tmp_path, digits, f"model.checkpoint_path={ckpt}", f"init_from={run}", "train.max_steps=1")
    assert qat4["init_from"] == str(run) and qat4["kd"]
    with pytest.raises(RunError, match=f"fp.yaml: model.checkpoint_path {ckpt} is not a file"):
        train("fp", tmp_path, digits, f"model.checkpoint_path={ckpt}", f"output_dir={tmp_path / 'fp2'}")


def test_unknown_config_key(digits, tmp_path):
    with pytest.raises(ConfigError, match=r"command line.*train\.lerning_rate"):
        train("fp", tmp_path, digits, "train.lerning_rate=0.1")
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"_base_: {CONFIGS / 'fp.yaml'}\nmodel: {{embed_dimm: 8}}\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*'model\.embed_dimm'; did you mean model\.embed_dim\?"):
        vit_train.main(["--config", str(bad)])


def test_non_empty_output_dir_refused(digits, tmp_path):
    out = tmp_path / "mini" / "vit_imagenet" / "fp"
    out.mkdir(parents=True)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(RunError, match=r"not empty.*overwrite_output_dir=true"):
        train("fp", tmp_path, digits)
    assert (out / "notes.txt").read_text() == "mine"


def test_stage_configs_consistent():
    """Every paper and mini stage config loads, names its own stage, has a valid recipe, chains to an earlier stage;
    the paper schedule is 2,502 steps/epoch x 8 at global batch 512 on one GPU and on 8."""
    from common.stage import stage_recipe
    from vit_imagenet.pipeline import STAGES, Dist, load_stage_config
    paper_dir = CONFIGS.parent
    for cfg_dir, expected in ((paper_dir, set(STAGES) | {"abl_pretrained_init"}), (CONFIGS, set(STAGES))):
        files = {p.stem: p for p in cfg_dir.glob("*.yaml") if p.stem != "base"}
        assert set(files) == expected
        for stage, path in files.items():
            cfg = load_stage_config(path, ["runs_dir=R"])
            assert cfg["stage"] == stage and cfg["scale"] == ("paper" if cfg_dir == paper_dir else "mini")
            assert cfg["output_dir"] == f"R/{cfg['scale']}/vit_imagenet/{stage}"
            recipe = stage_recipe(cfg)
            assert (recipe is None) == (stage == "fp")
            assert bool(cfg.get("ablation")) == stage.startswith("abl_")
            if stage.startswith("abl_"):
                assert set(cfg["ablation"]) == {"factor", "variant"}
            for ref in (cfg.get("init_from"), cfg["kd"]["teacher"] if cfg["kd"]["enabled"] else None):
                if ref:
                    prev = Path(ref).name
                    assert ref == f"R/{cfg['scale']}/vit_imagenet/{prev}" and STAGES.index(prev) < STAGES.index(
                        stage if stage in STAGES else "qat4")
    qat4 = stage_recipe(load_stage_config(paper_dir / "qat4.yaml"))
    assert (qat4.w_bits, qat4.a_bits, qat4.sparsity, qat4.quantize_attention, qat4.zero_preserving) == \
        (4, 4, "2:4", True, True)
    assert not stage_recipe(load_stage_config(paper_dir / "abl_plain_grid.yaml")).zero_preserving
    assert stage_recipe(load_stage_config(paper_dir / "qat4_dense.yaml")).sparsity is None
    assert load_stage_config(paper_dir / "fp.yaml")["train"]["epochs"] == 0
    cfg = load_stage_config(paper_dir / "qat4.yaml")
    d = Dist("cpu")
    plan = vit_train.batch_plan(cfg, d, 1_281_167)
    assert (plan["accum"], plan["global_batch"], plan["steps_per_epoch"], plan["total_steps"]) == (8, 512, 2502, 20016)
    d.world = 8
    plan = vit_train.batch_plan(cfg, d, 1_281_167)
    assert (plan["accum"], plan["global_batch"], plan["steps_per_epoch"]) == (1, 512, 2502)
    d.world = 16  # two nodes: 64 per device would make 1024, so the per-device batch is lowered to 32
    plan = vit_train.batch_plan(cfg, d, 1_281_167)
    assert (plan["batch_size"], plan["accum"], plan["global_batch"], plan["steps_per_epoch"]) == (32, 1, 512, 2502)
    with pytest.raises(ConfigError, match="global_batch_size 512"):
        vit_train.batch_plan(load_stage_config(paper_dir / "qat4.yaml", ["train.batch_size=48"]), Dist("cpu"), 1000)
    # the mini set (1,437 images, 1437 mod 32 = 29): the same steps on any number of processes, never counting
    # the sampler's padding duplicates (ceil(1437 / 4) // 8 made 45 steps per epoch on 4 processes, 44 on 1)
    mini = load_stage_config(CONFIGS / "qat4.yaml")
    plans = []
    for world in (1, 2, 4, 8):
        d.world = world
        plans.append(vit_train.batch_plan(mini, d, 1437))
    assert {(p["global_batch"], p["steps_per_epoch"], p["total_steps"]) for p in plans} == {(32, 44, 132)}
