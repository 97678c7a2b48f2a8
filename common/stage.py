"""One stage of the paper's staged recipe, shared by the pipelines ("critical initialization", paper §3):
start from the configured init checkpoint (with its 2:4 masks), prepare with the stage's recipe, calibrate the
activation clips, and build the frozen full-precision teacher for distillation."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn

from .config import ConfigError, check_open_section, source_of
from .distill import DistillationLoss
from .dropout import SCHEDULES
from .fast_dropout import use_fast_dropout
from .prepare import calibrate, prepare
from .recipe import Recipe, RecipeError
from .runs import (RunError, conv1d_as_unprepared, find_model_file, load_into, load_state, split_state,
                   untied_missing)


def stage_recipe(cfg: dict) -> Recipe | None:
    comp = cfg.get("compression")
    if not comp:
        return None
    try:
        return Recipe.from_dict(comp, source=f"{cfg.get('config_file', 'config')}: compression")
    except RecipeError:
        raise


def check_stage_config(cfg: dict, overrides: list[str] | None) -> None:
    """The `compression` section (keys and values, as the stage will build its Recipe) and the dropout schedule,
    checked when the config is loaded: in reproduce.py's up-front check a typo there would otherwise surface only
    when its stage starts, after the stages before it have trained."""
    src = cfg.get("config_file", "config")
    for section in ("compression", "dropout"):
        if cfg.get(section) is not None and not isinstance(cfg[section], dict):
            raise ConfigError(f"{source_of(cfg, overrides, section)}: '{section}' must be a mapping (or null), got "
                              f"{cfg[section]!r} (in {src})")
    if cfg.get("compression"):
        check_open_section(cfg, overrides, "compression", {f.name for f in dataclasses.fields(Recipe)},
                           "the fields of common.Recipe")
        try:
            Recipe.from_dict(cfg["compression"], source="compression")
        except (RecipeError, TypeError, ValueError) as e:
            typed = any(source_of(cfg, overrides, f"compression.{k}") == "command line" for k in cfg["compression"])
            where = "command line (or the stage file)" if typed else source_of(cfg, overrides, "compression")
            raise ConfigError(f"{where}: {e}" if isinstance(e, RecipeError) else
                              f"{where}: compression: a value of the wrong type ({e})") from None
    drop = cfg.get("dropout") or {}
    if "schedule" in drop and drop["schedule"] not in SCHEDULES:
        raise ConfigError(f"{source_of(cfg, overrides, 'dropout.schedule')}: 'dropout.schedule' must be one of "
                          f"{', '.join(SCHEDULES)}, got {drop['schedule']!r}")
    # p null keeps the model's own rates; end_p has no such meaning (the schedules compute with it)
    for key, what, nullable in (("p", "a probability in [0, 1] or null", True),
                                ("end_p", "a probability in [0, 1]", False),
                                ("step_at", "a fraction of training in [0, 1] or null", True)):
        v = drop.get(key)
        if key not in drop or v is None and nullable:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
            raise ConfigError(f"{source_of(cfg, overrides, f'dropout.{key}')}: 'dropout.{key}' must be {what}, "
                              f"got {v!r}")


def _existing_dir(cfg: dict, key: str, value) -> Path:
    p = Path(str(value))
    if not p.exists():
        raise RunError(f"{cfg.get('config_file', 'config')}: '{key}' points to {p}, which does not exist; "
                       f"run that stage first or override {key}=PATH")
    return p


def _load_checkpoint(model: nn.Module, src: Path, what: str):
    """Load a run dir's weights into the unprepared `model`; -> (weights as loaded, {linear name: mask}). A run
    prepared with the recipe in its config.yaml (a previous stage) has its Conv1D weights turned back."""
    from .config import read_yaml_mapping
    saved = src / "config.yaml"
    recipe = stage_recipe(read_yaml_mapping(saved, RunError, "run config")) if src.is_dir() and saved.is_file() \
        else None
    state, masks = split_state(conv1d_as_unprepared(model, load_state(src, what), recipe))
    load_into(model, state, str(src))
    return state, masks


def build_stage_model(cfg: dict, build_model: Callable[[], nn.Module], calib_batches: Callable[[], Iterable] | None,
                      do_calibrate: bool = True, train_device=None, calib_micro_batch: int | None = None):
    """-> (model, init_state). `build_model()` returns the architecture with its starting weights
    (pre-trained from the hub/local path); `cfg["init_from"]` (a previous stage's run dir) replaces them.
    `calib_batches()` yields global batches, the same on every rank, so the clips do not depend on the number of
    processes; they are forwarded in slices of `calib_micro_batch` (the per-device batch) to bound memory, on
    `train_device` (the model is moved there first). Training on CPU, dropout.fast_cpu (default true) swaps in
    common.fast_dropout."""
    model = build_model()
    init_state = None
    masks = {}
    if cfg.get("init_from"):
        src = _existing_dir(cfg, "init_from", cfg["init_from"])
        init_state, masks = _load_checkpoint(model, src, "init checkpoint")
    else:
        init_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    recipe = stage_recipe(cfg)
    if recipe is not None:
        prepare(model, recipe, masks if recipe.nm else None)
        if do_calibrate and recipe.quantize_acts and recipe.calib_batches > 0 and calib_batches is not None:
            if train_device is not None:
                model.to(train_device)
            calibrate(model, calib_batches(), micro_batch=calib_micro_batch, device=train_device)
    if (train_device is not None and torch.device(train_device).type == "cpu"
            and (cfg.get("dropout") or {}).get("fast_cpu", True)):
        use_fast_dropout(model)
    return model, init_state


def build_distiller(cfg: dict, build_model: Callable[[], nn.Module]) -> DistillationLoss | None:
    kd = cfg.get("kd") or {}
    if not kd.get("enabled"):
        return None
    if not kd.get("teacher"):
        raise RunError(f"{cfg.get('config_file', 'config')}: kd.enabled is true but kd.teacher (the FP run dir) "
                       f"is not set")
    src = _existing_dir(cfg, "kd.teacher", kd["teacher"])
    teacher = build_model()
    _load_checkpoint(teacher, src, "teacher checkpoint")
    return DistillationLoss(teacher, lam=float(kd.get("lambda", 0.5)), temperature=float(kd.get("temperature", 2.0)),
                            hidden_weight=float(kd.get("hidden_weight", 0.0)))


def load_hf_run(run_dir, build_from_dir: Callable[[Path], nn.Module], overrides: list[str] | None = None):
    """(cfg, model) of a finished Hugging Face run: architecture from its config.json (via `build_from_dir`),
    prepared with the recipe in its config.yaml, weights loaded strictly from its model file."""
    from .config import _merge, parse_overrides, read_yaml_mapping
    from .prepare import prepare
    run_dir = Path(run_dir)
    cfg_file = run_dir / "config.yaml"
    if not cfg_file.exists():
        raise RunError(f"{run_dir}: not a run directory (no config.yaml)")
    cfg = read_yaml_mapping(cfg_file, RunError, "run config")
    if overrides:
        cfg = _merge(cfg, parse_overrides(overrides), "command line")
    if not (run_dir / "config.json").exists():
        raise RunError(f"{run_dir}: no config.json (the run did not finish; resume it with resume=true)")
    model = build_from_dir(run_dir)
    recipe = stage_recipe(cfg)
    if recipe is not None:
        prepare(model, recipe)
    missing, unexpected = model.load_state_dict(load_state(run_dir, "trained model"), strict=False)
    missing = untied_missing(model, missing)  # save_pretrained leaves tied copies out
    if missing or unexpected:
        raise RunError(f"{find_model_file(run_dir)}: saved weights do not match the recipe in config.yaml: "
                       f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    return cfg, model.eval()
