"""Fine-tune BERT on SQuAD1.1 for one stage of the paper's staged compression recipe.

    python -m bert_squad.train --config bert_squad/configs/qat4.yaml [key=value ...]
    bert_squad/train.sh qat4 train.num_train_epochs=3          # the same, SCALE=mini picks configs/mini/

Stages (configs/*.yaml): fp -> sparse -> qat4 (W4A4 + 2:4), qat4_dense (W4A4) and ablations (abl_*).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from transformers import (AutoConfig, AutoModelForQuestionAnswering, AutoTokenizer,  # noqa: E402
                          DataCollatorWithPadding, default_data_collator)

from common.config import ConfigError, save_config, stage_argv  # noqa: E402
# batch_split: for reproduce.py's up-front check of the global batch
from common.hf import batch_split, check_model_source, end_of_run, global_batch_of, stage_callbacks  # noqa: E402,F401
from common.hf import training_arguments as training_args  # noqa: E402
import common.hf as hf  # noqa: E402
from common.runs import (cli, is_main_process, not_generated, prepare_output_dir, reevaluated,  # noqa: E402
                         save_weight_sample, stage_metrics, write_json)
from common.sharding import full_tensor  # noqa: E402
from common.stage import build_distiller, build_stage_model  # noqa: E402

from bert_squad.squad_data import load_squad, minilm_path, references  # noqa: E402
from bert_squad.trainer_qa import QuestionAnsweringTrainer  # noqa: E402
from bert_squad.utils_qa import prepare_train_features, prepare_validation_features  # noqa: E402

PIPELINE = "bert_squad"


def resolve_model_path(name: str) -> str:
    """`minilm` names the offline all-MiniLM-L6-v2 folder shipped by a pip package (mini scale)."""
    return minilm_path() if name == "minilm" else name


def ensure_mini_data(data_cfg: dict) -> None:
    """Generate the synthetic mini-SQuAD files when the mini config asks for them and they are missing. Only where
    the configured files are the generator's (<dir>/train.json, <dir>/dev.json), and never over files it did not
    write: a user's own data is read as it is."""
    gen = data_cfg.get("generate_mini")
    if not gen:
        return
    from bert_squad import make_mini_squad
    out_dir = Path(data_cfg["train_file"]).parent
    made = {str(Path(p)) for p in make_mini_squad.output_files(out_dir).values()}
    if {str(Path(data_cfg["train_file"])), str(Path(data_cfg["validation_file"] or ""))} != made:
        return
    if foreign := make_mini_squad.foreign_files(out_dir):
        raise not_generated(foreign, "data.generate_mini=null")
    make_mini_squad.main(["--out_dir", str(out_dir), "--seed", str(gen.get("seed", 0)),
                          "--n_train", str(gen.get("n_train", 4000)), "--n_dev", str(gen.get("n_dev", 600))])


def load_data(cfg: dict, tokenizer, need_train: bool = True):
    d = cfg["data"]
    ensure_mini_data(d)
    raw = load_squad(d.get("dataset_name") or "squad", d.get("train_file") if need_train else None,
                     d.get("validation_file"), d.get("cache_dir"))
    if "validation" not in raw:
        raise ConfigError(f"{cfg['config_file']}: no validation split (set data.validation_file)")
    val_examples = raw["validation"]
    if d.get("max_eval_samples"):
        val_examples = val_examples.select(range(min(d["max_eval_samples"], len(val_examples))))
    kw = dict(tokenizer=tokenizer, max_seq_length=d["max_seq_length"], doc_stride=d["doc_stride"],
              pad_to_max_length=d.get("pad_to_max_length", True))
    val_features = val_examples.map(lambda b: prepare_validation_features(b, **kw), batched=True,
                                    remove_columns=val_examples.column_names, desc="tokenize validation")
    train_features = None
    if need_train:
        train = raw["train"]
        if d.get("max_train_samples"):
            train = train.select(range(min(d["max_train_samples"], len(train))))
        train_features = train.map(lambda b: prepare_train_features(b, **kw), batched=True,
                                   remove_columns=train.column_names, desc="tokenize train")
    return train_features, val_examples, val_features


def model_builder(cfg: dict):
    """Architecture + starting weights (pre-trained) with the stage's dropout probability."""
    path = resolve_model_path(cfg["model_name_or_path"])
    p = (cfg.get("dropout") or {}).get("p")
    kw = {} if p is None else dict(hidden_dropout_prob=p, attention_probs_dropout_prob=p)
    layers = cfg.get("num_hidden_layers")
    if layers:
        kw["num_hidden_layers"] = layers
    if cfg.get("from_config"):  # tests: a tiny randomly initialised model from a config file, no weights
        return lambda: AutoModelForQuestionAnswering.from_config(AutoConfig.from_pretrained(path, **kw))
    return lambda: AutoModelForQuestionAnswering.from_pretrained(path, **kw)


def collator(cfg, tokenizer):
    """Padded to max_seq_length (the HF example's default), or per batch (mini scale: saves CPU time)."""
    return default_data_collator if cfg["data"].get("pad_to_max_length", True) else DataCollatorWithPadding(tokenizer)


