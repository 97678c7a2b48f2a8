"""Run directories shared by the three pipelines: output-dir safety, init checkpoints (with their masks),
metrics.json, and the weight sample the results page plots."""
from __future__ import annotations

import json
import os
import platform
import re
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

MODEL_FILES = ("model.safetensors", "pytorch_model.bin", "model.pt")


class RunError(ValueError):
    pass


class DataError(RunError):
    """A data file that cannot be used (unreadable, malformed); the message names the file."""


def is_main_process() -> bool:
    """Rank 0 (or not distributed): the process that writes files. Read from torchrun's environment."""
    return int(os.environ.get("RANK", "0")) == 0


def rank_seed(seed: int, rank: int) -> int:
    """The seed of one rank's own random streams (dropout, SpecAugment, drop-path). Rank 0 keeps `seed`, so one
    process draws as it always did; another rank gets a 31-bit value mixed from (seed, rank) by numpy's
    SeedSequence, because seed + rank would give rank 1 of seed 42 the streams of rank 0 of seed 43, which
    `reproduce.py --seeds` runs as the next seed (our choice)."""
    if rank == 0:
        return int(seed)
    return int(np.random.SeedSequence([int(seed) % 2**64, int(rank)]).generate_state(1)[0] >> 1)


# what a stage writes before it loads anything: a dir holding only these is a start that failed on its inputs
# (a wrong model path, a missing data file), which the corrected command may reuse unasked
STARTUP_FILES = {"config.yaml", "vocab.json", "tokenizer_config.json", "special_tokens_map.json",
                 "preprocessor_config.json", "added_tokens.json", "processor_config.json"}


def prepare_output_dir(path: str | Path, overwrite: bool = False, resume: bool = False,
                       cfg: dict | None = None) -> Path:
    """Refuse to write into a non-empty run dir unless asked: nothing a user made is overwritten silently (a dir
    holding only the STARTUP_FILES of a failed start excepted). resume=true refuses a finished run (it would train
    over it) and, given the stage's `cfg`, names what differs from the run's config.yaml. Only
    rank 0 checks and clears it; other ranks of a distributed run just use it."""
    path = Path(path)
    if not is_main_process():
        path.mkdir(parents=True, exist_ok=True)
        return path
    failed_start = path.is_dir() and {p.name for p in path.iterdir()} <= STARTUP_FILES
    if path.exists() and any(path.iterdir()) and not (overwrite or resume or failed_start):
        raise RunError(f"{path}: output directory exists and is not empty; pass overwrite_output_dir=true to "
                       f"replace it, or resume=true to continue its last checkpoint")
    if resume and not overwrite:
        check_resume(path, cfg)
    if overwrite and path.exists() and not resume:
        import shutil
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def check_resume(path: Path, cfg: dict | None) -> None:
    """resume=true: not on a finished run; and say which of the stage's settings differ from the ones the run was
    started with (per-device batch, world size and logging may change legitimately; the checkpoint's optimizer,
    scheduler and clips come from the run either way)."""
    if (path / "metrics.json").exists():
        raise RunError(f"{path}: a finished run (metrics.json): resume=true has nothing to continue (it would "
                       f"train over the finished run); pass overwrite_output_dir=true to train it again, or give "
                       f"another output_dir")
    if cfg is None or not (path / "config.yaml").is_file():
        return
    from .config import ConfigError, config_changes, read_yaml_mapping
    try:
        saved = read_yaml_mapping(path / "config.yaml", RunError, "run config")
    except (RunError, ConfigError) as e:
        print(f"warning: resuming without comparing configs: {e}", file=sys.stderr, flush=True)
        return
    if changes := config_changes(saved, cfg, most=6):
        print(f"warning: resuming {path} with settings other than its config.yaml's ({changes}); the checkpoint's "
              f"optimizer, scheduler and clips are the run's", file=sys.stderr, flush=True)


