"""Run every vit_imagenet stage in order (fp, sparse, qat4, qat4_dense, then the ablations) in one process.

    python -m vit_imagenet.sequence --scale mini [--stages fp,sparse,qat4] [--force] [key=value ...]

One process saves the ~10 s of imports per stage at mini scale. A stage whose run dir already has metrics.json is
skipped unless --force (then its run dir is replaced). The key=value overrides go to every stage. Prints, and
writes to RUNS_DIR/<scale>/vit_imagenet/sequence_summary.json, each stage's top-1 and wall time.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from vit_imagenet import train  # noqa: E402
from vit_imagenet.pipeline import PIPELINE, STAGES, load_stage_config  # noqa: E402

CONFIGS = Path(__file__).resolve().parent / "configs"


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", choices=["mini", "paper"], default="mini")
    ap.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated (default: {','.join(STAGES)})")
    ap.add_argument("--force", action="store_true", help="rerun stages that already have metrics.json")
    ap.add_argument("overrides", nargs="*", help="key=value overrides passed to every stage")
    a = ap.parse_args(argv)
    cfg_dir = CONFIGS / "mini" if a.scale == "mini" else CONFIGS
    stages = [s for s in a.stages.split(",") if s]
    rows = []
    t_all = time.time()
    for stage in stages:
        path = cfg_dir / f"{stage}.yaml"
        cfg = load_stage_config(path, a.overrides)
        out_dir = Path(cfg["output_dir"])
        if (out_dir / "metrics.json").is_file() and not a.force:
            m = json.loads((out_dir / "metrics.json").read_text())
            rows.append({"stage": stage, "top1": m.get("top1"), "wall_s": None, "skipped": True})
            print(f"[{PIPELINE}] {stage}: {out_dir}/metrics.json exists, skipped (--force reruns it)", flush=True)
            continue
        t0 = time.time()
        m = train.main(["--config", str(path), *a.overrides, *(["overwrite_output_dir=true"] if a.force else [])])
        rows.append({"stage": stage, "top1": m.get("top1"), "top5": m.get("top5"), "wall_s": round(time.time() - t0, 1),
                     "train_runtime_s": m.get("train_runtime_s"), "cpu_s": m.get("stage_cpu_s"), "skipped": False})
    total = round(time.time() - t_all, 1)
    print(f"\n[{PIPELINE}] {a.scale} sequence: {total} s")
    for r in rows:
        top1 = "—" if r["top1"] is None else f"{r['top1']:.2f}"
        print(f"  {r['stage']:<18} top-1 {top1:>6}  " + ("(skipped)" if r["skipped"] else f"{r['wall_s']:>6.1f} s"))
    if rows:
        runs = Path(load_stage_config(cfg_dir / f"{stages[0]}.yaml", a.overrides)["output_dir"]).parent
        runs.mkdir(parents=True, exist_ok=True)
        (runs / "sequence_summary.json").write_text(json.dumps({"total_wall_s": total, "stages": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
