#!/usr/bin/env python
"""Gather every run into tables and plots.

    python results/make_results.py [RUNS_DIR] [--out results]

RUNS_DIR (default: $RUNS_DIR, else ./runs) holds one directory per run,
RUNS_DIR/<scale>/<pipeline>/<stage>/, each with metrics.json (required),
config.yaml, log_history.json, weight_sample.npz and compression.json (optional);
extra seeds of a stage (metrics.json "seed_repeat": k, reproduce.py --seeds) in
<stage>_seed<k>/. Writes main_table.{md,csv}, ablations.{md,csv} (default seed),
seeds.{md,csv} (spread over seeds), plot_*.png and README.md
(from README.template.md) into --out. Broken runs are reported on stderr and
skipped; a main stage without a usable run keeps its row, marked "not run",
"not finished" or "unreadable". A RUNS_DIR that is missing or holds no run, a bad --out, --template
or paper reference is an error (exit 2) and nothing is written. Tables are
deterministic: same runs in, same bytes out.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import matplotlib

matplotlib.use("Agg")  # headless: workers and CI have no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import yaml  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
LAYOUT = "RUNS_DIR/<scale>/<pipeline>/<stage>/metrics.json (e.g. runs/mini/bert_squad/qat4/metrics.json)"

# ---------------------------------------------------------------- contract ---
# Keys a metrics.json must have; without them the run cannot be placed in a table.
REQUIRED_KEYS = ("pipeline", "stage", "scale", "model", "main_metric", "higher_is_better")
NAME_KEYS = ("pipeline", "stage", "scale", "main_metric")
NAME_RE = re.compile(r"[A-Za-z0-9_.-]+")
# Stage directory -> row label of the main table (order = table order).
MAIN_ROWS = {"fp": "FP", "sparse": "2:4", "qat4_dense": "W4A4", "qat4": "W4A4+2:4"}
FULL_RECIPE = "qat4"  # ablations are compared against this stage
ABLATION_PREFIX = "abl_"
SCALE_ORDER = ("paper", "mini")
PIPELINE_ORDER = ("bert_squad", "wav2vec_librispeech", "vit_imagenet")
PIPELINE_TITLES = {
    "bert_squad": "BERT-base / SQuAD1.1",
    "wav2vec_librispeech": "Wav2vec2.0-large / LibriSpeech",
    "vit_imagenet": "ViT-base / ImageNet-1k",
}
# Task metrics per pipeline (percent), in column order.
METRICS = {
    "bert_squad": ["exact_match", "f1"],
    "wav2vec_librispeech": ["wer_test_clean", "wer_test_other", "wer_dev_clean", "cer_test_clean"],
    "vit_imagenet": ["top1", "top5"],
}
METRIC_LABELS = {
    "exact_match": "EM", "f1": "F1", "top1": "Top-1", "top5": "Top-5",
    "wer_test_clean": "WER test-clean", "wer_test_other": "WER test-other",
    "wer_dev_clean": "WER dev-clean", "cer_test_clean": "CER test-clean",
}
# Nominal backbone compression of each row; only used to place the paper's
# reference points on the metric-vs-compression plot (runs use their own ratio).
NOMINAL_RATIO = {"FP": 1.0, "2:4": 2.0, "W4A4": 8.0, "W4A4+2:4": 16.0}
EXPORT_KEYS = ("backbone_ratio_vs_fp32", "model_ratio_vs_fp32", "model_ratio_vs_fp16",
               "bits_per_backbone_weight", "file_bytes")
MISSING = "—"  # shown in markdown for an absent value


def warn(msg: str) -> None:
    print(f"[make_results] {msg}", file=sys.stderr)


class InputError(Exception):
    """Bad command-line input or input file: main() prints it and exits 2 before writing anything."""


def seed_suffix(k: int) -> str:
    """What the k-th extra seed adds to a stage's run dir name; the same rule as reproduce.seed_suffix (not
    imported: reproduce pulls in torch, which the tables do not need)."""
    return f"_seed{k}" if k else ""


def own_dir(scale: str, pipeline: str, stage: str, repeat: int) -> str:
    """The run dir (relative to RUNS_DIR) that reproduce.py writes for this stage and seed."""
    return f"{scale}/{pipeline}/{stage}{seed_suffix(repeat)}"


def configured_stages(scale: str, pipeline: str) -> list[str] | None:
    """The stages that have a config for this scale (reproduce.config_path's rule), or None if the pipeline has
    no config dir here (an unknown pipeline: its set of stages cannot be known)."""
    d = ROOT / pipeline / "configs" / ("mini" if scale == "mini" else "")
    return sorted(p.stem for p in d.glob("*.yaml")) if d.is_dir() else None


# ------------------------------------------------------------------ loading ---
@dataclass
class Run:
    dir: Path
    rel: str  # path relative to RUNS_DIR: keeps output independent of where runs live
    m: dict
    config: dict | None
    config_sha1: str
    log_history: list
    compression: dict | None
    weight_sample: Path | None

    @property
    def scale(self) -> str:
        return str(self.m["scale"])

    @property
    def pipeline(self) -> str:
        return str(self.m["pipeline"])

    @property
    def stage(self) -> str:
        return str(self.m["stage"])

    @property
    def row(self) -> str:
        return MAIN_ROWS.get(self.stage, self.stage)

    @property
    def repeat(self) -> int:
        """0 for a stage's default seed, k for its k-th extra seed (reproduce.py --seeds)."""
        v = self.m.get("seed_repeat")
        return int(v) if isinstance(v, int) and not isinstance(v, bool) else 0

    @property
    def is_ablation(self) -> bool:
        return self.stage.startswith(ABLATION_PREFIX)

    @property
    def metric(self) -> str:
        return str(self.m["main_metric"])

    @property
    def value(self) -> float:
        return float(self.m[self.metric])


def num(v) -> float | None:
    """A finite float, or None (bools are not numbers here)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(v) else None


def rank(value: str, order) -> tuple:
    return (order.index(value), "") if value in order else (len(order), value)


def stage_rank(stage: str) -> tuple:
    keys = list(MAIN_ROWS)
    if stage in keys:
        return (0, keys.index(stage), "")
    return (1 if not stage.startswith(ABLATION_PREFIX) else 2, 0, stage)


def run_key(r: Run) -> tuple:
    return (rank(r.scale, SCALE_ORDER), rank(r.pipeline, PIPELINE_ORDER), stage_rank(r.stage), r.repeat)


def _read_json(path: Path, what: str, expect: type):
    """Optional side file: warn and return None when unreadable."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        warn(f"{path}: unreadable {what} ({e}); ignoring it")
        return None
    if not isinstance(data, expect):
        warn(f"{path}: {what} is not a {expect.__name__}; ignoring it")
        return None
    return data


def under_runs_dir(value, runs_dir: Path):
    """A run dir a stage started from (`init_from`), shown as the run_dir column shows runs: relative to RUNS_DIR
    (mini/bert_squad/sparse), whether it was recorded absolute (reproduce's resolved RUNS_DIR, a path of the
    machine that ran it) or relative to the repository root, where the stages run. Anything else (a hub name, a
    path outside RUNS_DIR) stays as recorded."""
    if not isinstance(value, str) or not value:
        return value
    p, base = Path(value), runs_dir.resolve()
    for cand in ([p] if p.is_absolute() else [ROOT / p, Path.cwd() / p]):
        try:
            return cand.resolve().relative_to(base).as_posix()
        except ValueError:
            continue
    return value


def load_run(d: Path, runs_dir: Path) -> tuple[Run | None, str]:
    """Returns (run, "") or (None, reason it was skipped)."""
    mpath = d / "metrics.json"
    if not mpath.is_file():
        if (d / "config.yaml").is_file():  # what reproduce.py resumes
            return None, "not finished: config.yaml but no metrics.json (interrupted or still running)"
        return None, "no metrics.json"
    try:
        m = json.loads(mpath.read_text())
    except (OSError, ValueError) as e:
        return None, f"metrics.json is not valid JSON ({e})"
    if not isinstance(m, dict):
        return None, "metrics.json is not a JSON object"
    missing = [k for k in REQUIRED_KEYS if k not in m or m[k] in (None, "")]
    if missing:
        return None, f"metrics.json lacks required keys: {', '.join(missing)}"
    if not isinstance(m["higher_is_better"], bool):
        return None, "metrics.json: higher_is_better must be true or false"
    bad = [k for k in NAME_KEYS if not isinstance(m[k], str) or not NAME_RE.fullmatch(m[k])]
    if bad:  # they become table keys and plot file names: a list cannot be looked up, a '/' makes a path
        return None, (f"metrics.json: {', '.join(f'{k} {m[k]!r}' for k in bad)}: must be a name of letters, "
                      "digits, '_', '.' or '-'")
    if num(m.get(m["main_metric"])) is None:
        return None, f"metrics.json has no numeric value for its main_metric '{m['main_metric']}'"
    config, sha = None, ""
    cpath = d / "config.yaml"
    if cpath.is_file():
        raw = cpath.read_bytes()
        sha = hashlib.sha1(raw).hexdigest()[:8]  # short provenance id for the runs table
        try:
            config = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            warn(f"{cpath}: unreadable config.yaml ({e})")
    else:
        warn(f"{d}: no config.yaml (run kept)")
    logs = _read_json(d / "log_history.json", "log_history.json", list) or []
    comp = _read_json(d / "compression.json", "compression.json", dict)
    ws = d / "weight_sample.npz"
    m["init_from"] = under_runs_dir(m.get("init_from"), runs_dir)
    return Run(d, d.relative_to(runs_dir).as_posix(), m, config, sha, [x for x in logs if isinstance(x, dict)],
               comp, ws if ws.is_file() else None), ""


@dataclass
class Scan:
    runs: list[Run]  # usable runs, sorted
    skipped: list[tuple[str, str]]  # (dir relative to RUNS_DIR, reason), sorted
    refused: dict  # (scale, pipeline, stage, repeat) -> why no run was used for it (two dirs claim it)


def run_dirs(runs_dir: Path) -> list[Path]:
    return sorted(p for p in runs_dir.glob("*/*/*")
                  if p.is_dir() and not any(part.startswith(".") for part in p.relative_to(runs_dir).parts))


def pick(key: tuple, claims: list[Run]) -> tuple[Run | None, list[tuple[Run, str]]]:
    """One run for a (scale, pipeline, stage, seed repeat) that one or more dirs claim, and the losers with why.
    The dir reproduce.py names for that stage wins: a copy (a backup, an edited experiment) must not replace
    the real run because its name sorts first. Without such a dir, two claims are refused: picking one by
    the alphabet could show a number nobody meant."""
    own = own_dir(*key)
    if len(claims) == 1:
        if claims[0].rel != own:
            warn(f"{claims[0].dir}: metrics.json says {own}; using it, though the dir is named otherwise")
        return claims[0], []
    winner = next((r for r in claims if r.rel == own), None)
    if winner is not None:
        return winner, [(r, f"duplicate of {own} (same scale/pipeline/stage/seed repeat); {own} is that stage's "
                            f"own run dir, so it is used and {r.rel} is not") for r in claims if r is not winner]
    names = " and ".join(r.rel for r in claims)
    why = (f"{names} all say they are {own} (same scale/pipeline/stage/seed repeat), and none is that stage's own "
           f"run dir {own}; none is used (rename the one you mean to {own})")
    return None, [(r, why) for r in claims]


def scan(runs_dir: Path) -> Scan:
    """Every run dir under runs_dir: the usable runs, the skipped dirs and the refused keys."""
    claims, skipped, refused = {}, [], {}
    for d in run_dirs(runs_dir):
        run, reason = load_run(d, runs_dir)
        if run is None:
            skipped.append((d, d.relative_to(runs_dir).as_posix(), reason))
        else:
            claims.setdefault((run.scale, run.pipeline, run.stage, run.repeat), []).append(run)
    runs = []
    for key, group in claims.items():
        run, losers = pick(key, group)
        if run is not None:
            runs.append(run)
        else:
            refused[key] = losers[0][1]
        skipped += [(r.dir, r.rel, why) for r, why in losers]
    for d, _, reason in sorted(skipped, key=lambda x: x[1]):
        warn(f"skipped {d}: {reason}")
    return Scan(sorted(runs, key=run_key), sorted((rel, why) for _, rel, why in skipped), refused)


def load_runs(runs_dir: Path) -> tuple[list[Run], list[tuple[str, str]]]:
    """All valid runs (sorted) and the skipped ones as (relative dir, reason)."""
    found = scan(runs_dir)
    return found.runs, found.skipped


def layout_hint(runs_dir: Path) -> str:
    """Where metrics.json files are, if not at the depth the layout expects: the likely meant RUNS_DIR."""
    def up(p: Path) -> Path:  # a parent that prints sensibly for ".", "mini" and "runs/mini"
        return p.parent if p.name not in ("", ".", "..") else p.resolve().parent
    def found(depth: int) -> list[Path]:  # metrics.json files `depth` dirs down, not under a hidden dir
        return [m for m in runs_dir.glob("/".join(["*"] * depth + ["metrics.json"]))
                if not any(part.startswith(".") for part in m.relative_to(runs_dir).parts)]
    for depth, fix in ((2, 1), (1, 2)):  # too deep by `fix` levels
        if found(depth):
            target = runs_dir
            for _ in range(fix):
                target = up(target)
            holds = "<pipeline>/<stage>" if fix == 1 else "<stage>"
            return (f" {runs_dir} looks {fix} level{'s' * (fix > 1)} too deep (it holds {holds} dirs); "
                    f"did you mean {target}?")
    deeper = sorted({m.parents[3] for m in found(4)})
    if deeper:
        return (f" {runs_dir} looks one level too shallow: did you mean "
                f"{' or '.join(str(d) for d in deeper[:3])}?")
    if any(runs_dir.glob("*/*/.replaced/*/metrics.json")):
        return (" The only runs there are under <pipeline>/.replaced/, where reproduce.py sets aside runs made "
                "with another config; move one back to <pipeline>/<stage>/ to use it.")
    return ""


def check_runs_dir(runs_dir: Path, found: Scan | None) -> None:
    """A wrong RUNS_DIR must not rewrite results/ as 'no runs': stop before anything is written."""
    if not runs_dir.is_dir():
        what = "is not a directory" if runs_dir.exists() else "does not exist"
        raise InputError(f"runs dir {runs_dir} {what}; expected {LAYOUT}")
    if found is not None and not found.runs:
        why = (f"none of the {len(found.skipped)} dirs at {runs_dir}/*/*/* is a usable run, see above"
               if found.skipped else f"no dirs at {runs_dir}/*/*/*")
        raise InputError(f"no run found in runs dir {runs_dir} ({why}); expected {LAYOUT}.{layout_hint(runs_dir)}")


REF_COLUMNS = ("pipeline", "row", "metric", "value", "source")


def read_paper_reference(path: Path) -> list[dict]:
    """The rows of paper_reference.csv, checked: an empty value means n/a, anything else must be a number."""
    try:
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            check_reference_header(path, reader.fieldnames or [])
            rows = []
            for r in reader:
                v = (r["value"] or "").strip()
                if v and num(_float_or_none(v)) is None:
                    raise InputError(f"{path}, line {reader.line_num}, column 'value': {v!r} is not a number "
                                     f"(write e.g. 88.5, without %, or leave it empty for n/a)")
                rows.append({c: r[c] or "" for c in REF_COLUMNS})
            return rows
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise InputError(f"{path}: cannot read the paper reference ({e})") from e


def check_reference_header(path: Path, found: list[str]) -> None:
    lacking = [c for c in REF_COLUMNS if c not in found]
    if lacking:
        raise InputError(f"{path}, line 1 (header): no column{'s' * (len(lacking) > 1)} {', '.join(lacking)}; "
                         f"the header must name {', '.join(REF_COLUMNS)} (found: {', '.join(found) or 'nothing'})")


def _float_or_none(v: str) -> float | None:
    try:
        return float(v)
    except ValueError:
        return None


def load_paper_reference(rows: list[dict]) -> dict:
    """(pipeline, row, metric) -> (value or None, source)."""
    return {(r["pipeline"], r["row"], r["metric"]): (float(r["value"]) if r["value"].strip() else None, r["source"])
            for r in rows}


# --------------------------------------------------------------- formatting ---
def fmt(v, nd: int = 2, missing: str = "", csv_style: bool = False) -> str:
    """Fixed formatting so reruns give identical bytes."""
    if v is None:
        return missing
    if isinstance(v, bool):
        return ("true" if v else "false") if csv_style else ("yes" if v else "no")
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return f"{v:.{nd}f}" if math.isfinite(v) else missing
    return str(v)


def md_table(header: list[str], rows: list[list[str]]) -> str:
    def cell(s: str) -> str:
        return str(s).replace("|", "\\|").replace("\n", " ")
    lines = ["| " + " | ".join(cell(h) for h in header) + " |",
             "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_csv(path: Path, columns: list[tuple[str, int]], records: list[dict]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow([c for c, _ in columns])
    for rec in records:
        w.writerow([fmt(rec.get(c), nd, csv_style=True) for c, nd in columns])
    path.write_text(buf.getvalue())


def metric_label(metric: str) -> str:
    return METRIC_LABELS.get(metric, metric)


def better_word(higher_is_better: bool) -> str:
    return "higher is better" if higher_is_better else "lower is better"


def label_runs(runs: list[Run]) -> str:
    """'scale · hardware · run dates' caption for a table or plot."""
    scales = sorted({r.scale for r in runs}, key=lambda s: rank(s, SCALE_ORDER))
    hw = sorted({str(r.m.get("hardware") or "unknown") for r in runs})
    dates = sorted(str(r.m.get("date"))[:10] for r in runs if r.m.get("date"))
    span = (dates[0] if dates[0] == dates[-1] else f"{dates[0]} to {dates[-1]}") if dates else "unknown"
    return f"scale: {', '.join(scales) or 'none'} · hardware: {'; '.join(hw) or 'unknown'} · run dates: {span}"


# ------------------------------------------------------------- main table ---
def all_metrics(runs: list[Run]) -> list[str]:
    known = [m for p in PIPELINE_ORDER for m in METRICS[p]]
    return known + sorted({r.metric for r in runs} - set(known))


RUN_KEYS = ("w_bits", "a_bits", "sparsity", "quantize_attention", "zero_preserving", "kd", "dropout_schedule",
            "init_from", "bits_per_backbone_weight", "compression_ratio", "train_steps", "train_runtime_s",
            "hardware", "date", "mini_scale_note")


class Gap(NamedTuple):
    status: str  # not run | not finished: <why> | unreadable: <why> | not used: <why>
    metric: str  # the pipeline's main metric and direction, from its other runs, for the marked row
    higher_is_better: bool


def stage_gaps(runs: list[Run], skipped: list[tuple[str, str]], refused: dict) -> dict:
    """(scale, pipeline, stage) -> Gap, for each stage a scale/pipeline with runs (any seed) should have but has
    no usable default-seed run of: the configured main stages and ablations, and any other stage whose own dir was
    skipped. Status: "not run" (no dir), "not finished: <why>" (its own dir has config.yaml but no metrics.json),
    "unreadable: <why>" (its own dir was skipped otherwise), "not used: <why>" (several dirs claim it). A gap must
    show in the tables: a vanished row reads as 'nothing to see'."""
    have = {(r.scale, r.pipeline, r.stage) for r in runs if not r.repeat}
    bad = dict(skipped)
    gaps = {}
    for sc, pl in sorted({(r.scale, r.pipeline) for r in runs}):
        like = next(r for r in runs if (r.scale, r.pipeline) == (sc, pl))
        cfg = configured_stages(sc, pl)
        expect = {s for s in MAIN_ROWS if cfg is None or s in cfg}
        expect |= {s for s in cfg or [] if s.startswith(ABLATION_PREFIX)}
        # a skipped dir named as a stage's default seed is that stage, unreadable, even if not configured
        named = {rel.split("/")[2] for rel in bad if rel.startswith(f"{sc}/{pl}/")}
        expect |= {s for s in named if (s in MAIN_ROWS or s.startswith(ABLATION_PREFIX))
                   and not re.search(r"_seed\d+$", s)}
        for st in sorted(expect, key=stage_rank):
            if (sc, pl, st) in have:
                continue
            own = own_dir(sc, pl, st, 0)
            status = (f"not used: {refused[(sc, pl, st, 0)]}" if (sc, pl, st, 0) in refused
                      else bad[own] if own in bad and bad[own].startswith("not finished")
                      else f"unreadable: {bad[own]}" if own in bad else "not run")
            gaps[(sc, pl, st)] = Gap(status, like.metric, bool(like.m["higher_is_better"]))
    return gaps


def main_records(runs: list[Run], ref: dict, gaps: dict | None = None) -> list[dict]:
    """A row per main-stage run, and a marked row with empty values per main stage in `gaps`."""
    fp = {(r.scale, r.pipeline): r for r in runs if r.stage == "fp"}
    mets = all_metrics(runs)
    recs = []
    for r in runs:
        if r.is_ablation:
            continue
        m, comp = r.m, r.compression or {}
        base = fp.get((r.scale, r.pipeline))
        rec = _main_record(r.scale, r.pipeline, r.stage, r.metric, bool(m["higher_is_better"]), ref, mets)
        rec.update({
            "model": m["model"], "main_value": r.value,
            "delta_vs_fp": (r.value - base.value) if base is not None and base.metric == r.metric else None,
            "config_sha1": r.config_sha1, "run_dir": r.rel, "status": "ok",
        })
        rec.update({k: num(m.get(k)) for k in mets})
        rec.update({k: m.get(k) for k in RUN_KEYS})
        rec.update({"export_" + k: comp.get(k) for k in EXPORT_KEYS})
        recs.append(rec)
    for (sc, pl, st), gap in (gaps or {}).items():
        if st not in MAIN_ROWS:
            continue
        rec = _main_record(sc, pl, st, gap.metric, gap.higher_is_better, ref, mets)
        rec.update(status=gap.status, run_dir=own_dir(sc, pl, st, 0)
                   if gap.status.startswith(("unreadable", "not finished")) else "")
        recs.append(rec)
    # stable sort: the runs are already in this order, so the gaps slot in without moving them
    return sorted(recs, key=lambda a: (rank(a["scale"], SCALE_ORDER), rank(a["pipeline"], PIPELINE_ORDER),
                                       stage_rank(a["stage"])))


def _main_record(scale: str, pipeline: str, stage: str, metric: str, hib: bool, ref: dict, mets: list[str]) -> dict:
    """The parts of a main-table row that do not need the run: an empty row of the paper's values."""
    row = MAIN_ROWS.get(stage, stage)
    rec = {"scale": scale, "pipeline": pipeline, "model": None, "row": row, "stage": stage, "main_metric": metric,
           "higher_is_better": hib, "main_value": None, "delta_vs_fp": None,
           "paper_main_value": ref.get((pipeline, row, metric), (None, ""))[0]}
    rec.update({k: None for k in mets})
    rec.update({"paper_" + k: ref.get((pipeline, row, k), (None, ""))[0] for k in mets})
    rec.update({k: None for k in RUN_KEYS})
    rec.update({"export_" + k: None for k in EXPORT_KEYS})
    rec["paper_source"] = " | ".join(sorted({s for (p, rw, _), (_, s) in ref.items()
                                             if p == pipeline and rw == row and s}))
    rec.update(config_sha1="", run_dir="", status="")
    return rec


def main_csv_columns(runs: list[Run]) -> list[tuple[str, int]]:
    mets = all_metrics(runs)
    return ([("scale", 0), ("pipeline", 0), ("model", 0), ("row", 0), ("stage", 0), ("main_metric", 0),
             ("higher_is_better", 0), ("main_value", 4), ("delta_vs_fp", 4), ("paper_main_value", 4)]
            + [(k, 4) for k in mets] + [("paper_" + k, 4) for k in mets]
            + [("w_bits", 0), ("a_bits", 0), ("sparsity", 0), ("quantize_attention", 0), ("zero_preserving", 0),
               ("kd", 0), ("dropout_schedule", 0), ("init_from", 0), ("bits_per_backbone_weight", 4),
               ("compression_ratio", 4)]
            + [("export_" + k, 4) for k in EXPORT_KEYS]
            + [("train_steps", 0), ("train_runtime_s", 1), ("hardware", 0), ("date", 0),
               ("mini_scale_note", 0), ("paper_source", 0), ("config_sha1", 0), ("run_dir", 0),
               ("status", 0)])  # ok, not run, not finished: <why>, unreadable: <why>, not used: <why>


SCALE_SENTENCE = (
    "The **Scale** column says which setup produced each row. `paper` rows use the paper's models and "
    "data. `mini` rows come from scaled-down smoke runs (smaller models, data and step counts; see the "
    "Note column): they show that the pipeline works end to end and are **not** a reproduction of the "
    "paper's numbers, so do not compare them with the Paper columns. Paper columns marked n/a have no "
    "number available offline (see `results/paper_reference.csv`). **Value bits** and **value ratio** count "
    "the kept weight values only (4 bits at 2:4 = 2 bits, 16×: the paper's accounting); the **Export** columns "
    "are the bytes of the file `common.export` writes (codes, 2:4 index, scales)."
)


def main_table_md(recs: list[dict], runs: list[Run], ref: dict) -> str:
    if not recs:
        return "No runs found, so there are no main results yet.\n"
    parts = [SCALE_SENTENCE + "\n"]
    pipelines = sorted({r["pipeline"] for r in recs}, key=lambda p: rank(p, PIPELINE_ORDER))
    for p in pipelines:
        prec = [r for r in recs if r["pipeline"] == p]
        prun = [r for r in runs if r.pipeline == p and not r.is_ablation]
        main = prec[0]["main_metric"]
        mets = [k for k in METRICS.get(p, []) if any(r[k] is not None for r in prec)]
        mets = mets if main in mets else mets + [main]
        paper_mets = [k for k in mets if any(rp == p and k == km for rp, _, km in ref)]
        has_export = any(r["export_backbone_ratio_vs_fp32"] is not None or r["export_file_bytes"] is not None
                         for r in prec)
        header = (["Scale", "Row", "Stage", "Model"] + [metric_label(k) for k in mets]
                  + [f"Δ {metric_label(main)} vs FP"] + [f"Paper {metric_label(k)}" for k in paper_mets]
                  + ["W/A bits", "Sparsity", "Value bits / backbone weight", "Value ratio vs FP32"]
                  + (["Export backbone ×FP32", "Export model ×FP32", "Export model ×FP16", "File MB"]
                     if has_export else [])
                  + ["Steps", "Hardware", "Date", "Note"])
        rows = [main_md_row(r, mets, paper_mets, has_export, len(header)) for r in prec]
        hib = prec[0]["higher_is_better"]
        parts.append(f"### {PIPELINE_TITLES.get(p, p)} (`{p}`)\n\n"
                     f"Task metric: {metric_label(main)} (`{main}`, %, {better_word(hib)}). "
                     f"Runs: {label_runs(prun)}.\n")
        parts.append(md_table(header, rows))
        gone = [r for r in prec if r["status"] != "ok"]
        if gone:
            parts.append("No result for " + "; ".join(f"{r['scale']} {r['row']} (`{r['stage']}`): {r['status']}"
                                                       for r in gone) + "."
                         + (" Without an FP result, Δ vs FP is empty." if any(r["stage"] == "fp" for r in gone)
                            else "") + "\n")
        known = sorted({s for (rp, _, _), (v, s) in ref.items() if rp == p and v is not None and s})
        if known:
            parts.append("Paper column sources: " + "; ".join(known) + ".\n")
        if any(v is None for (rp, _, _), (v, _) in ref.items() if rp == p):
            parts.append("n/a: not available offline; `results/paper_reference.csv` names the published "
                         "number that belongs there.\n")
    return "\n".join(parts)


def main_md_row(r: dict, mets: list[str], paper_mets: list[str], has_export: bool, width: int) -> list[str]:
    if r["status"] != "ok":  # a stage without a result: its name and the paper's numbers, nothing else
        return ([r["scale"], r["row"], r["stage"], f"**{r['status'].split(':')[0]}**"]
                + [MISSING] * (len(mets) + 1) + [fmt(r["paper_" + k], missing="n/a") for k in paper_mets]
                + [MISSING] * (width - 6 - len(mets) - len(paper_mets)) + [r["status"]])
    fb = r["export_file_bytes"]
    return ([r["scale"], r["row"], r["stage"], r["model"]] + [fmt(r[k], missing=MISSING) for k in mets]
            + [fmt(r["delta_vs_fp"], missing=MISSING)]
            + [fmt(r["paper_" + k], missing="n/a") for k in paper_mets]
            + [f"{fmt(r['w_bits'], missing='?')}/{fmt(r['a_bits'], missing='?')}",
               fmt(r["sparsity"], missing="dense"), fmt(num(r["bits_per_backbone_weight"]), 3, MISSING),
               fmt(num(r["compression_ratio"]), missing=MISSING)]
            + ([fmt(num(r["export_backbone_ratio_vs_fp32"]), missing=MISSING),
                fmt(num(r["export_model_ratio_vs_fp32"]), missing=MISSING),
                fmt(num(r["export_model_ratio_vs_fp16"]), missing=MISSING),
                fmt(num(fb) / 1e6 if num(fb) is not None else None, missing=MISSING)] if has_export else [])
            + [fmt(r["train_steps"], missing=MISSING), fmt(r["hardware"], missing=MISSING),
               str(r["date"] or MISSING)[:10], fmt(r["mini_scale_note"], missing="")])


# --------------------------------------------------------------- ablations ---
ABL_SENTENCE = (
    "Each ablation changes one factor of the full recipe (W4A4+2:4, stage `qat4`) and is compared with the "
    "`qat4` run of the same pipeline and scale. **Δ = ablation − full recipe**, in metric points. For F1, "
    "EM and top-1 (higher is better) a negative Δ means the ablation is worse; for WER (lower is better) a "
    "positive Δ means the ablation is worse. The Effect column states this per row. The paper reports every "
    "one of these factors as helping, i.e. each ablation worse than the full recipe; the last column says "
    "whether this run shows that. `mini` rows are smoke-scale runs, not the paper's ablations. This table is the "
    "default seed alone, where a Δ of a few tenths of a point is within noise; the spread over seeds and the "
    "deltas of their means are in the next section (`make reproduce SEEDS=3`). The one-stage variants "
    "(`abl_oneshot`, `abl_pretrained_init`) also train one compression stage instead of two, so less in all; "
    "`abl_pretrained_init` against `abl_oneshot` isolates the starting checkpoint."
)


def paper_effect(effect: str) -> str:
    """The paper's claim for every ablation: the full recipe is better. Does this run show it?"""
    return {"worse": "yes", "same": "no (no difference)", "better": "no (ablation better)"}.get(effect, "n/a")


def ablation_records(runs: list[Run], gaps: dict | None = None) -> list[dict]:
    """A row per ablation run, and a marked row per ablation whose own run dir is unreadable (one never run is
    only counted in the tally: a QUICK=1 run would otherwise fill the table with them)."""
    full = {(r.scale, r.pipeline): r for r in runs if r.stage == FULL_RECIPE}
    recs = []
    for r in runs:
        if not r.is_ablation:
            continue
        abl = r.m.get("ablation")
        if not isinstance(abl, dict):
            warn(f"{r.dir}: ablation stage without an 'ablation' dict; using the stage name")
            abl = {}
        ref = full.get((r.scale, r.pipeline))
        ref_value = num(ref.m.get(r.metric)) if ref is not None else None
        delta = r.value - ref_value if ref_value is not None else None
        hib = bool(r.m["higher_is_better"])
        if delta is None:
            effect = "no qat4 run to compare"
        elif abs(delta) < 0.005:  # equal at the 2 decimals shown
            effect = "same"
        else:
            effect = "better" if (delta > 0) == hib else "worse"
        recs.append({
            "scale": r.scale, "pipeline": r.pipeline,
            "factor": str(abl.get("factor") or r.stage[len(ABLATION_PREFIX):]),
            "variant": str(abl.get("variant") or r.stage), "stage": r.stage,
            "metric": r.metric, "higher_is_better": hib, "value": r.value,
            "full_recipe_value": ref_value, "delta": delta, "effect": effect,
            "shows_paper_effect": paper_effect(effect),
            "model": r.m["model"], "hardware": r.m.get("hardware"), "date": r.m.get("date"), "run_dir": r.rel,
            "status": "ok",
        })
    for (sc, pl, st), gap in (gaps or {}).items():
        if st.startswith(ABLATION_PREFIX) and gap.status != "not run":
            recs.append({"scale": sc, "pipeline": pl, "factor": st[len(ABLATION_PREFIX):], "variant": st,
                         "stage": st, "metric": gap.metric, "higher_is_better": gap.higher_is_better,
                         "value": None, "full_recipe_value": None, "delta": None, "effect": gap.status,
                         "shows_paper_effect": "n/a", "run_dir": own_dir(sc, pl, st, 0), "status": gap.status})
    return sorted(recs, key=lambda a: (rank(a["scale"], SCALE_ORDER), rank(a["pipeline"], PIPELINE_ORDER),
                                       a["factor"], a["variant"], a["stage"]))


ABL_CSV_COLUMNS = [("scale", 0), ("pipeline", 0), ("factor", 0), ("variant", 0), ("stage", 0), ("metric", 0),
                   ("higher_is_better", 0), ("value", 4), ("full_recipe_value", 4), ("delta", 4), ("effect", 0),
                   ("shows_paper_effect", 0),
                   ("model", 0), ("hardware", 0), ("date", 0), ("run_dir", 0),
                   ("status", 0)]  # ok, not finished: <why>, unreadable: <why>, not used: <why>


def ablations_md(recs: list[dict], runs: list[Run], gaps: dict | None = None) -> str:
    gaps = gaps or {}
    # a pipeline whose configured ablations were never run (QUICK=1) gets its line too, saying so
    groups = sorted({(a["scale"], a["pipeline"]) for a in recs}
                    | {(sc, pl) for sc, pl, st in gaps if st.startswith(ABLATION_PREFIX)},
                    key=lambda g: (rank(g[0], SCALE_ORDER), rank(g[1], PIPELINE_ORDER)))
    summary = "".join(ablation_tally(sc, pl, [a for a in recs if (a["scale"], a["pipeline"]) == (sc, pl)], gaps)
                      for sc, pl in groups)
    if not recs:
        return "No ablation runs found (stages named `abl_*`).\n" + (f"\n{summary}" if summary else "")
    header = ["Scale", "Pipeline", "Factor", "Variant", "Metric", "Value", "Full recipe (qat4)",
              "Δ (ablation − full)", "Effect", "Shows the paper's effect"]
    rows = [[a["scale"], a["pipeline"], a["factor"], a["variant"],
             f"{metric_label(a['metric'])} ({better_word(a['higher_is_better'])})", fmt(a["value"], missing=MISSING),
             fmt(a["full_recipe_value"], missing=MISSING), fmt(a["delta"], missing=MISSING, nd=2), a["effect"],
             a["shows_paper_effect"]]
            for a in recs]
    used = [r for r in runs if r.is_ablation or r.stage == FULL_RECIPE]
    return f"{ABL_SENTENCE}\n\nRuns: {label_runs(used)}.\n\n{summary}\n" + md_table(header, rows)


def ablation_tally(sc: str, pl: str, recs: list[dict], gaps: dict) -> str:
    """One summary line: how many ablations show the paper's effect, and, when some configured ablation has no
    result, how many of them have one and why the others do not ("3 of 5" alone would hide the missing two)."""
    compared = [a for a in recs if a["delta"] is not None]
    line = (f"- {sc} {pl}: {sum(a['shows_paper_effect'] == 'yes' for a in compared)} of {len(compared)} ablations "
            f"show the paper's effect (the full recipe better than the ablation)." if compared else
            f"- {sc} {pl}: no ablation has a Δ to the full recipe (no usable `{FULL_RECIPE}` result)."
            if any(a["status"] == "ok" for a in recs) else f"- {sc} {pl}: no ablation result.")
    lacking = {st: gap.status for (s, p, st), gap in gaps.items()
               if (s, p) == (sc, pl) and st.startswith(ABLATION_PREFIX)}
    if lacking:
        cfg = [st for st in configured_stages(sc, pl) or [] if st.startswith(ABLATION_PREFIX)]
        done = [a for a in recs if a["status"] == "ok" and a["stage"] in cfg]
        line += ((f" {len(done)} of the {len(cfg)} configured ablations have a result;" if cfg else "")
                 + " no result for " + "; ".join(f"`{st}` ({why})" for st, why in sorted(lacking.items())) + ".")
    return line + "\n"


# ------------------------------------------------------------------- seeds ---
SEEDS_SENTENCE = (
    "`make reproduce SEEDS=N` runs every stage but `fp` N−1 more times with other seeds (`train.seed` + k: data "
    "order, dropout, calibration batches), each on the same upstream checkpoints as the default seed (the fp "
    "teacher, the `init_from` runs), so the spread below is that stage's own. Std: sample standard deviation "
    "over the seeds. For an ablation, **Δ = mean(ablation) − mean(full recipe)** and "
    "SE = √(sd²ₐ/nₐ + sd²_f/n_f); "
    "with a handful of seeds SE is itself rough, so \"beyond noise\" (|Δ| ≥ 2 SE) is a screening rule, not a "
    "test. A count metric (top-1 on N eval images) moves in steps of 100/N points, and seeds that all score the "
    "same count have SD 0, which would make a one-image difference \"beyond noise\"; so a |Δ| of at most one eval "
    "example (the `one_example` column of seeds.csv) is reported as within one eval example, whatever the SE "
    "(our choice). The main and ablation tables above show the default seed alone."
)

# Main metrics counted over eval examples, whose runs record how many (metrics.json eval_samples).
COUNT_METRICS = {"top1", "top5"}


def seed_groups(runs: list[Run]) -> dict:
    """(scale, pipeline, stage) -> its runs over seeds, where some stage has an extra seed."""
    groups = {}
    for r in runs:
        groups.setdefault((r.scale, r.pipeline, r.stage), []).append(r)
    return {k: v for k, v in groups.items() if len(v) > 1}


def seed_ids(group: list[Run]) -> list[str]:
    """The seeds a group of runs used (the seed repeat where metrics.json names no seed), to check that two means
    are over the same seeds."""
    return sorted((str(r.m["seed"]) if "seed" in r.m else f"repeat {r.repeat}" for r in group),
                  key=lambda x: (len(x), x))


def one_example(group: list[Run]) -> float | None:
    """The step of a count metric, 100/N points, when every run of the group evaluated the same N examples; None
    for a continuous metric (F1, WER) or an unknown or mixed N."""
    ns = {r.m.get("eval_samples") for r in group}
    n = ns.pop() if len(ns) == 1 else None
    return 100.0 / n if group[0].metric in COUNT_METRICS and isinstance(n, int) and n > 0 else None


def _spread(values: list[float]) -> tuple[float, float | None]:
    return float(np.mean(values)), (float(np.std(values, ddof=1)) if len(values) > 1 else None)


def seed_records(runs: list[Run]) -> list[dict]:
    groups = seed_groups(runs)
    recs = []
    for (sc, pl, st), group in groups.items():
        vals = [r.value for r in group]
        mean, sd = _spread(vals)
        rec = {"scale": sc, "pipeline": pl, "stage": st, "row": MAIN_ROWS.get(st, st), "metric": group[0].metric,
               "higher_is_better": bool(group[0].m["higher_is_better"]), "n": len(vals),
               "seeds": " ".join(str(r.m.get("seed", MISSING)) for r in group),
               "values": " ".join(f"{v:.2f}" for v in vals), "mean": mean, "std": sd,
               "min": min(vals), "max": max(vals)}
        full = groups.get((sc, pl, FULL_RECIPE))
        comparable = st.startswith(ABLATION_PREFIX) and full is not None and full[0].metric == rec["metric"]
        if st.startswith(ABLATION_PREFIX) and full is None:
            rec["shows_paper_effect"] = f"no Δ: the full recipe (`{FULL_RECIPE}`) has fewer than two usable seeds"
        elif comparable and seed_ids(full) != seed_ids(group):
            # Means over different seeds differ by the seeds too (e.g. qat4's default seed unreadable: 43 44 vs
            # 42 43 44); rather than a Δ that looks like the others but is not, no Δ and the reason.
            rec["shows_paper_effect"] = (f"no Δ: the full recipe has seeds {' '.join(seed_ids(full))}, "
                                         f"this one {' '.join(seed_ids(group))}")
        elif comparable:
            fmean, fsd = _spread([r.value for r in full])
            delta = mean - fmean
            se = math.sqrt(sd ** 2 / len(vals) + fsd ** 2 / len(full))
            same = abs(delta) < 0.005  # equal at the 2 decimals shown (float sums of equal means differ by 1e-14)
            worse = (delta < 0) == rec["higher_is_better"] and not same
            step = one_example(group + full)
            # + 1e-3: metrics.json keeps 4 decimals, so a one-example Δ reads up to 1e-4 off 100/N either way
            resolved = step is None or abs(delta) > step + 1e-3
            beyond = abs(delta) >= 2 * se and not same  # SE 0 (no spread in either): any difference is beyond it
            within = "within noise" if not beyond or resolved else "within one eval example"
            rec.update(full_recipe_mean=fmean, delta=0.0 if same else delta, se=se, one_example=step,
                       shows_paper_effect=("no (no difference)" if same else
                                           "yes, beyond noise" if worse and beyond and resolved else
                                           f"in its direction, {within}" if worse else
                                           "no: ablation better, beyond noise" if beyond and resolved else
                                           f"no, {within}"))
        recs.append(rec)
    return sorted(recs, key=lambda a: (rank(a["scale"], SCALE_ORDER), rank(a["pipeline"], PIPELINE_ORDER),
                                       stage_rank(a["stage"])))


SEED_CSV_COLUMNS = [("scale", 0), ("pipeline", 0), ("stage", 0), ("row", 0), ("metric", 0), ("higher_is_better", 0),
                    ("n", 0), ("seeds", 0), ("values", 0), ("mean", 4), ("std", 4), ("min", 4), ("max", 4),
                    ("full_recipe_mean", 4), ("delta", 4), ("se", 4), ("one_example", 4), ("shows_paper_effect", 0)]


def seeds_md(recs: list[dict], runs: list[Run]) -> str:
    if not recs:
        return ("No stage has runs with more than one seed (`make reproduce SEEDS=3` adds two more seeds of every "
                "stage but fp).\n")
    header = ["Scale", "Pipeline", "Stage", "Metric", "Seeds", "Values", "Mean", "Std", "Min–max",
              "Δ vs full recipe (means)", "SE", "Shows the paper's effect"]
    rows = [[a["scale"], a["pipeline"], a["row"], f"{metric_label(a['metric'])} ({better_word(a['higher_is_better'])})",
             a["seeds"], a["values"], fmt(a["mean"]), fmt(a["std"], missing=MISSING),
             f"{a['min']:.2f}–{a['max']:.2f}", fmt(a.get("delta"), missing=""), fmt(a.get("se"), missing=""),
             a.get("shows_paper_effect", "")] for a in recs]
    used = [r for g in seed_groups(runs).values() for r in g]
    tally = {}
    for a in recs:
        if "delta" in a or a.get("shows_paper_effect", "").startswith("no Δ"):
            t = tally.setdefault((a["scale"], a["pipeline"]), [0, 0, 0, 0])
            t[0] += a["shows_paper_effect"] == "yes, beyond noise"
            t[1] += a["shows_paper_effect"].startswith("in its direction")
            t[2] += "delta" in a
            t[3] += "delta" not in a
    summary = "".join(
        (f"- {sc} {pl}, {n} ablations: the paper's effect beyond seed noise in {k}, in its direction but within "
         f"noise in {w} more." if n else f"- {sc} {pl}: no ablation compared over seeds.")
        + (f" {off} ablation{'s' * (off > 1)} not compared: not run on the same seeds as the full recipe (see the "
           f"Seeds column)." if off else "") + "\n"
        for (sc, pl), (k, w, n, off) in tally.items())
    return f"{SEEDS_SENTENCE}\n\nRuns: {label_runs(used)}.\n\n{summary}\n" + md_table(header, rows)


# ------------------------------------------------------------------- plots ---
def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)


def _placeholder(path: Path, title: str, text: str) -> None:
    """Summary plots always exist so README links never break."""
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.set_title(title)
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)
    ax.set_axis_off()
    _save(fig, path)


