"""`make reproduce`: run every stage (and ablation) of every pipeline at one scale, then regenerate results/.

    python reproduce.py --scale mini [--quick 1] [--force 1] [--seeds N] [--pipelines bert_squad vit_imagenet ...]

A stage whose run dir already has metrics.json and the same resolved config is skipped, one interrupted with the same
config is resumed, and a run dir made with another config is moved under <pipeline>/.replaced/, never deleted
(FORCE=1 redoes every stage in place).
--seeds N (N > 1) then runs every stage but fp N-1 more times with other seeds (train.seed + k), into
<stage>_seed<k>/, on the same upstream runs (the fp teacher, the init_from checkpoints of the default seed):
results/seeds.md reports each stage's spread, and the ablation deltas against it.
SCALE=paper first checks that every model and data set the configs name is reachable, and stops with a list of
what is missing before anything runs. --nproc N (NPROC=N) runs each stage on N processes of one node with torchrun
(TORCHRUN_ARGS adds flags); every stage keeps its configured global batch (common.config.split_global_batch).
"""
from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import shlex
import subprocess
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from common.config import ConfigError, comparable, config_changes  # noqa: E402

MAIN = ["fp", "sparse", "qat4", "qat4_dense"]
ABLATIONS = ["abl_no_kd", "abl_const_dropout", "abl_plain_grid", "abl_oneshot", "abl_quant_first",
             "abl_pretrained_init"]
PIPELINES = ("bert_squad", "vit_imagenet", "wav2vec_librispeech")


def config_path(pipeline: str, scale: str, stage: str) -> Path:
    return ROOT / pipeline / "configs" / ("mini" if scale == "mini" else "") / f"{stage}.yaml"


def stages_of(pipeline: str, scale: str, quick: bool) -> list[str]:
    wanted = MAIN + ([] if quick else ABLATIONS)
    return [s for s in wanted if config_path(pipeline, scale, s).exists()]


def resolved(pipeline: str, scale: str, stage: str, overrides: list[str] | None = None) -> dict:
    """The stage's config as its train.py resolves and checks it (`load_stage_config`: the `train` keys, and ViT's
    own values), so that the up-front check stops on what the stage itself would stop on."""
    load = importlib.import_module(f"{pipeline}.train").load_stage_config
    return load(config_path(pipeline, scale, stage), overrides or [])


def seed_suffix(k: int) -> str:
    """What the k-th extra seed adds to a stage's name and run dir (nothing for the default seed)."""
    return f"_seed{k}" if k else ""


def repeat_overrides(cfg: dict, k: int) -> list[str]:
    """The k-th extra seed of a stage (choice: the seed, data order, dropout and calibration batches change;
    the upstream checkpoints stay those of the default seed, so the spread is this stage's own)."""
    return [f"seed_repeat={k}", f"train.seed={int(cfg['train']['seed']) + k}",
            f"output_dir={cfg['output_dir']}{seed_suffix(k)}"]


def run_state(cfg: dict) -> str:
    """What the stage's run dir holds: "" (nothing), "done" (metrics.json, same config), "interrupted" (same config,
    no metrics.json yet: resumed, not restarted) or "other" (another config, unreadable, or built from an upstream
    run trained again since: kept aside, see set_aside; `inspect_run` says why)."""
    return inspect_run(cfg)[0]


def inspect_run(cfg: dict) -> tuple[str, str]:
    """(run_state, why it is "other")."""
    from common.config import read_yaml_mapping
    from common.runs import RunError, read_metrics
    run = Path(cfg["output_dir"])
    if not run.is_dir() or not any(run.iterdir()):
        return "", ""
    try:
        saved = read_yaml_mapping(run / "config.yaml", RunError, "run config")
    except RunError as e:
        return "other", str(e)
    if comparable(saved) != comparable(cfg):
        return "other", f"made with another config ({config_changes(saved, cfg)})"
    try:
        own = read_metrics(run).get("date")
    except RunError as e:
        return "other", str(e)
    started = own or datetime.fromtimestamp((run / "config.yaml").stat().st_mtime, timezone.utc).isoformat()
    if newer := upstream_trained_since(cfg, started):
        return "other", newer
    return ("done" if (run / "metrics.json").exists() else "interrupted"), ""


