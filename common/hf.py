"""Hugging Face Trainer integration shared by the BERT and wav2vec2 pipelines: KD in `compute_loss`, and
scheduled dropout as a callback (no patching of the Trainer or the optimizer)."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.training_args import ParallelMode

from . import sharding
from .config import ConfigError, check_open_section, expand_paths, load_config, split_global_batch
from .distill import DistillationLoss
from .dropout import ScheduledDropout
from .pact import clip_state_as_1d
from .runs import is_main_process, rank_seed
from .stage import check_stage_config


class ScheduledDropoutCallback(TrainerCallback):
    def __init__(self, schedule: str = "linear", end_p: float = 0.0, start_p: float | None = None,
                 step_at: float | None = 0.5):
        self.kw = dict(schedule=schedule, end_p=end_p, start_p=start_p, step_at=step_at)
        self.sched = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.sched = ScheduledDropout(model, state.max_steps, **self.kw)
        self.sched.step(state.global_step)  # a resumed run continues the schedule where it stopped

    def on_step_begin(self, args, state, control, **kwargs):
        if self.sched is not None:
            self.sched.step(state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.sched is not None and logs is not None and "loss" in logs:
            logs["dropout_factor"] = round(self.sched.factor(state.global_step), 4)


class InterruptCallback(TrainerCallback):
    """Stops training right after the checkpoint at `step`, as a preempted job would (used to test resume)."""

    def __init__(self, step: int):
        self.stop_step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.stop_step:
            control.should_save = True
            control.should_training_stop = True


class PerRankSeedCallback(TrainerCallback):
    """Each rank its own random draws (dropout masks, wav2vec2's SpecAugment and LayerDrop): the Trainer seeds every
    rank with args.seed, so under DDP all GPUs drew the same masks for the same batch positions, a noise one GPU
    does not have. Reseeded by common.runs.rank_seed, as ViT's loop; one process: unchanged. On resume the Trainer
    then restores each rank's saved states. `applies()`: whether the training order has a generator of its own (Accelerate's seedable
    sampler, HF's batch_rebalance, ours), so that it stays the same on every rank; HF's length-grouped sampler
    draws it from the global random state, which the ranks must then share."""

    def __init__(self, applies):
        self.applies = applies

    def on_train_begin(self, args, state, control, **kwargs):
        if args.world_size <= 1:
            return
        if self.applies():
            from transformers import set_seed
            set_seed(rank_seed(args.seed, args.process_index))
        elif args.process_index == 0:
            print(f"[common.hf] train_sampling_strategy {args.train_sampling_strategy}: the Trainer's sampler draws "
                  "the data order from the global random state, so every rank keeps the same seed (and the same "
                  "dropout masks for the same batch positions)", flush=True)


def stage_callbacks(cfg: dict) -> list[TrainerCallback]:
    """The callbacks of every HF stage: the config's dropout schedule, and the test-only interruption."""
    drop = cfg.get("dropout") or {}
    callbacks = [ScheduledDropoutCallback(drop.get("schedule", "constant"), drop.get("end_p", 0.0),
                                          step_at=drop.get("step_at"))]
    if cfg.get("interrupt_at_step"):
        callbacks.append(InterruptCallback(int(cfg["interrupt_at_step"])))
    return callbacks


class CompressionTrainer(Trainer):
    """Trainer whose loss adds distillation from a frozen teacher when `distiller` is given.

    `kd_mask_fn(model, inputs, outputs)` may return a [B, L] bool mask of valid positions for sequence logits
    (e.g. CTC frames of padded audio): the KL is then averaged per sequence, then over sequences (common.kd_kl)."""

    def __init__(self, *args, distiller: DistillationLoss | None = None, kd_mask_fn=None, **kwargs):
        super().__init__(*args, **kwargs)
        if self.args.data_seed is None:
            # Accelerate seeds its sampler with the global initial seed when data_seed is unset, which the per-rank
            # reseed below changes: a train loader built later (a second train(), auto_find_batch_size) would give
            # each rank another order. The same value, fixed now.
            self.args.data_seed = self.args.seed
        self.distiller = distiller
        self.kd_mask_fn = kd_mask_fn
        self.add_callback(PerRankSeedCallback(self.order_has_own_generator))
        if distiller is not None:
            # The KD mix is a per-micro-batch mean (the student's forward is called without num_items_in_batch). A
            # model whose forward takes **kwargs makes the Trainer take it as normalised over the accumulated batch
            # instead, and skip the division by the accumulation steps: gradients and losses GA times too large.
            # Without KD the model's own loss decides (wav2vec2's CTC trainer sets it for its loss).
            self.model_accepts_loss_kwargs = False

    def order_has_own_generator(self) -> bool:
        """Whether the training order comes from a generator of its own (see PerRankSeedCallback): not with HF's
        length-grouped sampler (the global random state), nor with a dataset that streams in its own order."""
        if isinstance(self.train_dataset, torch.utils.data.IterableDataset):
            return False
        return self.args.train_sampling_strategy != "group_by_length"

    def create_optimizer(self, model=None):
        opt = super().create_optimizer(model)
        # a second train() finds the optimizer wrapped by Accelerate: the hook goes on the torch optimizer inside
        base = getattr(opt, "optimizer", opt)
        if not getattr(base, "_clip_state_hook", False):  # a checkpoint from before the clips were one-element
            base.register_load_state_dict_post_hook(clip_state_as_1d)
            base._clip_state_hook = True
        return opt

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.distiller is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        outputs = model(**inputs)
        task_loss = outputs["loss"]
        self._place_teacher(model)
        teacher_out = self.distiller.teacher_outputs(**inputs)
        mask = self.kd_mask_fn(model, inputs, outputs) if self.kd_mask_fn else None
        loss = self.distiller(task_loss, outputs, teacher_out, mask)
        return (loss, outputs) if return_outputs else loss

    def _place_teacher(self, model) -> None:
        """Keep the teacher on the student's device. Once the Trainer's FSDP2 has sharded the student, shard the
        teacher the same way (its layer classes and mixed precision), else every rank holds a whole copy (choice)."""
        teacher, p = self.distiller.teacher, next(model.parameters())
        if sharding.is_sharded(next(teacher.parameters())):
            return
        if next(teacher.parameters()).device != p.device:  # a DTensor's device is that of its shard
            teacher.to(p.device)
        if not sharding.is_sharded(p):
            return
        plugin = self.accelerator.state.fsdp_plugin
        names = plugin.transformer_cls_names_to_wrap or getattr(teacher, "_no_split_modules", None)
        units = sharding.shard_frozen(teacher, names, plugin.mixed_precision_policy)
        held = sharding.local_fraction(teacher)
        if self.is_world_process_zero():
            print(f"[common.hf] KD teacher sharded with FSDP2 like the student: {units} units, rank 0 holds "
                  f"{100 * held:.1f}% of its parameters", flush=True)


def load_stage_config(path, overrides: list[str] | None, pipeline: str) -> dict:
    """load_config + path placeholders + the `train` keys checked against TrainingArguments' fields, so that a typo
    there stops the stage, and reproduce.py's up-front check, before anything is loaded or written."""
    cfg = expand_paths(load_config(path, overrides), pipeline)
    fields = {f.name for f in dataclasses.fields(TrainingArguments) if f.init}
    check_open_section(cfg, overrides, "train", fields, "the fields of transformers' TrainingArguments")
    check_stage_config(cfg, overrides)
    return cfg


def resume_checkpoint(cfg: dict, out_dir: Path, pipeline: str) -> str | None:
    """resume=true: the run dir's last Trainer checkpoint (checkpoint-<step>), which training continues from, named
    in the output; None without resume or without a checkpoint (training then starts from the beginning, and says
    so, as ViT's loop does)."""
    if not cfg.get("resume", False):
        return None
    from transformers.trainer_utils import get_last_checkpoint
    last = get_last_checkpoint(str(out_dir))
    if is_main_process():
        print(f"[{pipeline}/{cfg.get('stage', '?')}] " +
              (f"resuming from {last}" if last else f"resume=true but {out_dir} holds no checkpoint-<step>: "
                                                     f"starting from the beginning"), flush=True)
    return last


def end_of_run(trainer: Trainer) -> None:
    """Under a multi-process launch: every rank done, then the process group destroyed, before the process exits. A
    gloo rank that tears down while its peer's connection is still open aborts that peer at exit ("terminate called
    without an active exception"; ViT's train.py, without its barrier: 5 of 37 two-process runs). Call it on the
    success path only: a barrier after one rank's error would wait out the timeout."""
    if trainer.args.world_size > 1:
        trainer.accelerator.wait_for_everyone()
        trainer.accelerator.end_training()


def check_model_source(cfg: dict, key: str = "model_name_or_path") -> None:
    """A `key` that names a local folder (absolute, ./, ../ or ~/) must exist: otherwise transformers takes it for
    a hub repo id and fails with an error about the id's form."""
    name = str(cfg.get(key) or "")
    local = name.startswith(("/", "./", "../", "~")) or name.count("/") > 1
    if local and not Path(name).expanduser().exists():
        raise ConfigError(f"{cfg.get('config_file', 'config')}: {key}={name} does not exist (a local checkpoint "
                          f"folder); give an existing folder or a hub name")


def global_batch_of(args: TrainingArguments) -> int:
    """Samples per optimizer step: per-device batch x accumulation x processes."""
    return args.per_device_train_batch_size * args.gradient_accumulation_steps * max(1, args.world_size)


def batch_split(cfg: dict, world: int) -> tuple[int, int]:
    """(per-device batch, accumulation) of a Trainer config on `world` processes. A top-level `global_batch_size`
    is kept on any number of processes (`common.config.split_global_batch`): `train.gradient_accumulation_steps:
    null` derives the accumulation (and lowers a per-device batch larger than a process's share); a given one is
    checked. Without one, the `train` values are taken as they are (accumulation null means 1)."""
    t = cfg["train"]
    per, accum = int(t.get("per_device_train_batch_size", 8)), t.get("gradient_accumulation_steps")
    if cfg.get("global_batch_size"):
        return split_global_batch(int(cfg["global_batch_size"]), per, accum, world,
                                  f"{cfg['config_file']}: global_batch_size")
    return per, int(accum or 1)


def training_arguments(cfg: dict, out_dir) -> TrainingArguments:
    """TrainingArguments from the config's `train` section, with DDP guaranteed under a multi-process launch and
    the batch split by `batch_split`."""
    kw = dict(cfg["train"])
    world = int(os.environ.get("WORLD_SIZE", "1"))
    kw["per_device_train_batch_size"], kw["gradient_accumulation_steps"] = batch_split(cfg, world)
    if world > 1 and not torch.accelerator.is_available():
        # Multi-process launch (torchrun) on a machine without an accelerator: unless use_cpu is set, Accelerate
        # starts the gloo group and shards the batches but leaves distributed_type NO, so the model is not wrapped
        # in DDP and every rank trains alone on its shard (no gradient all-reduce). use_cpu selects MULTI_CPU + DDP.
        kw.setdefault("use_cpu", True)
    if not torch.accelerator.is_available():
        # pinned host memory only speeds copies to an accelerator; without one every DataLoader warns about it
        kw.setdefault("dataloader_pin_memory", False)
    for key in ("eval_strategy", "save_strategy", "logging_strategy"):
        if kw.get(key) is False:  # YAML reads an unquoted `no` (the strategy's name) as false
            kw[key] = "no"
    try:
        args = TrainingArguments(output_dir=str(out_dir), **kw)
    except TypeError as e:
        raise ConfigError(f"{cfg['config_file']}: bad key under 'train' (TrainingArguments): {e}") from None
    if args.world_size > 1 and args.parallel_mode in (ParallelMode.NOT_PARALLEL, ParallelMode.NOT_DISTRIBUTED):
        raise ConfigError(f"{cfg['config_file']}: {args.world_size} processes but no DDP (parallel mode "
                          f"{args.parallel_mode.value}): the ranks would train independently; on CPU set "
                          f"train.use_cpu=true")
    return args