def plot_metric_vs_compression(recs: list[dict], runs: list[Run], ref: dict, out: Path) -> str:
    name = "plot_metric_vs_compression.png"
    pipelines = sorted({r["pipeline"] for r in recs}, key=lambda p: rank(p, PIPELINE_ORDER))
    scales = sorted({r["scale"] for r in recs}, key=lambda s: rank(s, SCALE_ORDER))
    if not pipelines:
        _placeholder(out / name, "Task metric vs compression", "no runs found")
        return name
    fig, axes = plt.subplots(1, len(pipelines), figsize=(5.5 * len(pipelines), 4.2), squeeze=False)
    for ax, p in zip(axes[0], pipelines):
        prec = [r for r in recs if r["pipeline"] == p]
        main, hib = prec[0]["main_metric"], prec[0]["higher_is_better"]
        for i, s in enumerate(scales):
            # A run's own ratio; the export tool's ratio when metrics.json has none.
            pts = sorted((num(r["compression_ratio"]) or num(r["export_backbone_ratio_vs_fp32"]),
                          r["main_value"], r["row"]) for r in prec if r["scale"] == s
                         and (num(r["compression_ratio"]) or num(r["export_backbone_ratio_vs_fp32"])))
            if not pts:
                continue
            ax.plot([x for x, _, _ in pts], [y for _, y, _ in pts], marker="os^"[i % 3], label=f"runs, scale {s}")
            for x, y, row in pts:
                ax.annotate(row, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        paper = [(NOMINAL_RATIO[row], v) for (rp, row, k), (v, _) in sorted(ref.items())
                 if rp == p and k == main and v is not None and row in NOMINAL_RATIO]
        if paper:
            ax.plot(*zip(*paper), linestyle="none", marker="*", markersize=12, color="black",
                    label="paper reference (nominal ratio)")
        ax.set_xscale("log", base=2)
        ax.set_xticks([1, 2, 4, 8, 16], labels=["1×", "2×", "4×", "8×", "16×"])
        ax.set_xlabel("backbone compression ratio vs FP32 (values only, the paper's count)")
        ax.set_ylabel(f"{metric_label(main)} (%, {better_word(hib)})")
        ax.set_title(f"{PIPELINE_TITLES.get(p, p)}\n{label_runs([r for r in runs if r.pipeline == p])}",
                     fontsize=8)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Task metric vs compression (scale: {', '.join(scales)})")
    _save(fig, out / name)
    return name


def plot_ablations(recs: list[dict], out: Path, seed_recs: list[dict] = ()) -> str:
    """Bars: the default seed's Δ per ablation; where extra seeds exist, a marker at the Δ of the means with
    whiskers of ±2 SE (seeds.md's screening rule)."""
    name = "plot_ablations.png"
    over_seeds = {(a["scale"], a["pipeline"], a["stage"]): a for a in seed_recs if "delta" in a}
    recs = [a for a in recs if a["delta"] is not None]
    groups = sorted({(a["scale"], a["pipeline"]) for a in recs},
                    key=lambda g: (rank(g[0], SCALE_ORDER), rank(g[1], PIPELINE_ORDER)))
    if not groups:
        _placeholder(out / name, "Ablations vs full recipe", "no ablation runs with a qat4 run to compare")
        return name
    most_bars = max(sum(a["scale"] == s and a["pipeline"] == p for a in recs) for s, p in groups)
    fig, axes = plt.subplots(1, len(groups), figsize=(5.5 * len(groups), 1.8 + 0.5 * most_bars), squeeze=False)
    for ax, (s, p) in zip(axes[0], groups):
        g = [a for a in recs if a["scale"] == s and a["pipeline"] == p]
        colors = ["tab:green" if a["effect"] == "better" else "tab:red" if a["effect"] == "worse" else "tab:gray"
                  for a in g]
        bars = ax.barh(range(len(g)), [a["delta"] for a in g], height=0.6, color=colors)
        marked = [(i, over_seeds[k]) for i, a in enumerate(g)
                  for k in [(a["scale"], a["pipeline"], a["stage"])] if k in over_seeds]
        if not marked:  # with the seed markers the labels would overlap them; the numbers are in the tables
            ax.bar_label(bars, fmt="%+.2f", fontsize=8, padding=2)
        for j, (i, m) in enumerate(marked):
            ax.errorbar(m["delta"], i, xerr=2 * m["se"], fmt="D", color="black", markersize=4, capsize=3,
                        label=None if j else f"mean over {m['n']} seeds ± 2 SE")
        ax.margins(x=0.15)  # room for the labels
        ax.set_yticks(range(len(g)), labels=[f"{a['factor']}: {a['variant']}" for a in g], fontsize=8)
        ax.invert_yaxis()
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set_xlabel(f"Δ {metric_label(g[0]['metric'])} = ablation − full recipe\n"
                      f"({better_word(g[0]['higher_is_better'])})", fontsize=8)
        ax.set_title(f"{PIPELINE_TITLES.get(p, p)}, scale {s}", fontsize=9)
        ax.grid(True, axis="x", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="lower right")
    fig.suptitle("Ablations vs full recipe W4A4+2:4 (bars: default seed; green = better, red = worse)"
                 if over_seeds else "Ablations vs full recipe W4A4+2:4 (green = better, red = worse)")
    _save(fig, out / name)
    return name


def _groups(runs: list[Run]) -> list[tuple[str, str, list[Run]]]:
    keys = sorted({(r.scale, r.pipeline) for r in runs},
                  key=lambda k: (rank(k[0], SCALE_ORDER), rank(k[1], PIPELINE_ORDER)))
    return [(s, p, [r for r in runs if r.scale == s and r.pipeline == p]) for s, p in keys]


def plot_training_curves(runs: list[Run], out: Path) -> list[tuple[str, str, list[Run]]]:
    """One figure per scale/pipeline: loss and eval metric vs step, a line per stage."""
    written = []
    for s, p, group in _groups(runs):
        curves = []
        for r in group:
            loss = [(e["step"], e["loss"]) for e in r.log_history if num(e.get("step")) is not None
                    and num(e.get("loss")) is not None]
            ev = [(e["step"], e[f"eval_{r.metric}"]) for e in r.log_history if num(e.get("step")) is not None
                  and num(e.get(f"eval_{r.metric}")) is not None]
            if loss or ev:
                curves.append((r, sorted(loss), sorted(ev)))
        if not curves:
            continue
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
        for r, loss, ev in curves:
            style = "--" if r.is_ablation else "-"  # ablations dashed, main rows solid
            label = f"{r.row} ({r.stage})" if r.row != r.stage else r.stage
            if loss:
                a1.plot(*zip(*loss), style, label=label)
            if ev:
                a2.plot(*zip(*ev), style, marker=".", label=label)
        metric = curves[0][0].metric
        a1.set(xlabel="step", ylabel="training loss", title="training loss")
        a2.set(xlabel="step", ylabel=f"eval {metric_label(metric)} (%, "
               f"{better_word(bool(curves[0][0].m['higher_is_better']))})", title=f"eval {metric}")
        for ax in (a1, a2):
            ax.grid(True, alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=8)
            else:
                ax.text(0.5, 0.5, "nothing logged", ha="center", va="center", transform=ax.transAxes)
        used = [r for r, _, _ in curves]
        fig.suptitle(f"Training curves — {PIPELINE_TITLES.get(p, p)}, scale {s}\n{label_runs(used)}", fontsize=10)
        name = f"plot_training_curves_{s}_{p}.png"
        _save(fig, out / name)
        written.append((name, f"Training curves, {p}", used))
    return written


def _load_sample(r: Run):
    try:
        with np.load(r.weight_sample, allow_pickle=False) as z:
            before, after = np.asarray(z["before"], float), np.asarray(z["after"], float)
            layer = str(z["layer"].reshape(-1)[0]) if "layer" in z.files and z["layer"].size else "?"
        return before, after, layer
    except Exception as e:  # a bad sample must not stop the tables
        warn(f"{r.weight_sample}: unreadable weight sample ({e}); no histogram for it")
        return None


def plot_weight_histograms(runs: list[Run], out: Path) -> list[tuple[str, str, list[Run]]]:
    """Before vs after weights of one backbone layer, one panel per stage that saved a sample."""
    written = []
    for s, p, group in _groups(runs):
        samples = [(r, x) for r in group if r.weight_sample is not None for x in [_load_sample(r)] if x is not None]
        if not samples:
            continue
        fig, axes = plt.subplots(1, len(samples), figsize=(5.5 * len(samples), 4), squeeze=False)
        for ax, (r, (before, after, layer)) in zip(axes[0], samples):
            lim = float(max(np.abs(before).max(initial=0), np.abs(after).max(initial=0))) or 1.0
            # Odd bin count centred on 0, so exact zeros (pruned weights) form their own spike.
            bins = np.linspace(-lim, lim, 2 * 100 + 2)
            zeros = float(np.mean(after == 0)) * 100 if after.size else 0.0
            levels = len(np.unique(after))
            per_row = (int(np.median([len(np.unique(row)) for row in after.reshape(after.shape[0], -1)]))
                       if after.ndim >= 2 and after.shape[0] else levels)
            ax.hist(before.ravel(), bins=bins, histtype="step", label="before (FP)", color="tab:blue")
            ax.hist(after.ravel(), bins=bins, histtype="step",
                    label=f"after: {zeros:.1f}% exact zeros,\n{levels} distinct values "
                          f"({per_row} per output row, median)", color="tab:red")
            ax.set_yscale("log")  # so the few quantization levels and the zero spike are visible together
            ax.set(xlabel="weight value", ylabel="count (log scale)")
            ax.set_title(f"{r.row} ({r.stage}); layer {layer}", fontsize=9)
            ax.legend(fontsize=8)
        used = [r for r, _ in samples]
        fig.suptitle(f"Weight histogram — {PIPELINE_TITLES.get(p, p)}, scale {s}\n{label_runs(used)}", fontsize=10)
        name = f"plot_weight_histogram_{s}_{p}.png"
        _save(fig, out / name)
        written.append((name, f"Weight histogram, {p}", used))
    return written


# ------------------------------------------------------------------- README ---
def runs_md(runs: list[Run]) -> str:
    if not runs:
        return "No runs found.\n"
    header = ["Scale", "Pipeline", "Stage", "Row", "Model", "KD", "Dropout schedule", "Init from", "Steps",
              "Runtime (s)", "Hardware", "Date", "Config sha1"]
    rows = [[r.scale, r.pipeline, r.stage + (f" (seed {r.m.get('seed')})" if r.repeat else ""), r.row,
             str(r.m["model"]), fmt(r.m.get("kd"), missing=MISSING),
             fmt(r.m.get("dropout_schedule"), missing=MISSING), fmt(r.m.get("init_from"), missing=MISSING),
             fmt(r.m.get("train_steps"), missing=MISSING), fmt(num(r.m.get("train_runtime_s")), 0, MISSING),
             fmt(r.m.get("hardware"), missing=MISSING), str(r.m.get("date") or MISSING),
             r.config_sha1 or "missing"] for r in runs]
    return md_table(header, rows)


def wall_times_md(runs_dir: Path, used: set[str] | None = None) -> str:
    """RUNS_DIR/<scale>/reproduce_times.json (written by reproduce.py per stage) -> minutes per pipeline:
    main rows (what QUICK=1 runs), ablations, all stages; successful stages only, and with `used` (the run dirs
    of the tables, relative to RUNS_DIR) only those whose run is in the tables: a time outlives its run dir."""
    rows, dropped = [], 0
    for scale_dir in sorted(p for p in runs_dir.glob("*") if p.is_dir()):
        times = _read_json(scale_dir / "reproduce_times.json", "reproduce_times.json", dict)
        if not times:
            continue
        ok = {k: t for k, t in times.items() if isinstance(t, dict) and t.get("status") == "ok"
              and num(t.get("seconds")) is not None}
        if used is not None:
            kept = {k: t for k, t in ok.items() if f"{scale_dir.name}/{k}" in used}
            dropped += len(ok) - len(kept)
            ok = kept
        ok = list(ok.values())
        pipelines = sorted({t.get("pipeline", "?") for t in ok}, key=lambda p: rank(p, PIPELINE_ORDER))
        for pl in [*pipelines, None]:
            sel = [t for t in ok if pl is None or t.get("pipeline") == pl]
            if pl is None and len(pipelines) < 2:
                continue
            main = [num(t["seconds"]) for t in sel if t.get("main_row")]
            abl = [num(t["seconds"]) for t in sel if not t.get("main_row") and not t.get("seed_repeat")]
            rep = [num(t["seconds"]) for t in sel if t.get("seed_repeat")]
            dates = sorted(str(t.get("date", ""))[:10] for t in sel)
            hw = sorted({str(t.get("hardware", MISSING)) for t in sel})
            rows.append([scale_dir.name, pl or "**all**", f"{sum(main) / 60:.1f} ({len(main)})",
                         f"{sum(abl) / 60:.1f} ({len(abl)})", f"{sum(rep) / 60:.1f} ({len(rep)})",
                         f"{(sum(main) + sum(abl) + sum(rep)) / 60:.1f}",
                         "; ".join(hw), f"{dates[0]} to {dates[-1]}" if dates[0] != dates[-1] else dates[0]])
    note = (f"\n{dropped} recorded stage time{'s' * (dropped > 1)} left out: {'their' if dropped > 1 else 'its'} "
            "run dir is not in the tables (removed, set aside or unreadable).\n" if dropped else "")
    if not rows:
        return ("No `reproduce_times.json` under the runs dir (stages run by `reproduce.py` record their times)"
                " for the runs in the tables.\n" + note)
    return md_table(["Scale", "Pipeline", "Main rows, min (stages)", "Ablations, min (stages)",
                     "Extra seeds, min (stages)", "All, min",
                     "Hardware", "Dates"], rows) + note


def paper_reference_md(ref_rows: list[dict] | None) -> str:
    if ref_rows is None:
        return "No paper reference file.\n"
    rows = [[r["pipeline"], r["row"], metric_label(r["metric"]), r["value"] or "n/a", r["source"]] for r in ref_rows]
    return md_table(["Pipeline", "Row", "Metric", "Value", "Source"], rows)


def plots_md(summary: list[tuple[str, str, list[Run]]], per_run: list[tuple[str, str, list[Run]]]) -> str:
    parts = []
    for name, title, used in summary + per_run:
        parts.append(f"**{title}** ({label_runs(used) if used else 'no runs'})\n\n![{title}]({name})\n")
    return "\n".join(parts)


GENERATED = re.compile(r"<!-- Generated from .* by results/make_results\.py")


def write_readme(out: Path, template: str, fields: dict) -> None:
    text = template
    for k, v in fields.items():
        text = text.replace("{{%s}}" % k, v.rstrip("\n"))
    if not GENERATED.search(text):  # a template of the user's own: the mark lets the next run replace its output
        text += "\n<!-- Generated from a README template by results/make_results.py. -->\n"
    (out / "README.md").write_text(text)


def own_plot(name: str, scales: set, pipelines: set) -> bool:
    """A per-run plot this script writes (plot_<kind>_<scale>_<pipeline>.png) for a known or found scale and
    pipeline: the stale ones are deleted, a user's own plot_*.png in --out never is (nor one of a pipeline of the
    user's own that no longer has runs: it cannot be told apart)."""
    return any(name == f"plot_{kind}_{s}_{p}.png" for kind in ("training_curves", "weight_histogram")
               for s in scales for p in pipelines)


# --------------------------------------------------------------------- main ---
TABLES = ("main_table", "ablations", "seeds")  # each written as .md and .csv


def own_outputs(out: Path) -> list[str]:
    """The files in `out` with the names this script writes whatever the runs (README.md, the tables, the two
    summary plots)."""
    names = {"README.md", "plot_metric_vs_compression.png", "plot_ablations.png",
             *(f"{t}.{ext}" for t in TABLES for ext in ("md", "csv"))}
    return sorted(p.name for p in out.iterdir() if p.name in names)


def check_out(out: Path) -> None:
    """--out is a folder, or does not exist yet and is created; a file in its place is never replaced, nor files
    of this script's names in a folder whose README.md it did not write (`--out .` at the repository root would
    replace the project's README; a user's folder may hold a main_table.md of their own)."""
    for p in (out, *out.parents):
        if p.exists():
            if not p.is_dir():
                raise InputError(f"--out {out}: {p} is a file, not a folder; give a folder for the results")
            break
    readme = out / "README.md"
    if readme.is_file():
        try:
            ours = bool(GENERATED.search(readme.read_text(errors="replace")))
        except OSError as e:
            raise InputError(f"--out {out}: {readme} cannot be read ({e})") from e
        if not ours:
            raise InputError(f"--out {out}: {readme} was not written by make_results.py and would be replaced; "
                             "give another --out, or move that file")
    elif out.is_dir() and (theirs := own_outputs(out)):
        raise InputError(f"--out {out} holds {', '.join(theirs[:4])}{', ...' if len(theirs) > 4 else ''} but no "
                         "README.md written by make_results.py (the mark of its folders): they would be replaced; "
                         "give another --out, or move them")


def read_template(path: Path) -> str:
    """A misspelled --template must not quietly give a README without its text."""
    if not path.is_file():
        raise InputError(f"README template {path} (--template) does not exist or is not a file")
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"README template {path} (--template) cannot be read ({e})") from e


