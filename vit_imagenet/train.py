"""Fine-tune a timm ViT on ImageNet (or the mini digits) for one stage of the paper's staged compression recipe.

    python -m vit_imagenet.train --config vit_imagenet/configs/qat4.yaml [key=value ...]
    vit_imagenet/train.sh qat4 [key=value ...]                      # the same; SCALE=mini picks configs/mini/
    torchrun --nproc_per_node 8 -m vit_imagenet.train --config vit_imagenet/configs/qat4.yaml   # DDP

Stages (configs/*.yaml, in order): fp -> sparse (2:4) -> qat4 (W4A4 + 2:4), qat4_dense (W4A4), ablations abl_*.
One stage: resolved config.yaml -> model (timm, pretrained or `init_from` a previous stage's run dir, with its 2:4
masks) -> `common.prepare` with the stage's recipe + calibration of the activation clips -> SGD with cosine LR
(per step), gradient clipping and accumulation, KD from the FP run, scheduled dropout -> model.safetensors,
metrics.json, predictions.csv, log_history.json, weight_sample.npz in the run dir.

Resume: checkpoint.pt (model, optimizer, scheduler, step, RNG states of every rank; the data position is a function
of the step, see pipeline.py) every `train.save_every` steps and at `interrupt_at_step`; `resume=true` continues
it. On CPU with a fixed seed a resumed run ends bit-identical to an uninterrupted one.
"""
from __future__ import annotations

import os
import random
import sys
import time
from contextlib import nullcontext
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from common import ScheduledDropout, compression_summary  # noqa: E402
from common.pact import clip_state_as_1d, fix_one_sided_clips  # noqa: E402
from common.config import ConfigError, save_config, split_global_batch, stage_argv  # noqa: E402
from common.runs import (RunError, check_resume, cli, find_model_file, prepare_output_dir,  # noqa: E402
                         rank_seed, save_weight_sample, stage_metrics, write_json)
from common.stage import build_distiller, build_stage_model  # noqa: E402

from vit_imagenet.pipeline import (PIPELINE, Dist, ResumableSampler, build_data, calibration_batches,  # noqa: E402
                                   channels_last, cosine_lambda, create_model, evaluate, fmt_duration,
                                   init_source, load_stage_config, loader_kwargs, log, model_label,
                                   stage_cfg_for_metrics, subset, to_device, write_predictions)
from vit_imagenet.pipeline import autocast as amp_context  # noqa: E402

CKPT = "checkpoint.pt"


# ----------------------------------------------------------------------------------------------- helpers ---
def batch_split(cfg: dict, world: int) -> tuple[int, int]:
    """(per-device batch, accumulation) on `world` processes: `train.global_batch_size` is kept
    (`common.config.split_global_batch`); without it, `batch_size` and `grad_accum_steps` are taken as they are."""
    t = cfg["train"]
    bs, accum, glob = int(t["batch_size"]), t.get("grad_accum_steps"), t.get("global_batch_size")
    if glob is None:
        return bs, max(1, int(accum or 1))
    return split_global_batch(int(glob), bs, accum, world, f"{cfg['config_file']}: train.global_batch_size")


def batch_plan(cfg: dict, d: Dist, n_train: int) -> dict:
    """Per-device batch × accumulation × world = global batch; steps per epoch and in total."""
    t = cfg["train"]
    world = d.world
    bs, accum = batch_split(cfg, world)
    # full global batches only, whatever the world size: the sampler's padding to a multiple of it (duplicates)
    # is never reached, and the schedule is the same on 1 process and on 8
    spe = n_train // (bs * accum * world)
    if spe == 0 and (t.get("max_steps") or t.get("epochs")):
        raise ConfigError(f"{cfg['config_file']}: {n_train} training images give no full step of "
                          f"{bs * accum * world} images")
    total = int(t["max_steps"]) if t.get("max_steps") else round(float(t.get("epochs") or 0) * spe)
    return dict(batch_size=bs, accum=accum, world=world, global_batch=bs * accum * world, steps_per_epoch=spe,
                total_steps=total)


