"""Re-evaluate a saved bert_squad run (compressed ones included): rebuild the model from the run's own
config.yaml, prepare it with the run's recipe, load its weights strictly, and rewrite metrics.json and
predictions.json with the same keys as training wrote.

    python -m bert_squad.eval RUN_DIR [key=value ...]     # e.g. data.validation_file=/data/dev-v1.1.json
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from transformers import AutoConfig, AutoModelForQuestionAnswering, AutoTokenizer  # noqa: E402

from common.runs import check_run_of, cli, read_metrics  # noqa: E402
from common.stage import load_hf_run  # noqa: E402

from bert_squad.train import finish_run, load_data, make_trainer, training_args  # noqa: E402


def load_run(run_dir: Path, overrides: list[str] | None = None):
    """(cfg, model, tokenizer) of a finished run: architecture from its config.json, weights from its file."""
    cfg, model = load_hf_run(run_dir, lambda d: AutoModelForQuestionAnswering.from_config(AutoConfig.from_pretrained(d)),
                             overrides)
    return cfg, model, AutoTokenizer.from_pretrained(run_dir)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args(argv)
    check_run_of(a.run_dir, "bert_squad")
    prev = read_metrics(a.run_dir)  # read first: a damaged one stops us before the evaluation
    cfg, model, tokenizer = load_run(a.run_dir, a.overrides)
    _, val_examples, val_features = load_data(cfg, tokenizer, need_train=False)
    cfg["train"]["report_to"] = "none"
    args = training_args(cfg, a.run_dir)
    trainer = make_trainer(cfg, model, args, tokenizer, None, val_examples, val_features)
    out = finish_run(cfg, a.run_dir, trainer, model, None, prev=prev)
    print(f"[bert_squad/{cfg['stage']}] EM {out['exact_match']:.2f} F1 {out['f1']:.2f} -> {a.run_dir}/metrics.json")
    return out


if __name__ == "__main__":
    cli(main)
