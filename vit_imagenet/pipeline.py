"""Pieces shared by vit_imagenet/train.py and vit_imagenet/eval.py: config, distributed set-up, the timm model, the
data (with a resumable, seeded sample order), evaluation and the run-dir outputs.

Resumable data order (for bit-identical resume on CPU): epoch e visits the training set in the permutation that
torch's DistributedSampler draws from `seed + e` (padded and strided by rank exactly as DistributedSampler does), and
every sample's augmentation is drawn from its own RNG seeded by (seed, epoch, index). So the batch at any step is a
pure function of (seed, step): a resumed run starts its sampler at the first sample it has not consumed, with no
need to replay a DataLoader, and the result does not depend on num_workers.
"""
from __future__ import annotations

import copy
import datetime
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from common.config import ConfigError, check_open_section, expand_paths, load_config, load_yaml_config  # noqa: E402
from common.runs import RunError, not_generated  # noqa: E402
from common.stage import check_stage_config  # noqa: E402

PIPELINE = "vit_imagenet"
BASE_CONFIG = Path(__file__).resolve().parent / "configs" / "base.yaml"
# The stage order of the full sequence (each stage reads the run dirs of those before it).
STAGES = ("fp", "sparse", "qat4", "qat4_dense", "abl_no_kd", "abl_const_dropout", "abl_plain_grid",
          "abl_quant_first", "abl_oneshot")
# timm.create_model keyword arguments taken from the `model:` block when not null.
MODEL_KWARGS = ("num_classes", "img_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio",
                "class_token", "global_pool", "drop_rate", "drop_path_rate")


# ------------------------------------------------------------------------------------------------- config ---
def load_stage_config(path, overrides=None) -> dict:
    """load_config + path placeholders ({runs_dir}, {scale}, {stage}) + checks of this pipeline's own values."""
    cfg = expand_paths(load_config(path, overrides), PIPELINE)
    # common.config leaves `train` open (the HF pipelines pass it to TrainingArguments); ours is a closed set
    check_open_section(cfg, overrides, "train", load_yaml_config(BASE_CONFIG)["train"])
    check_stage_config(cfg, overrides)
    src = cfg.get("config_file", str(path))
    t = cfg["train"]
    for key in ("batch_size", "global_batch_size", "grad_accum_steps", "max_steps", "log_every", "eval_every",
                "save_every"):
        v = t.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
            raise ConfigError(f"{src}: 'train.{key}' must be an integer >= 0 or null, got {v!r}")
    if not t.get("batch_size"):
        raise ConfigError(f"{src}: 'train.batch_size' (per device) must be > 0")
    if t.get("optimizer") not in ("sgd", "adamw"):
        raise ConfigError(f"{src}: 'train.optimizer' must be sgd or adamw, got {t.get('optimizer')!r}")
    if t.get("amp") not in (None, False, "bf16", "fp16"):
        raise ConfigError(f"{src}: 'train.amp' must be false, bf16 or fp16, got {t.get('amp')!r}")
    if cfg["data"].get("source") not in ("imagefolder", "hf"):
        raise ConfigError(f"{src}: 'data.source' must be imagefolder or hf, got {cfg['data'].get('source')!r}")
    if cfg["data"].get("preset") not in (None, "mini_digits"):
        raise ConfigError(f"{src}: 'data.preset' must be null or mini_digits, got {cfg['data'].get('preset')!r}")
    return cfg