def check_sources(cfg: dict) -> None:
    """The run dirs this stage reads (init_from, kd.teacher) must hold a model; the error names the config key."""
    kd = cfg.get("kd") or {}
    for key, value in (("init_from", cfg.get("init_from")), ("kd.teacher", kd.get("teacher") if kd.get("enabled")
                                                                 else None)):
        if not value:
            continue
        if not Path(value).exists():
            raise RunError(f"{cfg['config_file']}: '{key}' points to {value}, which does not exist; run that stage "
                           f"first or override {key}=PATH")
        find_model_file(value, f"model for '{key}'")


def build_optimizer(cfg: dict, model: nn.Module):
    """SGD (paper) or AdamW; no weight decay on biases, norms, clips, position embedding and class token."""
    from timm.optim import param_groups_weight_decay
    t = cfg["train"]
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else ()
    groups = param_groups_weight_decay(model, float(t.get("weight_decay") or 0.0), no_weight_decay_list=skip)
    if t["optimizer"] == "sgd":
        opt = torch.optim.SGD(groups, lr=float(t["lr"]), momentum=float(t.get("momentum", 0.9)),
                              nesterov=bool(t.get("nesterov", False)))
    else:
        opt = torch.optim.AdamW(groups, lr=float(t["lr"]), betas=tuple(t.get("betas") or (0.9, 0.999)))
    opt.register_load_state_dict_post_hook(clip_state_as_1d)  # a checkpoint from before the clips were 1-element
    return opt


def rng_state(d: Dist) -> dict:
    s = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if d.device.type == "cuda":
        s["cuda"] = torch.cuda.get_rng_state(d.device)
    return s


def seed_rng(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_rng_state(s: dict, d: Dist) -> None:
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])
    if "cuda" in s and d.device.type == "cuda":
        torch.cuda.set_rng_state(s["cuda"], d.device)


def save_checkpoint(path: Path, raw_model, opt, sched, scaler, state: dict, d: Dist) -> None:
    """Every rank's RNG states are gathered; rank 0 writes atomically (tmp file + rename)."""
    rngs = d.gather_objects(rng_state(d))
    if not d.main:
        return
    ckpt = {"model": raw_model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None, "rng_per_rank": rngs, **state}
    tmp = path.with_suffix(".pt.tmp")
    torch.save(ckpt, tmp)
    os.replace(tmp, path)


def save_model(path: Path, model: nn.Module, cfg: dict) -> None:
    """The full state dict (weights, 2:4 masks, activation clips and their signs) as safetensors."""
    from safetensors.torch import save_file
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={"format": "pt", "pipeline": PIPELINE, "stage": str(cfg.get("stage")),
                                          "model": str(cfg["model"]["name"])})


# ------------------------------------------------------------------------------------------------- main ---
def main(argv=None) -> dict:
    a = stage_argv(argv, __doc__, PIPELINE, "train.lr=0.02")
    t_start, cpu_start = time.time(), time.process_time()
    cfg = load_stage_config(a.config, a.overrides)
    t = cfg["train"]
    threads = torch.get_num_threads()
    if t.get("num_threads"):
        torch.set_num_threads(int(t["num_threads"]))
    d = Dist(t.get("device", "auto"))
    try:
        out = run(cfg, d, t_start, cpu_start)
        # every rank done before the group is destroyed: a gloo rank tearing down while its peer's connection was
        # still open aborted that peer at exit ("terminate called without an active exception", ~1 run in 8)
        d.barrier()
        return out
    finally:
        d.close()
        torch.set_num_threads(threads)  # main() may run in-process (tests, reproduce.py)


