"""Re-evaluate a saved wav2vec_librispeech run (compressed ones included): rebuild the model from the run's own
config.yaml and config.json, prepare it with the run's recipe, load its weights strictly, and rewrite metrics.json
and predictions_<split>.jsonl with the same keys as training wrote (greedy CTC decoding, no language model).

    python -m wav2vec_librispeech.eval RUN_DIR [key=value ...]   # e.g. data.librispeech_root=/data/LibriSpeech
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from transformers import Wav2Vec2Config, Wav2Vec2ForCTC, Wav2Vec2Processor  # noqa: E402

from common.runs import check_run_of, cli, read_metrics  # noqa: E402
from common.stage import load_hf_run  # noqa: E402

from wav2vec_librispeech.train import finish_run, load_data, make_trainer, summary_line, training_args  # noqa: E402


def load_run(run_dir: Path, overrides: list[str] | None = None):
    """(cfg, model, processor) of a finished run: architecture from its config.json, weights from its file."""
    cfg, model = load_hf_run(run_dir, lambda d: Wav2Vec2ForCTC(Wav2Vec2Config.from_pretrained(d)), overrides)
    return cfg, model, Wav2Vec2Processor.from_pretrained(run_dir)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args(argv)
    check_run_of(a.run_dir, "wav2vec_librispeech")
    prev = read_metrics(a.run_dir)  # read first: a damaged one stops us before the evaluation
    cfg, model, processor = load_run(a.run_dir, a.overrides)
    if cfg.get("torch_threads"):
        import torch
        torch.set_num_threads(int(cfg["torch_threads"]))
    _, eval_sets, info = load_data(cfg, need_train=False)
    cfg["train"]["report_to"] = "none"
    args = training_args(cfg, a.run_dir)
    trainer = make_trainer(cfg, model, args, processor, None, eval_sets)
    out = finish_run(cfg, a.run_dir, trainer, model, None, info=info, prev=prev)
    print(f"{summary_line(cfg, out)} -> {a.run_dir}/metrics.json")
    return out


if __name__ == "__main__":
    cli(main)