def upstream_trained_since(cfg: dict, since: str) -> str:
    """Which run the stage starts from (init_from) or distils from (kd.teacher) was trained again after `since`
    (an ISO date): the stage must be redone on it. "" if none."""
    from common.runs import RunError, read_metrics
    kd = cfg.get("kd") or {}
    for key, up in (("init_from", cfg.get("init_from")), ("kd.teacher", kd.get("teacher") if kd.get("enabled")
                                                                   else None)):
        try:
            date = read_metrics(up).get("date") if isinstance(up, str) else None
            if date and datetime.fromisoformat(date) > datetime.fromisoformat(since):
                return f"its {key} {up} was trained again since ({date})"
        except (RunError, TypeError, ValueError):  # a damaged upstream run: the stage names it when it starts
            continue
    return ""


def set_aside(run: Path) -> Path:
    """Move a run dir made with another config to <pipeline dir>/.replaced/<name>-<UTC time> rather than delete it
    (nothing a user made is lost unasked); the leading dot keeps it out of results/make_results.py."""
    stamp = f"{run.name}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
    dest, k = run.parent / ".replaced" / stamp, 1
    while dest.exists():  # two set aside within a second
        dest, k = run.parent / ".replaced" / f"{stamp}-{k}", k + 1
    dest.parent.mkdir(parents=True, exist_ok=True)
    run.rename(dest)
    return dest


def batch_problems(pipeline: str, scale: str, stages: list[str], nproc: int,
                   overrides: list[str] | None = None) -> list[str]:
    """The stages whose global batch cannot be kept on `nproc` processes, found before anything runs: each
    pipeline's train.py splits its own batch keys (`batch_split(cfg, world)`), so they are named in one place."""
    split = importlib.import_module(f"{pipeline}.train").batch_split
    problems = []
    for stage in stages:
        try:
            split(resolved(pipeline, scale, stage, overrides), nproc)
        except ConfigError as e:
            problems.append(str(e))  # names the stage's config file, as train.py would
    return problems


def missing_inputs(pipeline: str, scale: str, stages: list[str] | None = None,
                   overrides: list[str] | None = None) -> list[str]:
    """What the paper-scale configs of `stages` (default: all) need that is not on disk and not reachable on the
    hub."""
    problems = []
    for stage in stages or stages_of(pipeline, scale, quick=False):
        cfg = resolved(pipeline, scale, stage, overrides)
        data = cfg.get("data") or {}
        hub_data = data.get("source") == "hf"  # ViT: the hub's ImageNet, data_dir unused
        for section in (cfg, data):
            for key, val in section.items():
                if isinstance(val, str) and key.endswith(("_file", "_dir", "_root", "data_dir")) \
                        and key not in ("output_dir", "runs_dir", "cache_dir", "hf_cache_dir") \
                        and not (hub_data and key == "data_dir") and not Path(val).exists():
                    problems.append(f"{pipeline}/{stage}: {key}={val} does not exist")
        name = cfg.get("model_name_or_path") or cfg.get("model_name")
        if name and not Path(str(name)).exists() and not cfg.get("init_from"):
            if not hub_reachable(str(name), "model"):
                problems.append(f"{pipeline}/{stage}: model {name!r} is neither a local path, in the local "
                                f"Hugging Face cache, nor reachable on the hub")
        problems += timm_model_problems(cfg, f"{pipeline}/{stage}")
        ds = data.get("dataset_name")
        if hub_data:
            from vit_imagenet.data import HF_IMAGENET
            ds = ds or HF_IMAGENET
        if ds and (hub_data or not any(data.get(k) for k in ("train_file", "librispeech_root", "data_dir"))):
            if not hub_reachable(str(ds), "dataset"):
                why = "data.source is hf" if hub_data else "no local files are configured"
                problems.append(f"{pipeline}/{stage}: data set {ds!r} is neither in the local Hugging Face cache "
                                f"nor reachable on the hub, and {why}")
    return sorted(set(problems))


def timm_model_problems(cfg: dict, where: str) -> list[str]:
    """The timm `model:` block (ViT): its local files exist, or its pretrained weights are on the hub."""
    m = cfg.get("model")
    if not isinstance(m, dict) or not m.get("name") or cfg.get("init_from"):  # weights from that run: none read
        return []
    local = {"model.checkpoint_path": m.get("checkpoint_path"),
             "model.pretrained_cfg_overlay.file": (m.get("pretrained_cfg_overlay") or {}).get("file")}
    problems = [f"{where}: {key}={val} does not exist" for key, val in local.items() if val and not Path(val).exists()]
    if not m.get("pretrained") or any(local.values()):
        return problems
    from timm.models import get_pretrained_cfg
    try:
        hub_id = get_pretrained_cfg(m["name"]).hf_hub_id
    except Exception as e:  # unknown architecture or tag
        return problems + [f"{where}: model.name {m['name']!r}: {e}"]
    if not hub_id or not hub_reachable(hub_id, "model"):
        problems.append(f"{where}: the pretrained weights of timm model {m['name']!r} ({hub_id or 'no hub id'}) are "
                        f"neither in the local Hugging Face cache nor reachable on the hub; set "
                        f"model.pretrained_cfg_overlay.file=/path/model.safetensors or model.checkpoint_path")
    return problems