# -------------------------------------------------------------------------------------------- distributed ---
class Dist:
    """torchrun environment (WORLD_SIZE/RANK/LOCAL_RANK); a single process when WORLD_SIZE is unset or 1."""

    def __init__(self, device: str = "auto"):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        use_cuda = torch.cuda.is_available() if device in (None, "auto") else str(device).startswith("cuda")
        if use_cuda:
            torch.cuda.set_device(self.local_rank)
            self.device = torch.device("cuda", self.local_rank)
        else:
            self.device = torch.device("cpu")
        self.owns_group = False
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=60))
            self.owns_group = True

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self):
        if self.world > 1:
            dist.barrier()

    def all_sum(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def gather_objects(self, obj) -> list:
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast_module(self, module: nn.Module) -> None:
        """Every parameter and buffer (masks, clips) from rank 0, in place (bool tensors travel as uint8)."""
        if self.world == 1:
            return
        for t in module.state_dict().values():
            dist.broadcast(t.view(torch.uint8) if t.dtype == torch.bool else t, src=0)

    def close(self):
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def log(msg: str, d: Dist | None = None, file: Path | None = None) -> None:
    if d is not None and not d.main:
        return
    line = f"[{time.strftime('%H:%M:%S')} {PIPELINE}] {msg}"
    print(line, flush=True)
    if file is not None:
        with open(file, "a") as f:
            f.write(line + "\n")


# ------------------------------------------------------------------------------------------------- model ---
def create_model(cfg: dict, init_weights: bool = True) -> nn.Module:
    """timm.create_model from the `model:` block; `dropout.p` (when set) is timm's proj_drop_rate and
    attn_drop_rate (the dropout after the attention/MLP projections and on the attention probabilities).
    init_weights=False: the caller loads the weights (a run's, a teacher's, a resumed checkpoint's) or needs none, so
    neither the pretrained weights nor model.checkpoint_path are read (they need not exist any more)."""
    import timm
    m = cfg["model"]
    kw = {k: (tuple(m[k]) if isinstance(m[k], list) else m[k]) for k in MODEL_KWARGS if m.get(k) is not None}
    p = (cfg.get("dropout") or {}).get("p")
    if p is not None:
        kw["proj_drop_rate"] = kw["attn_drop_rate"] = float(p)
    pretrained = bool(m.get("pretrained")) and init_weights
    if pretrained and m.get("pretrained_cfg_overlay"):
        kw["pretrained_cfg_overlay"] = dict(m["pretrained_cfg_overlay"])
    if init_weights and m.get("checkpoint_path"):
        if not Path(m["checkpoint_path"]).is_file():  # timm raises a bare FileNotFoundError()
            raise RunError(f"{cfg.get('config_file')}: model.checkpoint_path {m['checkpoint_path']} is not a file")
        kw["checkpoint_path"] = m["checkpoint_path"]
    try:
        return timm.create_model(m["name"], pretrained=pretrained, **kw)
    except Exception as e:
        if pretrained and not m.get("pretrained_cfg_overlay"):
            raise RunError(
                f"{cfg.get('config_file')}: could not load the pretrained weights of {m['name']!r} "
                f"({type(e).__name__}: {e}). Offline? Download them once (they go to the Hugging Face cache), or "
                f"set model.pretrained_cfg_overlay.file=/path/to/model.safetensors (a local copy), or "
                f"model.checkpoint_path at a timm checkpoint") from e
        raise


# -------------------------------------------------------------------------------------------------- data ---
class CachedLoader:
    """ImageFolder loader that keeps decoded images in memory (mini scale: 1,797 tiny PNGs, decoded once)."""

    def __init__(self, loader):
        self.loader, self.cache = loader, {}

    def __call__(self, path):
        img = self.cache.get(path)
        if img is None:
            img = self.cache[path] = self.loader(path)
        return img.copy()


class SeededAugment(Dataset):
    """Item `(index, seed)`: the wrapped sample, its random augmentation drawn with python/numpy/torch RNGs seeded
    by `seed` (the caller's RNG states are restored afterwards). A plain index is passed through."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, item):
        if not isinstance(item, tuple):
            return self.ds[item]
        idx, seed = item
        py, npy, cpu = random.getstate(), np.random.get_state(), torch.get_rng_state()
        try:
            random.seed(seed)
            np.random.seed(seed % 2**32)
            torch.default_generator.manual_seed(seed)  # CPU only: CUDA generators are left alone
            return self.ds[idx]
        finally:
            random.setstate(py)
            np.random.set_state(npy)
            torch.set_rng_state(cpu)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    return ((int(seed) * 1_000_003 + int(epoch)) * 100_000_007 + int(index)) % (2**63 - 1)


class ResumableSampler(DistributedSampler):
    """DistributedSampler (same permutation, padding and rank striding) that starts at sample `start` of this
    rank's share of the epoch and yields `(index, augmentation seed)` for SeededAugment."""

    def __init__(self, dataset, num_replicas: int, rank: int, seed: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=False)
        self.start = 0

    def set_position(self, epoch: int, start: int) -> None:
        self.set_epoch(epoch)
        self.start = start

    def __iter__(self):
        for i in list(super().__iter__())[self.start:]:
            yield (i, sample_seed(self.seed, self.epoch, i))

    def __len__(self):
        return self.num_samples - self.start


def subset(ds, n, seed):
    """A fixed random subset of n items (sorted), or ds itself when n is null or >= len(ds)."""
    if not n or n >= len(ds):
        return ds
    g = torch.Generator().manual_seed(int(seed))
    return Subset(ds, sorted(torch.randperm(len(ds), generator=g)[:n].tolist()))


def sample_paths(ds, root: str | None) -> list[str]:
    """Per-item file paths (relative to the data dir) of an ImageFolder (or a Subset of one)."""
    idx = None
    while isinstance(ds, Subset):
        idx = [ds.indices[i] for i in (idx if idx is not None else range(len(ds)))]
        ds = ds.dataset
    samples = getattr(ds, "samples", None)
    if samples is None:
        n = len(ds)
        return [f"item_{i}" for i in (idx if idx is not None else range(n))]
    paths = [samples[i][0] for i in (idx if idx is not None else range(len(samples)))]
    return [os.path.relpath(p, root) if root else p for p in paths]


def transform_kwargs(cfg: dict, is_training: bool) -> dict:
    """Options for timm.data.create_transform: the preset (MINI_DIGITS_TRANSFORM_KWARGS for the digits), then the
    non-null `data.augment` entries (training) and `data.crop_pct`. Colour jitter only when asked for (timm's own
    default is 0.4; the ViT fine-tuning recipe uses crop + flip only)."""
    from vit_imagenet.data import MINI_DIGITS_TRANSFORM_KWARGS
    d = cfg["data"]
    kw = dict(MINI_DIGITS_TRANSFORM_KWARGS) if d.get("preset") == "mini_digits" else {}
    if d.get("crop_pct") is not None:
        kw["crop_pct"] = float(d["crop_pct"])
    if is_training:
        for k, v in (d.get("augment") or {}).items():
            if v is not None:
                kw[k] = tuple(v) if isinstance(v, list) else v
        kw.setdefault("color_jitter", None)
    return kw


def ensure_mini_data(cfg: dict, d: Dist) -> None:
    data = cfg["data"]
    if not data.get("make_mini_digits"):
        return
    if d.main:
        from vit_imagenet.make_mini_digits import make_mini_digits
        try:
            s = make_mini_digits(data["data_dir"], seed=int(data.get("mini_digits_seed", 0)))
        except FileExistsError:  # a user's own tree: kept
            raise not_generated([data["data_dir"]], "data.make_mini_digits=false") from None
        if not s["skipped"]:
            log(f"wrote the mini digits tree to {data['data_dir']} ({s['n_train']} train / {s['n_val']} val)")
    d.barrier()


def build_data(cfg: dict, model: nn.Module, d: Dist, need_train: bool = True):
    """-> dict(train (SeededAugment or None), calib (train images, eval transform), val, classes, root)."""
    from vit_imagenet.data import build_datasets, build_transforms, load_hf_imagenet
    data = cfg["data"]
    ensure_mini_data(cfg, d)
    train_tf = build_transforms(model, True, **transform_kwargs(cfg, True))
    eval_tf = build_transforms(model, False, **transform_kwargs(cfg, False))
    if data["source"] == "hf":
        train_ds = load_hf_imagenet(data["train_split"], data.get("hf_cache_dir"), train_tf) if need_train else None
        calib_ds = copy.copy(train_ds) if need_train else None
        if calib_ds is not None:
            calib_ds.transform = eval_tf
        val_ds = load_hf_imagenet(data["val_split"], data.get("hf_cache_dir"), eval_tf)
        classes = val_ds.class_names or [str(i) for i in range(cfg["model"]["num_classes"])]
        root = None
    else:
        train_ds, val_ds, classes = build_datasets(data["data_dir"], train_tf, eval_tf, data["train_split"],
                                                   data["val_split"])
        if data.get("cache_images"):
            train_ds.loader = val_ds.loader = CachedLoader(train_ds.loader)
        calib_ds = copy.copy(train_ds)
        calib_ds.transform = eval_tf
        root = data["data_dir"]
    n_cls = cfg["model"].get("num_classes")
    if n_cls is not None and len(classes) != n_cls:
        raise ConfigError(f"{cfg.get('config_file')}: model.num_classes is {n_cls} but {data['data_dir']} has "
                          f"{len(classes)} classes")
    seed = int(cfg["train"]["seed"])
    if data.get("tune_holdout"):  # tuning: evaluate on held-out training images; the val split is not touched
        n_hold = int(data["tune_holdout"])
        perm = torch.randperm(len(train_ds), generator=torch.Generator().manual_seed(seed + 4)).tolist()
        hold_ds = copy.copy(train_ds)
        hold_ds.transform = eval_tf
        val_ds = Subset(hold_ds, sorted(perm[:n_hold]))
        train_ds, calib_ds = Subset(train_ds, sorted(perm[n_hold:])), Subset(calib_ds, sorted(perm[n_hold:]))
    out = {"classes": classes, "root": root, "val": subset(val_ds, data.get("val_subset"), seed + 2)}
    if need_train:
        train_ds = subset(train_ds, data.get("train_subset"), seed + 1)
        calib_ds = subset(calib_ds, data.get("train_subset"), seed + 1)
        out["train"], out["calib"] = SeededAugment(train_ds), calib_ds
    return out


def loader_kwargs(cfg: dict, d: Dist) -> dict:
    data = cfg["data"]
    nw = int(data.get("num_workers") or 0)
    # an explicit generator: DataLoader otherwise draws its base seed from the global RNG (that of dropout)
    return dict(num_workers=nw, pin_memory=bool(data.get("pin_memory")) and d.device.type == "cuda",
                generator=torch.Generator().manual_seed(0), persistent_workers=False)


def calibration_batches(cfg: dict, calib_ds, d: Dist, bs: int, micro: int):
    """The first `compression.calib_batches` global batches (`bs` images) of a fixed permutation of the training
    images (eval transform), the same on every rank, as image tensors on the device. Loaded `micro` images at a
    time (the per-device batch), so the loader's workers hold no more than in training."""
    g = torch.Generator().manual_seed(int(cfg["train"]["seed"]))
    order = torch.randperm(len(calib_ds), generator=g).tolist()
    n = int((cfg.get("compression") or {}).get("calib_batches", 32))
    loader = DataLoader(Subset(calib_ds, order[: n * bs]), batch_size=micro, shuffle=False, **loader_kwargs(cfg, d))
    parts = []
    for x, _ in loader:
        parts.append(to_device(x, cfg, d))
        if sum(len(p) for p in parts) >= bs:
            yield torch.cat(parts)
            parts = []
    if parts:
        yield torch.cat(parts)


def to_device(x: torch.Tensor, cfg: dict, d: Dist) -> torch.Tensor:
    x = x.to(d.device, non_blocking=True)
    if channels_last(cfg, d):
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def channels_last(cfg: dict, d: Dist) -> bool:
    """channels-last helps the patch-embedding convolution on GPUs; on CPU it only costs a copy."""
    return bool(cfg["train"].get("channels_last")) and d.device.type == "cuda"


def autocast(cfg: dict, d: Dist):
    amp = cfg["train"].get("amp")
    if not amp or d.device.type != "cuda":
        return torch.autocast(d.device.type, enabled=False)
    return torch.autocast("cuda", dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


# -------------------------------------------------------------------------------------------- evaluation ---
@torch.no_grad()
def evaluate(model: nn.Module, ds, cfg: dict, d: Dist, predictions: bool = False) -> dict:
    """Top-1/top-5 (and mean cross-entropy) over `ds`, sharded over ranks without padding (every image counted
    once). With `predictions`, also {"pred_index", "pred_top5", "pred_label"} for predictions.csv (rank 0)."""
    from vit_imagenet.metrics import topk_correct, topk_indices
    was = model.training
    model.eval()
    mine = list(range(d.rank, len(ds), d.world))
    bs = int(cfg["data"].get("eval_batch_size") or cfg["train"]["batch_size"])
    loader = DataLoader(Subset(ds, mine), batch_size=bs, shuffle=False, **loader_kwargs(cfg, d))
    c1 = c5 = loss = 0.0
    rows = []
    pos = 0
    for x, y in loader:
        with autocast(cfg, d):
            logits = model(to_device(x, cfg, d)).float()
        y = y.to(logits.device)
        c = topk_correct(logits, y, (1, 5))
        c1, c5 = c1 + c["top1"], c5 + c["top5"]
        loss += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
        if predictions:
            top = topk_indices(logits, 5).cpu()
            for j in range(len(y)):
                rows.append((mine[pos + j], top[j].tolist(), int(y[j])))
        pos += len(y)
    n = len(ds)
    c1, c5, loss = d.all_sum([c1, c5, loss])
    model.train(was)
    out = {"top1": 100.0 * c1 / n, "top5": 100.0 * c5 / n, "loss": loss / n, "samples": n}
    if predictions:
        allrows = sorted(r for part in d.gather_objects(rows) for r in part)
        out["pred_index"] = [r[0] for r in allrows]
        out["pred_top5"] = [r[1] for r in allrows]
        out["pred_label"] = [r[2] for r in allrows]
    return out


def write_predictions(path: Path, result: dict, data: dict) -> None:
    from vit_imagenet.metrics import write_predictions_csv
    paths = sample_paths(data["val"], data["root"])
    write_predictions_csv(path, [paths[i] for i in result["pred_index"]], result["pred_label"],
                          result["pred_top5"], data["classes"])


def model_label(cfg: dict) -> str:
    """The timm name, plus the architecture sizes when the config changes them (mini scale)."""
    m = cfg["model"]
    sizes = [f"{k} {m[k]}" for k in ("img_size", "patch_size", "embed_dim", "depth", "num_heads") if m.get(k)]
    return f"{m['name']} ({', '.join(sizes)})" if sizes else str(m["name"])


def init_source(cfg: dict) -> str:
    """Where a stage's starting weights come from (the log, metrics.json's init_from)."""
    m = cfg["model"]
    if cfg.get("init_from"):
        return str(cfg["init_from"])
    if m.get("checkpoint_path"):  # loaded by timm.create_model after creation, pretrained or not
        return f"checkpoint {m['checkpoint_path']}"
    if m.get("pretrained"):
        file = (m.get("pretrained_cfg_overlay") or {}).get("file")
        return f"timm pretrained {m['name']}" + (f" from {file}" if file else "")
    return "random (from scratch)"


def stage_cfg_for_metrics(cfg: dict) -> dict:
    """stage_metrics reads the model name from `model_name_or_path`; ours is model.name (+ sizes)."""
    return {**cfg, "model_name_or_path": model_label(cfg), "init_from": init_source(cfg)}


def fmt_duration(s: float) -> str:
    s = int(max(s, 0))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def cosine_lambda(total: int, warmup: int, min_ratio: float):
    """LR factor after `s` completed optimizer steps: linear warm-up to 1 over `warmup` steps, then cosine to
    `min_ratio` at `total`."""
    def f(s: int) -> float:
        if warmup and s < warmup:
            return (s + 1) / warmup
        t = (s - warmup) / max(1, total - warmup)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
    return f