def run(cfg: dict, d: Dist, t_start: float, cpu_start: float) -> dict:
    t = cfg["train"]
    check_sources(cfg)  # before the output dir is made: a failed start leaves nothing that blocks the rerun
    out_dir = Path(cfg["output_dir"])
    resume_flag, overwrite = bool(cfg.get("resume")), bool(cfg.get("overwrite_output_dir"))
    # every rank checks (so that none waits at a barrier for a rank that refused); rank 0 creates/cleans
    if out_dir.exists() and any(out_dir.iterdir()) and not (overwrite or resume_flag):
        prepare_output_dir(out_dir, overwrite, resume_flag)  # raises RunError naming the dir and the fix
    if resume_flag and not overwrite:
        check_resume(out_dir, None)  # raises on a finished run
    d.barrier()
    if d.main:
        prepare_output_dir(out_dir, overwrite, resume_flag, cfg)
        save_config(cfg, out_dir / "config.yaml")
    d.barrier()
    logfile = out_dir / "train.log" if d.main else None
    say = lambda msg: log(msg, d, logfile)  # noqa: E731
    ckpt_path = out_dir / CKPT
    ckpt = None
    if resume_flag and ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        say(f"resuming {ckpt_path} at step {ckpt['step']}")
    elif resume_flag:
        say(f"resume=true but {ckpt_path} does not exist: starting from the beginning")

    seed = int(t["seed"])
    seed_rng(rank_seed(seed, d.rank))  # model init is overwritten by rank 0's weights under DDP

    # -- model: init weights (pretrained / init_from with masks) -> prepare -> calibrate ------------------------
    probe = create_model(cfg, init_weights=False)  # for the data config only (input size, mean/std)
    comp_cfg = cfg.get("compression") or {}
    calibrates = bool(comp_cfg) and comp_cfg.get("a_bits", 4) < 32 and comp_cfg.get("calib_batches", 32) > 0
    # an evaluate-only stage (paper fp: epochs 0) does not list the 1.28M training images
    data = build_data(cfg, probe, d, need_train=bool(t.get("max_steps") or t.get("epochs") or calibrates))
    del probe
    n_train = len(data["train"]) if "train" in data else 0
    plan = batch_plan(cfg, d, n_train)
    calib = ((lambda: calibration_batches(cfg, data["calib"], d, plan["global_batch"], plan["batch_size"]))
             if "calib" in data else None)
    t_build = time.time()
    own_init = not cfg.get("init_from") and ckpt is None  # else the weights come from the init run or checkpoint
    model, init_state = build_stage_model(cfg, lambda: create_model(cfg, init_weights=own_init), calib,
                                          do_calibrate=ckpt is None, train_device=d.device,
                                          calib_micro_batch=plan["batch_size"])
    model.to(d.device)
    if channels_last(cfg, d):
        model.to(memory_format=torch.channels_last)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"], strict=True)
    d.broadcast_module(model)  # masks were computed before DDP wrapping; identical everywhere, made sure here
    n_fixed = fix_one_sided_clips(model)  # after the broadcast: it reads the (now rank 0's) clip signs
    recipe = getattr(model, "compression_recipe", None)
    comp = compression_summary(model)
    say(f"model {model_label(cfg)}, {comp['total_params'] / 1e6:.2f}M params, init {init_source(cfg)}; recipe "
        f"{recipe.to_dict() if recipe else 'none (full precision)'}; backbone {comp['compression_ratio']}x "
        f"({comp['bits_per_backbone_weight']} bits/weight); built+calibrated in {time.time() - t_build:.1f}s"
        f"{f'; {n_fixed} one-sided clips fixed at 0' if n_fixed else ''}")
    distiller = build_distiller(cfg, lambda: create_model(cfg, init_weights=False))
    if distiller is not None:
        distiller.to(d.device)
        if channels_last(cfg, d):
            distiller.teacher.to(memory_format=torch.channels_last)
        say(f"KD from {cfg['kd']['teacher']} (lambda {distiller.lam}, T {distiller.temperature})")

    raw_model = model
    if d.world > 1:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[d.local_rank] if d.device.type == "cuda" else None,
            find_unused_parameters=bool(t.get("find_unused_parameters")))

    # -- optimisation -----------------------------------------------------------------------------------------
    total = plan["total_steps"]
    warm = t.get("warmup_steps") or 0
    warm = int(round(warm * total)) if isinstance(warm, float) and warm < 1 else int(warm)
    opt = build_optimizer(cfg, raw_model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_lambda(total, warm, float(t.get("min_lr_ratio") or 0.0)))
    scaler = torch.amp.GradScaler("cuda") if (t.get("amp") == "fp16" and d.device.type == "cuda") else None
    drop = cfg.get("dropout") or {}
    sdrop = ScheduledDropout(raw_model, total, drop.get("schedule", "constant"), float(drop.get("end_p", 0.0)),
                             step_at=drop.get("step_at"))
    say(f"world {plan['world']} x batch {plan['batch_size']} x accumulation {plan['accum']} = global batch "
        f"{plan['global_batch']}; {n_train} training images, {plan['steps_per_epoch']} steps/epoch, {total} steps "
        f"({total / max(1, plan['steps_per_epoch']):.2f} epochs), warm-up {warm}; {t['optimizer']} lr {t['lr']} "
        f"(cosine, per step), weight decay {t.get('weight_decay')}, grad clip {t.get('clip_grad_norm')}; dropout "
        f"{drop.get('schedule', 'constant')} -> {drop.get('end_p', 0.0)}; device {d.device}, "
        f"{torch.get_num_threads()} threads, amp {t.get('amp') or 'off'}")

    step, log_history, acc = 0, [], [0.0, 0]
    train_time = 0.0
    if ckpt is not None:
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        step, log_history = ckpt["step"], ckpt["log_history"]
        train_time = float(ckpt.get("train_time_s", 0.0))
        pos = ckpt.get("data_position", {})
        saved = ckpt.get("plan", {})
        if any(saved.get(k) != plan[k] for k in ("global_batch", "total_steps", "steps_per_epoch")):
            raise RunError(f"{ckpt_path}: saved with {saved}, but this run has {plan}; resume with the same global "
                           f"batch and step count (global batch {saved.get('global_batch')}; the number of processes "
                           f"may change, the global batch is kept across it)")
        if pos and pos.get("epoch") != step // max(1, plan["steps_per_epoch"]):
            raise RunError(f"{ckpt_path}: inconsistent data position {pos} at step {step}")
        saved_world = len(ckpt["rng_per_rank"])
        if saved_world == d.world:
            set_rng_state(ckpt["rng_per_rank"][d.rank], d)
            acc = list(ckpt["log_acc_per_rank"][d.rank])  # the loss sum since the last log line, of this rank
        else:
            # Another world size. Global batch k of an epoch is positions [k*G, (k+1)*G) of the epoch's permutation
            # whatever the world size (the sampler stripes it over the ranks), so the data order carries over; the
            # ranks' random streams (dropout, drop-path) cannot, and are reseeded from (seed, step, rank): choice
            seed_rng(rank_seed(seed + 1000 * step, d.rank))
            acc = [sum(a[0] for a in ckpt["log_acc_per_rank"]), sum(a[1] for a in ckpt["log_acc_per_rank"])] \
                if d.main else [0.0, 0]
            say(f"resumed at step {step} on {d.world} processes a checkpoint saved by {saved_world}: the same global "
                f"batches in the same order; dropout's random streams are reseeded, so it is not bit-identical to an "
                f"uninterrupted run")
        del ckpt

    sampler = ResumableSampler(data["train"], d.world, d.rank, seed) if total else None
    interrupt = cfg.get("interrupt_at_step")
    log_every, eval_every, save_every = int(t.get("log_every") or 0), int(t.get("eval_every") or 0), int(
        t.get("save_every") or 0)
    eval_ds = subset(data["val"], t.get("eval_subset"), seed + 3)  # periodic evaluations only

    def checkpoint_state():
        return {"step": step, "log_history": log_history, "log_acc_per_rank": d.gather_objects(list(acc)),
                "train_time_s": train_time,
                "plan": plan, "data_position": {"epoch": step // max(1, plan["steps_per_epoch"]),
                                                "samples_consumed_per_rank": (step % max(1, plan["steps_per_epoch"]))
                                                * plan["batch_size"] * plan["accum"]}}

    # -- training loop ----------------------------------------------------------------------------------------
    model.train()
    interrupted = False
    t_loop = time.time()
    step_at_loop = step
    while step < total and not interrupted:
        spe = plan["steps_per_epoch"]
        epoch, in_epoch = divmod(step, spe)
        sampler.set_position(epoch, in_epoch * plan["batch_size"] * plan["accum"])
        loader = DataLoader(data["train"], batch_size=plan["batch_size"], sampler=sampler, drop_last=True,
                            **loader_kwargs(cfg, d))
        batches = iter(loader)
        for _ in range(in_epoch, spe):
            sdrop.step(step)
            t_step = time.time()
            for micro in range(plan["accum"]):
                x, y = next(batches)
                x, y = to_device(x, cfg, d), y.to(d.device, non_blocking=True)
                sync = nullcontext() if (d.world == 1 or micro == plan["accum"] - 1) else model.no_sync()
                with sync:
                    with amp_context(cfg, d):
                        logits = model(x)
                        loss = nn.functional.cross_entropy(logits.float(), y,
                                                           label_smoothing=float(t.get("label_smoothing") or 0.0))
                        if distiller is not None:
                            loss = distiller(loss, logits.float(), distiller.teacher_outputs(x).float())
                    scaled = loss / plan["accum"]
                    (scaler.scale(scaled) if scaler is not None else scaled).backward()
                acc[0] += float(loss.detach())
                acc[1] += 1
            if scaler is not None:
                scaler.unscale_(opt)
            if t.get("clip_grad_norm"):
                nn.utils.clip_grad_norm_(raw_model.parameters(), float(t["clip_grad_norm"]))
            if scaler is not None:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
            step += 1
            train_time += time.time() - t_step

            if log_every and (step % log_every == 0 or step == total):
                s, n = d.all_sum([acc[0], acc[1]])
                acc = [0.0, 0]
                lr = opt.param_groups[0]["lr"]
                log_history.append({"step": step, "epoch": round(step / max(1, spe), 4), "loss": s / max(1, n),
                                    "lr": lr})
                done = step - step_at_loop
                rate = done * plan["global_batch"] / max(1e-9, time.time() - t_loop)
                eta = (total - step) * (time.time() - t_loop) / max(1, done)
                say(f"step {step}/{total} (epoch {step / max(1, spe):.2f}) loss {s / max(1, n):.4f} lr {lr:.3g} "
                    f"{rate:.0f} img/s eta {fmt_duration(eta)}")
            if eval_every and step % eval_every == 0 and step < total:
                ev = evaluate(raw_model, eval_ds, cfg, d)
                log_history.append({"step": step, "eval_top1": ev["top1"], "eval_top5": ev["top5"],
                                    "eval_loss": ev["loss"], "eval_samples": ev["samples"]})
                say(f"step {step}: eval top-1 {ev['top1']:.2f} top-5 {ev['top5']:.2f} on {ev['samples']} images")
            interrupted = bool(interrupt) and step == int(interrupt) and step < total
            if interrupted or (save_every and step % save_every == 0 and step < total):
                save_checkpoint(ckpt_path, raw_model, opt, sched, scaler, checkpoint_state(), d)
                if d.main:
                    write_json(out_dir / "log_history.json", log_history)
            if interrupted or step >= total:
                break

    if interrupted:
        say(f"interrupted at step {step} of {total} (interrupt_at_step); checkpoint {ckpt_path}; "
            f"continue with resume=true")
        return {"interrupted": True, "step": step}

    # -- final model, evaluation and run-dir outputs -----------------------------------------------------------
    sdrop.step(total)
    ev = evaluate(raw_model, data["val"], cfg, d, predictions=True)
    if total:
        log_history.append({"step": step, "eval_top1": ev["top1"], "eval_top5": ev["top5"], "eval_loss": ev["loss"],
                            "eval_samples": ev["samples"]})
    if d.main:
        save_model(out_dir / "model.safetensors", raw_model, cfg)
        write_predictions(out_dir / "predictions.csv", ev, data)
        write_json(out_dir / "log_history.json", log_history)
        save_weight_sample(out_dir, raw_model, init_state)
        extra = {"top1": ev["top1"], "top5": ev["top5"], "eval_loss": ev["loss"], "eval_samples": ev["samples"],
                 "global_batch_size": plan["global_batch"], "world_size": d.world, "epochs": round(
                     step / max(1, plan["steps_per_epoch"]), 4), "stage_wall_s": round(time.time() - t_start, 1),
                 "stage_cpu_s": round(time.process_time() - cpu_start, 1), "torch_threads": torch.get_num_threads()}
        out = stage_metrics(stage_cfg_for_metrics(cfg), raw_model, PIPELINE, "top1", True, extra, step, train_time)
        write_json(out_dir / "metrics.json", out)
        if not t.get("keep_checkpoint", True) and ckpt_path.exists():
            ckpt_path.unlink()
    else:
        out = {"top1": ev["top1"], "top5": ev["top5"]}
    d.barrier()
    say(f"{cfg['stage']}: top-1 {ev['top1']:.2f} top-5 {ev['top5']:.2f} on {ev['samples']} val images; "
        f"{step} steps in {fmt_duration(train_time)}, stage {fmt_duration(time.time() - t_start)} -> {out_dir}")
    return out


if __name__ == "__main__":
    cli(main)