def hub_reachable(name: str, kind: str) -> bool:
    """On the hub, or already in the local Hugging Face cache (an offline machine with the files downloaded)."""
    try:
        from huggingface_hub import snapshot_download
        snapshot_download(name, repo_type=kind, local_files_only=True)
        return True
    except Exception:
        pass
    try:
        from huggingface_hub import HfApi
        api = HfApi()
        (api.model_info if kind == "model" else api.dataset_info)(name, timeout=10)
        return True
    except Exception:
        return False


def call_main(module: str, argv: list[str], isolate: bool) -> int:
    """`python -m module argv`, in this process by default: one process for all stages saves the imports and the
    kernel compilation per stage (~10-15 s each at mini scale); isolate=True runs it in a subprocess instead.
    The tests chain the train.py mains in one process the same way, so in-process runs are the tested path."""
    if isolate:
        return subprocess.call([sys.executable, "-m", module, *argv], cwd=ROOT)
    from common.runs import error_text, input_errors
    threads = torch_threads()
    try:
        importlib.import_module(module).main(argv)
        return 0
    except SystemExit as e:  # argparse and explicit exits keep their exit status
        return e.code if isinstance(e.code, int) else 1
    except input_errors() as e:  # one line naming it, as the script's own entry point (common.runs.cli) gives
        print(f"error: {error_text(e)}", file=sys.stderr, flush=True)
        return 2
    except Exception:  # one failed stage is reported and the others still run, as with a subprocess
        traceback.print_exc()
        return 1
    finally:
        torch_threads(threads)  # a stage may set its own thread count
        gc.collect()


def torch_threads(n: int | None = None) -> int:
    import torch
    if n is not None:
        torch.set_num_threads(n)
    return torch.get_num_threads()


def run_stage(pipeline: str, scale: str, stage: str, isolate: bool = False, overrides: list[str] | None = None,
              nproc: int = 1, resume: bool = False) -> int:
    start = "resume=true" if resume else "overwrite_output_dir=true"
    argv = ["--config", str(config_path(pipeline, scale, stage)), start, *(overrides or [])]
    if nproc > 1:
        return subprocess.call(torchrun(nproc) + ["-m", f"{pipeline}.train", *argv], cwd=ROOT)
    return call_main(f"{pipeline}.train", argv, isolate)


def torchrun(nproc: int) -> list[str]:
    """The launcher of run_stage.sh (NPROC=N PIPELINE/train.sh), with the flags of TORCHRUN_ARGS."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            *shlex.split(os.environ.get("TORCHRUN_ARGS", ""))]


def record_time(runs_dir: str, scale: str, pipeline: str, stage: str, seconds: float, status: str,
                isolate: bool, repeat: int = 0, nproc: int = 1, output_dir: str | None = None) -> None:
    """RUNS_DIR/<scale>/reproduce_times.json: the wall time of each stage's last run through this script (train,
    evaluation and export), for the run-time table of results/README.md. Stages skipped as done keep theirs.
    The hardware is the one the run's metrics.json names (a stage may set its own thread count; the export after
    it runs in this process), else this process's."""
    from common.runs import RunError, hardware, read_metrics
    try:
        hw = read_metrics(output_dir).get("hardware") if output_dir else None
    except RunError:  # a damaged metrics.json: make_results names it; the time still counts
        hw = None
    path = Path(runs_dir) / scale / "reproduce_times.json"
    try:
        times = json.loads(path.read_text())
    except (OSError, ValueError):
        times = {}
    times[f"{pipeline}/{stage}{seed_suffix(repeat)}"] = {
        "pipeline": pipeline, "stage": stage, "main_row": stage in MAIN and not repeat, "seconds": round(seconds, 1),
        "status": status, "hardware": hw if isinstance(hw, str) else hardware(nproc), "in_process": not isolate,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()), **({"seed_repeat": repeat} if repeat else {})}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(times, indent=1) + "\n")


