"""Fine-tune wav2vec2 (CTC) on LibriSpeech for one stage of the paper's staged compression recipe.

    python -m wav2vec_librispeech.train --config wav2vec_librispeech/configs/qat4.yaml [key=value ...]
    wav2vec_librispeech/train.sh qat4 train.learning_rate=1e-4     # the same, SCALE=mini picks configs/mini/

Stages (configs/*.yaml): fp -> sparse -> qat4 (W4A4 + 2:4), qat4_dense (W4A4) and ablations (abl_*).
Evaluation: greedy CTC decoding (no language model), WER/CER (jiwer) on dev-clean, test-clean and test-other.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from transformers import (Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2ForCTC,  # noqa: E402
                          Wav2Vec2Processor)

from common.config import ConfigError, save_config, stage_argv  # noqa: E402
# batch_split: for reproduce.py's up-front check of the global batch
from common.hf import batch_split, check_model_source, end_of_run, global_batch_of, stage_callbacks  # noqa: E402,F401
from common.hf import training_arguments as training_args  # noqa: E402
import common.hf as hf  # noqa: E402
from common.runs import (cli, not_generated, prepare_output_dir, reevaluated, save_weight_sample,  # noqa: E402
                         stage_metrics, write_json)
from common.stage import build_distiller, build_stage_model  # noqa: E402

from wav2vec_librispeech.ctc_text import build_vocab, make_tokenizer  # noqa: E402
from wav2vec_librispeech.data import CTCCollator, SpeechDataset  # noqa: E402
from wav2vec_librispeech.librispeech import (filter_by_duration, length_grouped_batches,  # noqa: E402
                                             load_hf_librispeech, read_librispeech)
from wav2vec_librispeech.trainer_ctc import CTCTrainer  # noqa: E402

PIPELINE = "wav2vec_librispeech"
MAIN_METRIC = "wer_test_clean"
# dropout.p sets every dropout probability of the model (choice; the paper only says "scheduled dropout")
DROPOUT_KEYS = ("hidden_dropout", "attention_dropout", "activation_dropout", "feat_proj_dropout", "final_dropout")


def split_key(split: str) -> str:
    """'test-clean' -> 'test_clean' (metric names: wer_test_clean, cer_test_clean, ...)."""
    return split.replace("-", "_").replace(".", "_")


# -- data -------------------------------------------------------------------------------------------------------
def ensure_mini_data(d: dict) -> None:
    """Synthesize the SYNTHETIC eSpeak corpus into data.librispeech_root when the mini config asks for it and it
    is missing (or was built with other parameters). In a subprocess: audio is bit-identical only from a fresh
    process (see synth_corpus.py)."""
    gen = d.get("generate_mini")
    if not gen:
        return
    from wav2vec_librispeech.synth_corpus import _params, foreign_splits
    root = Path(d["librispeech_root"])
    if foreign := foreign_splits(root):
        raise not_generated(foreign, "data.generate_mini=null")
    want = _params(gen.get("seed", 0), gen.get("n_train", 1500), gen.get("n_eval", 150))
    params = root / "params.json"
    if params.exists():
        old = json.loads(params.read_text())
        if {k: old.get(k) for k in want} == want:
            return
    root.mkdir(parents=True, exist_ok=True)
    print(f"[{PIPELINE}] synthesizing the mini corpus (SYNTHETIC, eSpeak NG) into {root} ...", flush=True)
    subprocess.run([sys.executable, "-m", "wav2vec_librispeech.synth_corpus", "--out_dir", str(root.resolve()),
                    "--seed", str(want["seed"]), "--n_train", str(want["n_train"]), "--n_eval", str(want["n_eval"])],
                   cwd=str(ROOT), check=True)


def read_split(d: dict, split: str, max_seconds):
    """(utterances, n_dropped) of one split, from the local tree or (no librispeech_root) the `datasets` copy."""
    if d.get("librispeech_root"):
        utts = read_librispeech(d["librispeech_root"], split)
    elif d.get("dataset_name"):
        utts = load_hf_librispeech(split, d.get("cache_dir"), repo=d["dataset_name"])
    else:
        raise ConfigError("data: set data.librispeech_root (a LibriSpeech folder tree) or data.dataset_name "
                          "(the Hugging Face copy, e.g. openslr/librispeech_asr)")
    return filter_by_duration(utts, max_seconds)


def load_data(cfg: dict, need_train: bool = True):
    """-> (train SpeechDataset or None, {split: SpeechDataset}, info dict for metrics.json)."""
    d = cfg["data"]
    ensure_mini_data(d)
    sr = int(d["sampling_rate"])
    info = {}
    train = None
    if need_train:
        utts, dropped = [], 0
        for split in d["train_splits"]:
            u, n = read_split(d, split, d.get("max_train_seconds"))
            utts += u
            dropped += n
        if d.get("max_train_samples"):
            utts = utts[: int(d["max_train_samples"])]
        if not utts:
            raise ConfigError(f"{cfg['config_file']}: no training utterances left (data.train_splits "
                              f"{d['train_splits']}, max_train_seconds {d.get('max_train_seconds')})")
        train = SpeechDataset(utts, sr, cache=bool(d.get("cache_audio")))
        info = {"train_utterances": len(train), "train_dropped_too_long": dropped,
                "train_hours": round(train.seconds / 3600, 3), "max_train_seconds": d.get("max_train_seconds")}
        print(f"[{PIPELINE}] train: {len(train)} utterances ({info['train_hours']} h) from {d['train_splits']}; "
              f"dropped {dropped} longer than {d.get('max_train_seconds')} s", flush=True)
    evals = {}
    for split in d["eval_splits"]:
        u, n = read_split(d, split, d.get("max_eval_seconds"))
        if n:
            print(f"[{PIPELINE}] {split}: dropped {n} utterances longer than {d.get('max_eval_seconds')} s "
                  f"(WER is then not over the full split)", flush=True)
        if d.get("max_eval_samples"):
            u = u[: int(d["max_eval_samples"])]
        evals[split] = SpeechDataset(u, sr, cache=bool(d.get("cache_audio")))
        info[f"{split_key(split)}_utterances"] = len(u)
    return train, evals, info


# -- model ------------------------------------------------------------------------------------------------------
def model_kwargs(cfg: dict) -> dict:
    """Config overrides for the checkpoint: the 960h vocabulary (blank = <pad> = 0), the `model:` block
    (null keeps the checkpoint's value), and the stage's dropout probability."""
    kw = {k: v for k, v in (cfg.get("model") or {}).items() if v is not None}
    kw.update(vocab_size=len(build_vocab()), pad_token_id=0)
    p = (cfg.get("dropout") or {}).get("p")
    if p is not None:
        kw.update({k: p for k in DROPOUT_KEYS})
    return kw


def model_builder(cfg: dict):
    """Architecture + starting weights: a fine-tuned CTC checkpoint, or a pre-trained-only one (e.g.
    facebook/wav2vec2-large-lv60, whose CTC head is then newly initialised), or with from_config=true a random
    init from a config.json (the mini scale trains that from scratch in its fp stage; tests)."""
    path = str(cfg["model_name_or_path"])
    kw = model_kwargs(cfg)

    def build():
        m = Wav2Vec2ForCTC(Wav2Vec2Config.from_pretrained(path, **kw)) if cfg.get("from_config") else \
            Wav2Vec2ForCTC.from_pretrained(path, **kw)
        # SpecAugment's learned embedding exists only where masking is on (mask_time_prob or mask_feature_prob
        # > 0): a stage may turn it on or off against its init checkpoint or teacher (e.g. an ablation)
        for which in ("missing", "unexpected"):
            setattr(m, f"_keys_to_ignore_on_load_{which}",
                    set(getattr(m, f"_keys_to_ignore_on_load_{which}", None) or ()) | {r"\.masked_spec_embed$"})
        return m
    return build


def check_vocab(cfg: dict) -> None:
    """A local fine-tuned checkpoint must use the 960h character vocabulary (its CTC head is indexed by it).
    Hub checkpoints are not checked here (no download): the facebook/wav2vec2-*-960h* ones use exactly it."""
    f = Path(str(cfg["model_name_or_path"])) / "vocab.json"
    if f.exists() and json.loads(f.read_text()) != build_vocab():
        raise ConfigError(f"{f}: the checkpoint's vocabulary differs from the 32-entry 960h one "
                          f"(wav2vec_librispeech/ctc_text.py); its CTC head would be misread")


def make_processor(out_dir: Path, sampling_rate: int) -> Wav2Vec2Processor:
    """Feature extractor (do_normalize, 0.0 padding, attention mask) + the 32-entry character tokenizer, saved
    with the model so the run dir is a standard HF wav2vec2 CTC checkpoint."""
    fe = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=sampling_rate, padding_value=0.0, do_normalize=True,
                                  return_attention_mask=True)
    return Wav2Vec2Processor(feature_extractor=fe, tokenizer=make_tokenizer(str(out_dir)))


def make_trainer(cfg, model, args, processor, train_ds, eval_sets, distiller=None, callbacks=()):
    dev = next((s for s in eval_sets if s.startswith("dev")), next(iter(eval_sets), None))
    return CTCTrainer(model=model, args=args, train_dataset=train_ds,
                      eval_dataset=eval_sets[dev] if dev else None, processing_class=processor,
                      data_collator=CTCCollator(), distiller=distiller, callbacks=list(callbacks),
                      eval_sets=eval_sets)


def finish_run(cfg, out_dir: Path, trainer, model, init_state, steps: int = 0, runtime: float = 0.0,
               info: dict | None = None, prev: dict | None = None) -> dict:
    """Evaluate every eval split, then write metrics.json, predictions_<split>.jsonl, log_history.json and the
    weight sample (files on the main process only; evaluation runs on all). eval.py passes the training run's
    metrics as `prev`: its facts are kept (common.runs.reevaluated), and log_history.json and weight_sample.npz
    (whose 'before' is the init checkpoint) stay as trained. Ends a multi-process run (common.hf.end_of_run)."""
    task = {}
    for split, ds in trainer.eval_sets.items():
        key = split_key(split)
        m = trainer.evaluate(ds, metric_key_prefix=f"eval_{key}")
        task[f"wer_{key}"] = m[f"eval_{key}_wer"]
        task[f"cer_{key}"] = m[f"eval_{key}_cer"]
    task.update(info or {})
    task.update(decoding="greedy CTC (best path), no language model")
    out = stage_metrics(cfg, model, PIPELINE, MAIN_METRIC, False, task, steps, runtime)
    if prev is None:  # every rank (FSDP gathers the weights), one writes
        save_weight_sample(out_dir, model, init_state, write=trainer.is_world_process_zero())
    else:
        out = reevaluated(prev, out)
    if trainer.is_world_process_zero():
        for split in trainer.eval_sets:
            rows = trainer.last_predictions[f"eval_{split_key(split)}"]
            (out_dir / f"predictions_{split_key(split)}.jsonl").write_text(
                "".join(json.dumps(r) + "\n" for r in rows))
        if prev is None:
            write_json(out_dir / "log_history.json", trainer.state.log_history)
        write_json(out_dir / "metrics.json", out)
    end_of_run(trainer)
    return out


def summary_line(cfg, out: dict) -> str:
    parts = [f"{k} {out[k]:.2f}" for k in ("wer_test_clean", "wer_test_other", "wer_dev_clean", "cer_test_clean")
             if k in out]
    return f"[{PIPELINE}/{cfg['stage']}] " + " ".join(parts)


def load_stage_config(path, overrides=None) -> dict:
    """The stage's resolved config, its `train` keys checked (reproduce.py checks every stage with it up front)."""
    return hf.load_stage_config(path, overrides, PIPELINE)


def main(argv=None) -> dict:
    a = stage_argv(argv, __doc__, PIPELINE, "train.learning_rate=1e-4")
    cfg = load_stage_config(a.config, a.overrides)
    check_model_source(cfg)
    torch.manual_seed(cfg["train"].get("seed", 42))
    if cfg.get("torch_threads"):
        torch.set_num_threads(int(cfg["torch_threads"]))
    if cfg["train"].get("fsdp"):
        # found with the pinned accelerate 1.15 / transformers 5.23 on CPU processes given Accelerate's FSDP path
        # (tests/fsdp_cpu_launch.py); the FP model fails the same way: not the compression's doing
        raise ConfigError(f"{cfg['config_file']}: train.fsdp is not supported for wav2vec2: Accelerate's FSDP2 "
                          f"wrapping asks Wav2Vec2ForCTC for input embeddings (transformers raises NotImplementedError)"
                          f" and takes the Wav2Vec2EncoderStableLayerNorm encoder for the final norm, whose input the "
                          f"model then writes in place (an autograd error). wav2vec2-large fits on every GPU: use DDP "
                          f"(drop train.fsdp; with NPROC=N the global batch is kept)")
    args = training_args(cfg, Path(cfg["output_dir"]))
    global_batch = global_batch_of(args)
    # torchrun: the main process checks/creates the run dir, synthesizes or exports the data and writes vocab.json
    # first; the other ranks then read what it wrote (multi-node: output_dir and data on a shared file system)
    with args.main_process_first(local=False, desc="run dir and data"):
        if args.process_index == 0:
            out_dir = prepare_output_dir(cfg["output_dir"], cfg.get("overwrite_output_dir", False),
                                         cfg.get("resume", False), cfg)
            save_config(cfg, out_dir / "config.yaml")
        out_dir = Path(cfg["output_dir"])
        train_ds, eval_sets, info = load_data(cfg)
        processor = make_processor(out_dir, int(cfg["data"]["sampling_rate"]))
    info["global_batch_size"] = global_batch
    check_vocab(cfg)
    build = model_builder(cfg)
    device = args.device

    def calib_batches():
        # length-grouped global batches (little padding: padded frames would skew the clip percentiles), seeded
        order = length_grouped_batches(train_ds.lengths, global_batch, args.seed)
        return iter(torch.utils.data.DataLoader(train_ds, batch_sampler=order, collate_fn=CTCCollator(False)))

    resume = hf.resume_checkpoint(cfg, out_dir, PIPELINE)
    model, init_state = build_stage_model(cfg, build, calib_batches, do_calibrate=resume is None,
                                          train_device=device,
                                          calib_micro_batch=args.per_device_train_batch_size)
    if cfg.get("freeze_feature_encoder", True):
        model.freeze_feature_encoder()  # the conv feature encoder is not trained (paper: fine-tuning recipe)
    distiller = build_distiller(cfg, build)
    if distiller is not None and distiller.share_frozen(model, "wav2vec2.feature_extractor"):
        print(f"[{PIPELINE}/{cfg['stage']}] the KD teacher reuses the student's output of the frozen conv feature "
              f"encoder (same weights)", flush=True)
    callbacks = stage_callbacks(cfg)
    trainer = make_trainer(cfg, model, args, processor, train_ds, eval_sets, distiller, callbacks)
    t0, c0 = time.time(), time.process_time()
    steps = 0
    if args.num_train_epochs > 0 or args.max_steps > 0:
        result = trainer.train(resume_from_checkpoint=resume)
        steps = result.global_step
    else:
        print(f"[{PIPELINE}/{cfg['stage']}] no training steps (num_train_epochs 0): evaluate and save "
              f"{cfg['model_name_or_path']} as this stage's checkpoint", flush=True)
    runtime = time.time() - t0
    info["train_cpu_s"] = round(time.process_time() - c0, 1)  # CPU seconds, all threads (contention-free measure)
    if cfg.get("interrupt_at_step") and steps == cfg["interrupt_at_step"]:
        print(f"[{PIPELINE}/{cfg['stage']}] interrupted at step {steps} (interrupt_at_step); resume=true continues")
        end_of_run(trainer)
        return {}
    trainer.save_model(str(out_dir))
    out = finish_run(cfg, out_dir, trainer, model, init_state, steps, runtime, info)
    print(f"{summary_line(cfg, out)} ({out['compression_ratio']}x backbone, {steps} steps, "
          f"{out['train_runtime_s']} s) -> {out_dir}", flush=True)
    return out


if __name__ == "__main__":
    cli(main)