def make_trainer(cfg, model, args, tokenizer, train_features, val_examples, val_features, distiller=None,
                 callbacks=()):
    return QuestionAnsweringTrainer(
        model=model, args=args, train_dataset=train_features, eval_dataset=val_features,
        processing_class=tokenizer, data_collator=collator(cfg, tokenizer), distiller=distiller,
        callbacks=list(callbacks), eval_examples=val_examples, references=references(val_examples),
        n_best_size=cfg["data"]["n_best_size"], max_answer_length=cfg["data"]["max_answer_length"])


def finish_run(cfg, out_dir: Path, trainer, model, init_state, steps: int = 0, runtime: float = 0.0,
               prev: dict | None = None) -> dict:
    """Evaluate, then write metrics.json, predictions.json, log_history.json and the weight sample. eval.py passes
    the training run's metrics as `prev`: its facts are kept (common.runs.reevaluated), and log_history.json and
    weight_sample.npz (whose 'before' is the init checkpoint) stay as trained. Ends a multi-process run
    (common.hf.end_of_run)."""
    metrics = trainer.evaluate()  # every rank takes part; rank 0 writes
    task = {"exact_match": metrics["eval_exact_match"], "f1": metrics["eval_f1"]}
    out = stage_metrics(cfg, model, PIPELINE, "f1", True, task, steps, runtime)
    out["effective_train_batch_size"] = global_batch_of(trainer.args)
    out["learning_rate"] = trainer.args.learning_rate
    if prev is None:
        save_weight_sample(out_dir, model, init_state, write=trainer.is_world_process_zero())  # every rank (FSDP)
    else:
        out = reevaluated(prev, out)
    if trainer.is_world_process_zero():
        write_json(out_dir / "predictions.json", trainer.last_predictions)
        if prev is None:
            write_json(out_dir / "log_history.json", trainer.state.log_history)
        write_json(out_dir / "metrics.json", out)
    end_of_run(trainer)
    return out


def load_stage_config(path, overrides=None) -> dict:
    """The stage's resolved config, its `train` keys checked (reproduce.py checks every stage with it up front)."""
    return hf.load_stage_config(path, overrides, PIPELINE)


def main(argv=None) -> dict:
    a = stage_argv(argv, __doc__, PIPELINE, "train.learning_rate=5e-5")
    cfg = load_stage_config(a.config, a.overrides)
    for key in ("model_name_or_path", "tokenizer_name"):
        check_model_source(cfg, key)
    out_dir = prepare_output_dir(cfg["output_dir"], cfg.get("overwrite_output_dir", False), cfg.get("resume", False),
                                 cfg)
    if is_main_process():
        save_config(cfg, out_dir / "config.yaml")
    torch.manual_seed(cfg["train"].get("seed", 42))

    tok_path = resolve_model_path(cfg.get("tokenizer_name") or cfg["model_name_or_path"])
    tokenizer = AutoTokenizer.from_pretrained(tok_path)
    train_features, val_examples, val_features = load_data(cfg, tokenizer)
    args = training_args(cfg, out_dir)
    build = model_builder(cfg)

    def calib_batches():
        # global batches of a seeded permutation, as ViT's and wav2vec2's (choice): in file order they would be the
        # first one or two SQuAD articles, the same for every seed
        order = torch.randperm(len(train_features), generator=torch.Generator().manual_seed(args.seed)).tolist()
        loader = torch.utils.data.DataLoader(train_features.remove_columns(["start_positions", "end_positions"]),
                                             batch_size=global_batch_of(args), sampler=order,
                                             collate_fn=collator(cfg, tokenizer))
        return iter(loader)

    resume = hf.resume_checkpoint(cfg, out_dir, PIPELINE)
    model, init_state = build_stage_model(cfg, build, calib_batches, do_calibrate=resume is None,
                                          train_device=args.device,
                                          calib_micro_batch=args.per_device_train_batch_size)
    distiller = build_distiller(cfg, build)
    callbacks = stage_callbacks(cfg)
    trainer = make_trainer(cfg, model, args, tokenizer, train_features, val_examples, val_features, distiller,
                           callbacks)
    if is_main_process():
        print(f"[{PIPELINE}/{cfg['stage']}] effective batch {global_batch_of(args)} = "
              f"{args.per_device_train_batch_size} per device x "
              f"{args.world_size} processes x {args.gradient_accumulation_steps} accumulation; lr {args.learning_rate}")
    t0 = time.time()
    steps = 0
    if args.num_train_epochs > 0 or args.max_steps > 0:
        result = trainer.train(resume_from_checkpoint=resume)
        steps = result.global_step
    if args.world_size > 1:  # evidence for the scale-out test: each rank's masks and clips after training
        torch.save({k: full_tensor(v).detach().cpu() for k, v in model.state_dict().items()
                    if k.endswith((".mask", ".lo", ".hi", ".signed"))},
                   out_dir / f"rank_state_{args.process_index}.pt")
    if cfg.get("interrupt_at_step") and steps == cfg["interrupt_at_step"]:
        print(f"[{PIPELINE}/{cfg['stage']}] interrupted at step {steps} (interrupt_at_step); resume=true continues")
        end_of_run(trainer)
        return {}
    trainer.save_model(str(out_dir))
    out = finish_run(cfg, out_dir, trainer, model, init_state, steps, time.time() - t0)
    print(f"[{PIPELINE}/{cfg['stage']}] EM {out['exact_match']:.2f} F1 {out['f1']:.2f} "
          f"({out['compression_ratio']}x backbone, {steps} steps, {out['train_runtime_s']} s) -> {out_dir}")
    return out


if __name__ == "__main__":
    cli(main)