def export_if_quantized(cfg: dict, pipeline: str, isolate: bool = False) -> int:
    """Packed 4-bit checkpoint + compression.json (real bytes) for the results table's compression columns.
    Returns the export's exit status (0 when there is nothing to export)."""
    comp = cfg.get("compression") or {}
    run = Path(cfg["output_dir"])
    if comp.get("w_bits", 4) >= 32 or not cfg.get("compression") or not (run / "metrics.json").exists():
        return 0
    if (run / "compression.json").exists() and (run / "compression.json").stat().st_mtime >= \
            (run / "metrics.json").stat().st_mtime:
        return 0
    argv = [str(run), str(run / "model.c16.safetensors"), "--pipeline", pipeline, "--overwrite"]
    rc = call_main("common.export", argv, isolate)
    print(f"[reproduce] {pipeline}/{cfg['stage']}: export {'ok' if rc == 0 else f'FAILED (exit {rc})'}", flush=True)
    return rc


def split_override(o: str) -> tuple[str | None, str]:
    """'[PIPELINE[/STAGE]:]KEY=VALUE' -> (the prefix or None, 'KEY=VALUE'); a ':' after the '=' is the value's."""
    head, sep, rest = o.partition(":")
    return (head, rest) if sep and "=" not in head else (None, o)


def overrides_for(pipeline: str, stage: str, given: list[str]) -> list[str]:
    """The --set overrides that apply to a stage: unprefixed ones, PIPELINE: ones of its pipeline, and
    PIPELINE/STAGE: ones of itself, in that order whatever their order on the command line, so that the more
    specific one wins (abl_pretrained_init's own model_name_or_path over a pipeline-wide one)."""
    levels = (None, pipeline, f"{pipeline}/{stage}")
    split = [split_override(o) for o in given]
    return [kv for level in levels for prefix, kv in split if prefix == level]


def main(argv=None) -> int:
    cwd = os.getcwd()
    try:
        return _main(argv)
    finally:
        os.chdir(cwd)  # main() also runs in-process (tests)