def read_reference_arg(given: str | None) -> list[dict] | None:
    """The paper reference rows; None (paper columns empty) only when the default file is absent, since a path
    the user gave that is not there is a typo, not a wish for empty columns."""
    path = Path(given) if given else HERE / "paper_reference.csv"
    if not path.is_file():
        if given:
            raise InputError(f"paper reference {path} (--paper-ref) does not exist or is not a file")
        warn(f"no paper reference at {path}; paper columns stay empty")
        return None
    return read_paper_reference(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs_dir", nargs="?", default=os.environ.get("RUNS_DIR", "runs"),
                    help="runs root: <scale>/<pipeline>/<stage>/metrics.json (default: $RUNS_DIR or ./runs)")
    ap.add_argument("--out", default="results", help="output folder (default: results)")
    ap.add_argument("--paper-ref", default=None, help=f"default: {HERE / 'paper_reference.csv'}")
    ap.add_argument("--template", default=str(HERE / "README.template.md"))
    args = ap.parse_args(argv)
    try:
        return make(args)
    except InputError as e:
        print(f"[make_results] ERROR: {e}\n[make_results] Nothing was written.", file=sys.stderr)
        return 2


def make(args: argparse.Namespace) -> int:
    runs_dir, out = Path(args.runs_dir), Path(args.out)
    # Every input is checked before the first write, so a bad one leaves --out as it was.
    check_out(out)
    template = read_template(Path(args.template))
    ref_rows = read_reference_arg(args.paper_ref)
    check_runs_dir(runs_dir, None)
    found = scan(runs_dir)
    check_runs_dir(runs_dir, found)
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "README.md").exists():  # the folder's mark first: a run stopped midway leaves it ours (check_out)
        (out / "README.md").write_text("<!-- Generated from nothing yet by results/make_results.py, which stopped "
                                       "before writing this README; run it again. -->\n")

    all_runs, skipped = found.runs, found.skipped
    runs = [r for r in all_runs if not r.repeat]  # the default seed: main table, ablations, plots
    gaps = stage_gaps(all_runs, skipped, found.refused)
    for (sc, pl, st), gap in gaps.items():
        if st in MAIN_ROWS:
            warn(f"{own_dir(sc, pl, st, 0)}: main stage {gap.status}; its main-table row says so")
    ref = load_paper_reference(ref_rows or [])

    mrecs = main_records(runs, ref, gaps)
    arecs = ablation_records(runs, gaps)
    main_md = main_table_md(mrecs, runs, ref)
    abl_md = ablations_md(arecs, runs, gaps)
    (out / "main_table.md").write_text("# Main results\n\n" + main_md)
    write_csv(out / "main_table.csv", main_csv_columns(runs), mrecs)
    (out / "ablations.md").write_text("# Ablations\n\n" + abl_md)
    write_csv(out / "ablations.csv", ABL_CSV_COLUMNS, arecs)
    srecs = seed_records(all_runs)
    seed_md = seeds_md(srecs, all_runs)
    (out / "seeds.md").write_text("# Spread over seeds\n\n" + seed_md)
    write_csv(out / "seeds.csv", SEED_CSV_COLUMNS, srecs)

    # Per-run plots are regenerated from scratch so none outlives its runs.
    scales_known = {*SCALE_ORDER, *(r.scale for r in all_runs)}
    pipelines_known = {*PIPELINE_ORDER, *(r.pipeline for r in all_runs)}
    for stale in sorted(out.glob("plot_*.png")):
        if own_plot(stale.name, scales_known, pipelines_known):
            stale.unlink()
    main_runs = [r for r in runs if not r.is_ablation]
    summary = [(plot_metric_vs_compression(mrecs, runs, ref, out), "Task metric vs compression", main_runs),
               (plot_ablations(arecs, out, srecs), "Ablation deltas vs full recipe",
                [r for r in all_runs if r.is_ablation or (r.stage == FULL_RECIPE and arecs)])]
    per_run = plot_training_curves(runs, out) + plot_weight_histograms(runs, out)

    scales = sorted({r.scale for r in runs}, key=lambda s: rank(s, SCALE_ORDER))
    write_readme(out, template, {
        "scales": ", ".join(f"`{s}`" for s in scales) or "none (no runs yet)",
        "runs_label": label_runs(runs) if runs else "no runs",
        "runs_table": runs_md(all_runs),
        "wall_times": wall_times_md(runs_dir, {r.rel for r in all_runs}),
        "main_table": main_md,
        "ablations_table": abl_md,
        "seeds_table": seed_md,
        "plots": plots_md(summary, per_run),
        "skipped": md_table(["Run dir", "Reason"], [[d, why] for d, why in skipped]) if skipped else "None.\n",
        "paper_reference": paper_reference_md(ref_rows),
    })
    print(f"[make_results] {len(all_runs)} runs ({len(all_runs) - len(runs)} extra seeds), {len(skipped)} skipped "
          f"-> {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