# A data generator's own folder: written before any data, so that an interrupted build (no params.json, the mark of
# a complete one, yet) is still known as the generator's and rebuilt, while a user's data in its place is refused.
GENERATED_MARK = ".made_by_generator"


def mark_generated(out_dir: str | Path, by: str) -> None:
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / GENERATED_MARK).write_text(by + "\n")


def generated_here(out_dir: str | Path) -> bool:
    """out_dir was written by a data generator (its mark, or the params.json of data made before the mark)."""
    return (Path(out_dir) / GENERATED_MARK).is_file() or (Path(out_dir) / "params.json").is_file()


def foreign_outputs(out_dir: str | Path, outputs) -> list[str]:
    """Those of a generator's `outputs` (paths) that exist in an out_dir it did not write: a user's data, which a
    rebuild would replace."""
    return [] if generated_here(out_dir) else [str(p) for p in outputs if os.path.exists(p)]


def not_generated(found: list, switch: str) -> RunError:
    """The error of a pipeline whose mini-data generator would replace `found`, data it did not write."""
    return RunError(f"{', '.join(map(str, found))}: not made by the mini generator, which would replace it: set "
                    f"{switch} to read it as it is, or point the data path elsewhere")


def find_model_file(run_dir: str | Path, what: str = "checkpoint") -> Path:
    run_dir = Path(run_dir)
    if run_dir.is_file():
        return run_dir
    for name in MODEL_FILES:
        if (run_dir / name).exists():
            return run_dir / name
    raise RunError(f"{run_dir}: no {what} found (looked for {', '.join(MODEL_FILES)}); run the stage that "
                   f"produces it first, or point the config at an existing run dir")


def load_state(run_dir: str | Path, what: str = "init checkpoint") -> dict[str, torch.Tensor]:
    f = find_model_file(run_dir, what)
    if f.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(f))
    state = torch.load(f, map_location="cpu", weights_only=True)
    return state.get("model", state) if isinstance(state, dict) else state


def split_state(state: dict[str, torch.Tensor]):
    """(plain model weights, {linear name: mask}); quantizer state of an earlier stage is dropped, since each
    stage calibrates its own clips (choice: the init checkpoint decides weights and masks only)."""
    from .prepare import masks_of
    masks = masks_of(state)
    quant_suffixes = (".mask", ".lo", ".hi", ".signed", ".weight_codes", ".weight_step")
    plain = {k: v for k, v in state.items() if not k.endswith(quant_suffixes)}
    return plain, masks


def _may_differ(model: torch.nn.Module, which: str) -> list[str]:
    # the model's own (Hugging Face) patterns of keys a checkpoint may lack or carry, e.g. a parameter that exists
    # only while a training option is on (wav2vec2's SpecAugment embedding)
    return list(getattr(model, f"_keys_to_ignore_on_load_{which}", None) or [])


def untied_missing(model: torch.nn.Module, missing: list[str]) -> list[str]:
    """The `missing` keys (of a load_state_dict just done) that the model does not tie back itself. save_pretrained
    leaves out a tied copy (GPT-2's lm_head.weight, T5's embed_tokens); transformers 5.x's own tie_weights, as
    from_pretrained calls it, ties each such key to the loaded one and drops it from the set."""
    if not missing or not hasattr(model, "get_expanded_tied_weights_keys"):
        return list(missing)
    left = set(missing)
    model.tie_weights(missing_keys=left)
    return [k for k in missing if k in left]


def _conv1d_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    pu = sys.modules.get("transformers.pytorch_utils")  # a model holding Conv1D has imported it already
    conv1d = getattr(pu, "Conv1D", None)
    return {n: m for n, m in model.named_modules() if conv1d is not None and type(m) is conv1d}


