"""Evaluate a saved vit_imagenet run: rebuild the model from RUN_DIR/config.yaml, prepare it with the run's recipe,
load RUN_DIR/model.safetensors strictly (weights, 2:4 masks, activation clips), and write metrics.json and
predictions.csv (into RUN_DIR, or --out_dir).

    python -m vit_imagenet.eval RUN_DIR [--data_dir DIR] [--out_dir DIR] [key=value ...]
    vit_imagenet/eval.sh RUN_DIR [...]                                     # the same
    torchrun --nproc_per_node 8 -m vit_imagenet.eval RUN_DIR               # sharded over GPUs

The training run's own facts in an existing metrics.json (its date, hardware, steps, times) are kept
(common.runs.reevaluated); eval_date / eval_hardware say when and where this evaluation ran. --data_dir is used as
given: the mini digits tree is made only in the run's own data dir.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from common import prepare  # noqa: E402
from common.config import load_config  # noqa: E402
from common.runs import (RunError, check_run_of, cli, load_state, read_metrics, reevaluated,  # noqa: E402
                         stage_metrics, write_json)
from common.stage import stage_recipe  # noqa: E402

from vit_imagenet.pipeline import (PIPELINE, Dist, build_data, channels_last, create_model, evaluate,  # noqa: E402
                                   log, stage_cfg_for_metrics, write_predictions)


def load_run_model(run_dir: Path, cfg: dict) -> torch.nn.Module:
    """The architecture of the run (no download: the weights come from the run), prepared with its recipe, with
    model.safetensors loaded strictly."""
    model = create_model(cfg, init_weights=False)
    recipe = stage_recipe(cfg)
    if recipe is not None:
        prepare(model, recipe)  # masks computed here are replaced by the saved ones
    state = load_state(run_dir, "model")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise RunError(f"{run_dir}: model.safetensors does not match the model of its config.yaml: {e}") from None
    return model


def check_eval_out_dir(out_dir: Path, run_dir: Path) -> None:
    """An --out_dir other than the run's gets metrics.json and predictions.csv: not into another run dir, nor
    over another run's evaluation."""
    if (out_dir / "config.yaml").exists():
        raise RunError(f"--out_dir {out_dir} is a run dir of its own (config.yaml); its metrics.json and "
                       f"predictions would be replaced: choose another --out_dir")
    there = read_metrics(out_dir)
    evaluated = there.get("evaluated_run")
    if not there or (evaluated is None and there.get("evaluated_by") == PIPELINE + ".eval"):
        return  # nothing there, or an evaluation written before evaluated_run was recorded: replaced, as before
    if evaluated != str(run_dir.resolve()):
        what = evaluated or "something other than an evaluation"
        raise RunError(f"--out_dir {out_dir} holds the metrics.json of {what}, not of {run_dir}: choose another "
                       f"--out_dir")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", help="a vit_imagenet run dir (config.yaml + model.safetensors)")
    ap.add_argument("--data_dir", default=None, help="override data.data_dir of the run's config")
    ap.add_argument("--out_dir", default=None, help="where metrics.json and predictions.csv go (default RUN_DIR)")
    ap.add_argument("overrides", nargs="*",
                    help="key=value overrides of the run's config (e.g. data.eval_batch_size=64)")
    a = ap.parse_intermixed_args(argv)  # overrides after the options too, as eval.sh's usage shows them
    t0 = time.time()
    run_dir = Path(a.run_dir)
    check_run_of(run_dir, PIPELINE)
    out_dir = Path(a.out_dir) if a.out_dir else run_dir
    prev = read_metrics(run_dir)  # read first: a damaged one stops us before the evaluation
    if out_dir.resolve() != run_dir.resolve():
        check_eval_out_dir(out_dir, run_dir)
    overrides = list(a.overrides) + ([f"data.data_dir={a.data_dir}", "data.make_mini_digits=false"]
                                     if a.data_dir else [])
    cfg = load_config(run_dir / "config.yaml", overrides)
    threads = torch.get_num_threads()
    if cfg["train"].get("num_threads"):
        torch.set_num_threads(int(cfg["train"]["num_threads"]))
    d = Dist(cfg["train"].get("device", "auto"))
    try:
        model = load_run_model(run_dir, cfg).to(d.device)
        if channels_last(cfg, d):
            model.to(memory_format=torch.channels_last)
        data = build_data(cfg, model, d, need_train=False)
        ev = evaluate(model, data["val"], cfg, d, predictions=True)
        out = {"top1": ev["top1"], "top5": ev["top5"]}
        if d.main:
            out_dir.mkdir(parents=True, exist_ok=True)
            extra = {"top1": ev["top1"], "top5": ev["top5"], "eval_loss": ev["loss"], "eval_samples": ev["samples"],
                     "evaluated_by": "vit_imagenet.eval", "evaluated_run": str(run_dir.resolve()),
                     "eval_data_dir": cfg["data"]["data_dir"]}
            out = reevaluated(prev, stage_metrics(stage_cfg_for_metrics(cfg), model, PIPELINE, "top1", True, extra))
            write_json(out_dir / "metrics.json", out)
            write_predictions(out_dir / "predictions.csv", ev, data)
        log(f"{run_dir}: top-1 {ev['top1']:.2f} top-5 {ev['top5']:.2f} on {ev['samples']} images "
            f"({time.time() - t0:.1f}s)", d)
        return out
    finally:
        d.close()
        torch.set_num_threads(threads)


if __name__ == "__main__":
    cli(main)
