"""Datasets, transforms and loaders for ViT image classification (ImageNet-1k or the mini digits tree).

Class indices follow torchvision ImageFolder: class folders sorted by name.  For ImageNet the folders are
wnids (n01440764, ...), whose sorted order is the standard 0..999 index order used by timm checkpoints, so
the val split must also be in wnid folders (not the flat ILSVRC2012_val_*.JPEG layout).
"""
import os

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import datasets as tvd
from torchvision import transforms as T

# Digits are 32x32 and not mirror-symmetric: no shrinking eval crop (keeps 4x4 pixel blocks aligned with
# patch-4 tokens), no flips, and a milder random-resized-crop than ImageNet's (0.08, 1).
MINI_DIGITS_TRANSFORM_KWARGS = {"crop_pct": 1.0, "hflip": 0.0, "scale": (0.5, 1.0)}


class ImageLoadError(OSError):
    """An image file could not be opened or decoded; the message names the file."""


def checked_loader(path):
    """ImageFolder loader that names the offending file (PIL's own errors often do not)."""
    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")  # convert() forces the full decode inside the try
    except Exception as e:
        raise ImageLoadError(f"cannot read image file {path}: {type(e).__name__}: {e}") from e


def _split_dir(data_dir, split):
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"data_dir not found: {data_dir}")
    path = os.path.join(data_dir, split)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"split folder not found: {path} (expected {split}/<class>/<image files>)")
    return path


def _image_folder(root, transform):
    # allow_empty=True so that we, not torchvision, report empty classes, with the folder path.
    ds = tvd.ImageFolder(root, transform=transform, loader=checked_loader, allow_empty=True)
    if not ds.classes:
        raise ValueError(f"no class folders in {root}")
    counts = torch.bincount(torch.tensor(ds.targets, dtype=torch.long), minlength=len(ds.classes))
    empty = [c for c, n in zip(ds.classes, counts.tolist()) if n == 0]
    if empty:
        raise ValueError(f"class folder(s) with no image files: "
                         f"{', '.join(os.path.join(root, c) for c in empty[:5])}{' ...' if len(empty) > 5 else ''}")
    return ds


def build_datasets(data_dir, train_transform, eval_transform, train_split="train", val_split="val"):
    """Return ``(train_ds, val_ds, class_names)`` from ``data_dir/{train,val}/<class>/<image>``.

    Both splits must hold exactly the same class folders, so that index i means the same class in both.
    Unreadable images raise :class:`ImageLoadError` (naming the file) when they are loaded.
    """
    train_dir, val_dir = _split_dir(data_dir, train_split), _split_dir(data_dir, val_split)
    train_ds, val_ds = _image_folder(train_dir, train_transform), _image_folder(val_dir, eval_transform)
    for have, have_dir, lack, lack_dir in ((train_ds, train_dir, val_ds, val_dir),
                                           (val_ds, val_dir, train_ds, train_dir)):
        missing = sorted(set(have.classes) - set(lack.classes))
        if missing:
            raise ValueError(f"class folder(s) {missing[:5]}{' ...' if len(missing) > 5 else ''} are in "
                             f"{have_dir} but missing from {lack_dir}")
    return train_ds, val_ds, list(train_ds.classes)


class ToRGB:
    """PIL image -> RGB (grayscale digits, CMYK ImageNet JPEGs); a class, not a lambda, so workers can pickle it."""

    def __call__(self, img):
        return img if img.mode == "RGB" else img.convert("RGB")

    def __repr__(self):
        return "ToRGB()"


def model_data_config(model, data_args=None):
    """timm's data config for ``model`` (mean/std/interpolation/crop_pct), with the model's real input size.

    timm keeps the checkpoint's pretrained_cfg (224x224) even when the model was built with e.g.
    img_size=32, so the size is taken from ``model.patch_embed.img_size`` unless ``data_args`` sets one.
    """
    from timm.data import resolve_model_data_config
    cfg = resolve_model_data_config(model, args=data_args)
    sized = data_args and any(data_args.get(k) is not None for k in ("input_size", "img_size"))
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img_size is not None and not sized:
        hw = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        cfg["input_size"] = (cfg["input_size"][0], *hw)
    return cfg


def build_transforms(model, is_training, data_args=None, **create_kwargs):
    """timm's own ImageNet train/eval transform for ``model`` (timm.data.create_transform), prefixed by ToRGB.

    ``create_kwargs`` override the resolved config or pass create_transform options
    (e.g. ``**MINI_DIGITS_TRANSFORM_KWARGS``, ``auto_augment=...``).
    """
    from timm.data import create_transform
    cfg = {**model_data_config(model, data_args), **create_kwargs}
    tf = create_transform(**cfg, is_training=is_training)
    return T.Compose([ToRGB(), *tf.transforms])


class HFImageDataset(Dataset):
    """Wrap a Hugging Face ``datasets`` split with ``image``/``label`` columns as (tensor, label) items."""

    def __init__(self, hf_ds, transform=None, image_key="image", label_key="label"):
        self.hf_ds, self.image_key, self.label_key = hf_ds, image_key, label_key
        self.transform = transform if transform is not None else T.ToTensor()
        feat = hf_ds.features.get(label_key)
        self.class_names = list(getattr(feat, "names", None) or [])

    def __len__(self):
        return len(self.hf_ds)

    def __getitem__(self, i):
        ex = self.hf_ds[int(i)]
        return self.transform(ToRGB()(ex[self.image_key])), int(ex[self.label_key])


HF_IMAGENET = "ILSVRC/imagenet-1k"  # data.source: hf


def load_hf_imagenet(split, cache_dir=None, transform=None, name=HF_IMAGENET):
    """ImageNet-1k through the ``datasets`` hub builder (gated: needs an accepted licence, a login and
    ~150 GB); a second source when no ImageFolder copy exists.  ``split``: train | val | validation.
    Labels use the standard 0..999 order (same as sorted wnid folders).  Cannot run offline."""
    import datasets
    split = {"val": "validation"}.get(split, split)
    return HFImageDataset(datasets.load_dataset(name, split=split, cache_dir=cache_dir), transform)


def make_loader(ds, batch_size, shuffle=False, num_workers=0, pin_memory=False, seed=0, drop_last=False):
    """DataLoader whose shuffle order and per-worker RNG seeds derive from ``seed``.

    torch seeds ``random``/``torch``/``numpy`` in each worker from the loader's generator, which covers
    timm's augmentations; with num_workers=0 they use the global RNGs, so the caller must seed those.
    Choice: persistent workers (when num_workers > 0) to avoid re-forking each epoch on ImageNet.
    """
    g = torch.Generator()
    g.manual_seed(int(seed))
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
                      pin_memory=pin_memory, drop_last=drop_last, generator=g,
                      persistent_workers=num_workers > 0)