def conv1d_as_unprepared(model: torch.nn.Module, state: dict, recipe) -> dict:
    """`state`, a checkpoint of `model` prepared with `recipe` (None: never prepared), in the unprepared layout:
    prepare holds a transformers Conv1D's weight transposed, [out, in], and the recipe's plan says exactly which
    layers it took. Models without Conv1D get `state` itself."""
    convs = _conv1d_modules(model)
    if recipe is None or not convs:
        return state
    from .plan import prepare_plan
    flip = [n for n in prepare_plan(model, recipe).compress if n in convs and n + ".weight" in state]
    return {**state, **{n + ".weight": state[n + ".weight"].t().contiguous() for n in flip}} if flip else state


def load_into(model: torch.nn.Module, state: dict, source: str, strict_backbone: bool = True) -> None:
    """load_state_dict with an error that names the checkpoint when it does not fit the model; keys the model ties
    back itself (untied_missing) may be absent."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in untied_missing(model, missing) if not k.endswith((".lo", ".hi", ".signed", ".mask"))
               and not any(re.search(p, k) for p in _may_differ(model, "missing"))]
    unexpected = [k for k in unexpected if not any(re.search(p, k) for p in _may_differ(model, "unexpected"))]
    if strict_backbone and (missing or unexpected):
        raise RunError(f"{source}: checkpoint does not match the model: missing {missing[:5]}"
                       f"{'…' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                       f"{'…' if len(unexpected) > 5 else ''}")


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else the platform's processor or machine name."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware(world: int | None = None) -> str:
    """The machine, for metrics.json; `world` (default: torchrun's WORLD_SIZE) > 1 says how many processes ran."""
    world = int(os.environ.get("WORLD_SIZE", "1")) if world is None else world
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        machine = f"{n}x {torch.cuda.get_device_name(0)}"
    else:
        machine = f"CPU {cpu_model()} ({platform.machine()}), {os.cpu_count()} cores, {torch.get_num_threads()} threads"
    return f"{world} processes on {machine}" if world > 1 else machine


def stage_metrics(cfg: dict, model: torch.nn.Module, pipeline: str, main_metric: str, higher_is_better: bool,
                  metrics: dict, train_steps: int = 0, runtime_s: float = 0.0) -> dict:
    """The metrics.json contract that results/make_results.py reads (see results/README.template.md)."""
    from .report import compression_summary
    comp = compression_summary(model)
    kd = cfg.get("kd") or {}
    dropout = cfg.get("dropout") or {}
    out = {
        "pipeline": pipeline, "stage": cfg.get("stage"), "scale": cfg.get("scale"),
        "model": str(cfg.get("model_name_or_path")),
        "main_metric": main_metric, "higher_is_better": higher_is_better,
        **{k: (round(float(v), 4) if isinstance(v, float) else v) for k, v in metrics.items()},
        **{k: comp[k] for k in ("w_bits", "a_bits", "sparsity", "quantize_attention", "zero_preserving",
                                "bits_per_backbone_weight", "compression_ratio", "backbone_params",
                                "total_params")},
        "kd": bool(kd.get("enabled")), "dropout_schedule": dropout.get("schedule", "constant"),
        "init_from": str(cfg.get("init_from") or cfg.get("model_name_or_path")),
        "train_steps": int(train_steps), "train_runtime_s": round(float(runtime_s), 1),
        "hardware": hardware(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if comp["w_bits"] < 32:  # which matmul the compressed linears ran: each rounds in its own way (int_matmul.py)
        from . import int_matmul
        out["int_matmul"] = "unused (GPU)" if torch.cuda.is_available() else int_matmul.describe()
    if cfg.get("ablation"):
        out["ablation"] = cfg["ablation"]
    out["seed"] = (cfg.get("train") or {}).get("seed")
    if cfg.get("seed_repeat"):  # an extra seed of this stage (reproduce.py --seeds): results/ reports the spread
        out["seed_repeat"] = int(cfg["seed_repeat"])
    if cfg.get("mini_scale_note"):
        out["mini_scale_note"] = cfg["mini_scale_note"]
    return out


def write_json(path: str | Path, obj) -> None:
    Path(path).write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


@torch.no_grad()
def save_weight_sample(run_dir: str | Path, model: torch.nn.Module, init_state: dict | None,
                       write: bool = True) -> None:
    """One backbone layer's weight before (the init checkpoint) and after compression (its effective weight).
    Under FSDP2 every rank must call it (the weights are gathered); pass write=False on all but one."""
    from .prepare import compressed_linears
    from .sharding import full_tensor
    lins = compressed_linears(model)
    if not lins:
        return
    name, lin = next(iter(lins.items()))
    after = lin.effective_weight()
    before = (init_state or {}).get(name + ".weight")
    if before is None:
        before = full_tensor(lin.weight) if getattr(lin, "weight", None) is not None else after
    if not write:
        return
    np.savez_compressed(Path(run_dir) / "weight_sample.npz", before=before.float().cpu().numpy(),
                        after=after.float().cpu().numpy(), layer=np.array([name]))


def read_metrics(run_dir: str | Path) -> dict:
    """A run's metrics.json, {} when it has none; a damaged one is an error that names it."""
    path = Path(run_dir) / "metrics.json"
    if not path.is_file():
        return {}
    try:
        m = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise RunError(f"{path}: not readable as JSON ({e})") from None
    if not isinstance(m, dict):
        raise RunError(f"{path}: not a JSON object")
    return m


def check_run_of(run_dir: str | Path, pipeline: str) -> None:
    """Refuse a dir that is not a run of `pipeline` before a model is built from it (the error would otherwise
    come from deep inside the model code)."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise RunError(f"{run_dir}: not a {pipeline} run dir (no config.yaml)")
    made_by = read_metrics(run_dir).get("pipeline")
    if made_by and made_by != pipeline:
        raise RunError(f"{run_dir}: a {made_by} run (metrics.json), not a {pipeline} one; use python -m "
                       f"{made_by}.eval")


# what only the training run knows: a re-evaluation keeps these from its metrics.json
TRAINING_FACTS = ("date", "hardware", "train_steps", "train_runtime_s", "effective_train_batch_size", "learning_rate")


def reevaluated(prev: dict, new: dict) -> dict:
    """metrics.json after a re-evaluation: the new evaluation's numbers; the training run's own facts (when and
    where it trained, its steps and times, and every key only training writes) kept; eval_date/eval_hardware
    say when and where this evaluation ran."""
    out = {**prev, **new, **{k: prev[k] for k in TRAINING_FACTS if k in prev}}
    out.update(eval_date=new["date"], eval_hardware=new["hardware"])
    return out


def input_errors() -> tuple[type[Exception], ...]:
    """The errors of bad input, which name it: a config, a run dir, a recipe, a missing file."""
    from .config import ConfigError
    from .recipe import RecipeError
    return ConfigError, RunError, RecipeError, FileNotFoundError


def error_text(e: Exception) -> str:
    """The message of a bad-input error, for one line. An error raised in a DataLoader worker (reading audio with
    workers > 0) reaches the main process re-raised by torch with the worker's traceback in its message ("Caught
    DataError in DataLoader worker process 0. Original Traceback ..."): its own message is what follows the
    traceback's last line's class name."""
    text = str(e)
    if text.startswith("Caught ") and "\nOriginal Traceback" in text:
        _, sep, own = text.rstrip().rpartition(f"{type(e).__name__}: ")
        if sep:
            return own
    return text


def cli(main, *own_errors: type[Exception]) -> None:
    """A script's entry point: bad input (`input_errors`, or one of the script's `own_errors`) ends with one line
    naming it (exit 2), not a traceback; anything else is a bug and keeps its traceback."""
    try:
        main()
    except (*input_errors(), *own_errors) as e:
        print(f"error: {error_text(e)}", file=sys.stderr)
        sys.exit(2)