def _main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", choices=["mini", "paper"], default="mini")
    ap.add_argument("--runs-dir", default=os.environ.get("RUNS_DIR") or "runs",
                    help="where run dirs go: RUNS_DIR/<scale>/<pipeline>/<stage>/ (default: $RUNS_DIR or ./runs)")
    ap.add_argument("--quick", type=int, default=0, help="1: only the main rows, no ablations")
    ap.add_argument("--force", type=int, default=0, help="1: redo finished stages")
    ap.add_argument("--pipelines", nargs="+", default=list(PIPELINES))
    ap.add_argument("--isolate", type=int, default=0, help="1: each stage and export in its own process")
    ap.add_argument("--seeds", type=int, default=1,
                    help="N > 1: also run every stage but fp with N-1 other seeds (results/seeds.md)")
    ap.add_argument("--nproc", type=int, default=1,
                    help="N > 1: each stage on N processes (torchrun, one node), keeping its global batch")
    ap.add_argument("--results-dir", default=str(ROOT / "results"),
                    help="where the tables and plots of the runs go (default: the repository's results/)")
    ap.add_argument("--set", nargs="+", default=[], metavar="[PIPELINE[/STAGE]:]KEY=VALUE",
                    help="config overrides for every stage, or with the prefix for one pipeline's or one stage's "
                         "(e.g. bert_squad:data.train_file=/data/train-v1.1.json); part of each stage's config")
    a = ap.parse_args(argv)
    if a.seeds < 1:
        ap.error(f"--seeds must be at least 1, got {a.seeds}")
    if a.nproc < 1:
        ap.error(f"--nproc must be at least 1, got {a.nproc}")
    pipelines = [p.rstrip("/") for p in a.pipelines]  # a shell's tab completion adds the slash
    if unknown := [p for p in pipelines if p not in PIPELINES]:
        ap.error(f"unknown pipeline(s) {', '.join(unknown)}; choose from {', '.join(PIPELINES)}")
    for o in a.set:
        prefix, kv = split_override(o)
        if "=" not in kv:
            ap.error(f"--set {o}: expected [PIPELINE[/STAGE]:]KEY=VALUE")
        key, value = (x.strip() for x in kv.split("=", 1))
        if key == "output_dir" and (prefix is None or "/" not in prefix) and "{stage}" not in value:
            ap.error(f"--set {o}: every stage needs a run dir of its own (one would set the next aside): give it "
                     f"per stage, PIPELINE/STAGE:output_dir=DIR, or with the {{stage}} placeholder, or move them "
                     f"all with RUNS_DIR")
        if prefix is None:
            continue
        pipe, _, stage = prefix.partition("/")
        if pipe not in PIPELINES:
            ap.error(f"--set {o}: unknown pipeline {pipe!r}; choose from {', '.join(PIPELINES)}")
        if stage and not config_path(pipe, a.scale, stage).is_file():
            ap.error(f"--set {o}: {prefix} has no config at scale {a.scale}")
    for flag, path in (("--runs-dir", a.runs_dir), ("--results-dir", a.results_dir)):
        if os.path.exists(path) and not os.path.isdir(path):
            ap.error(f"{flag} {path} is a file, not a folder")
    isolate = bool(a.isolate)
    # absolute: stages in subprocesses (ISOLATE, NPROC) run in the repository root, this check in the caller's dir
    a.runs_dir, a.results_dir = os.path.abspath(a.runs_dir), os.path.abspath(a.results_dir)
    # and every stage runs there, in this process too: the configs' relative paths (data/, the mini wav2vec2
    # model) and relative paths in --set values are the repository's, wherever this is called from
    os.chdir(ROOT)
    os.environ["RUNS_DIR"] = a.runs_dir
    # (pipeline, stage, its --set overrides) of every stage this call runs, checked before anything runs
    todo = [(p, s, overrides_for(p, s, a.set)) for p in pipelines for s in stages_of(p, a.scale, bool(a.quick))]
    try:  # an unknown key, a bad value
        for p, s, user in todo:
            resolved(p, a.scale, s, user)
    except ConfigError as e:
        print(f"[reproduce] {e}", file=sys.stderr)
        return 2
    problems = [m for p, s, user in todo for m in batch_problems(p, a.scale, [s], a.nproc, user)]
    if problems:
        print(f"[reproduce] NPROC={a.nproc} cannot keep every stage's global batch:\n  " + "\n  ".join(problems)
              + "\nrun such a pipeline on its own with an NPROC that divides its global batch (e.g. "
              "PIPELINES=bert_squad NPROC=4), or change its global_batch_size", file=sys.stderr)
        return 2
    if a.scale == "paper":
        problems = [m for p, s, user in todo for m in missing_inputs(p, a.scale, [s], user)]
        if problems:
            print("[reproduce] SCALE=paper cannot start; missing:\n  " + "\n  ".join(problems), file=sys.stderr)
            return 2
    t_all = time.time()
    failed = []
    for p in pipelines:
        stages = stages_of(p, a.scale, bool(a.quick))
        # the default seed of every stage first (later stages start from earlier ones), then the extra seeds
        jobs = [(s, 0) for s in stages] + [(s, k) for k in range(1, a.seeds) for s in stages if s != "fp"]
        for stage, k in jobs:
            user = overrides_for(p, stage, a.set)
            base = resolved(p, a.scale, stage, user)
            overrides = user + (repeat_overrides(base, k) if k else [])
            cfg = resolved(p, a.scale, stage, overrides) if k else base
            name = f"{a.scale}/{p}/{stage}" + (f" (seed repeat {k})" if k else "")
            state, why = inspect_run(cfg)
            if state == "done" and not a.force:
                print(f"[reproduce] {name}: done earlier, skipped ({cfg['output_dir']})", flush=True)
                if not k and export_if_quantized(cfg, p, isolate):
                    failed.append(f"{p}/{stage} (export)")
                continue
            if state == "other" and not a.force:  # FORCE=1 asks to replace it
                print(f"[reproduce] {name}: {cfg['output_dir']}: {why}; moved to "
                      f"{set_aside(Path(cfg['output_dir']))}", flush=True)
            resume = state == "interrupted" and not a.force
            print(f"[reproduce] {name}: {'resuming' if resume else 'running'} ...", flush=True)
            t0 = time.time()
            rc = run_stage(p, a.scale, stage, isolate, overrides, a.nproc, resume)
            if rc == 0 and not k and export_if_quantized(cfg, p, isolate):  # the compression columns
                failed.append(f"{p}/{stage} (export)")                       # come from the default seed's
            elif rc:
                failed.append(f"{p}/{stage}{seed_suffix(k)}")
            secs = time.time() - t0
            status = "ok" if rc == 0 else f"FAILED (exit {rc})"
            print(f"[reproduce] {name}: {status} in {secs / 60:.1f} min", flush=True)
            record_time(a.runs_dir, a.scale, p, stage, secs, status, isolate or a.nproc > 1, k, a.nproc,
                        cfg["output_dir"] if rc == 0 else None)
    rc = subprocess.call([sys.executable, str(ROOT / "results" / "make_results.py"), a.runs_dir,
                          "--out", a.results_dir])
    # make_results refuses (and leaves results/ as it was) when it finds no run, e.g. when every stage failed
    print(f"[reproduce] total {(time.time() - t_all) / 60:.1f} min; "
          + (f"{a.results_dir} regenerated" if rc == 0
             else f"{a.results_dir} NOT regenerated (make_results.py exit {rc}, see above)")
          + (f"; FAILED stages: {failed}" if failed else ""))
    return 1 if failed or rc else 0


if __name__ == "__main__":
    sys.exit(main())
