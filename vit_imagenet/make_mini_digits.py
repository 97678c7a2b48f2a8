"""Write scikit-learn's 8x8 handwritten digits to disk as a mini ImageFolder tree.

Mini-scale stand-in for ImageNet: 1,797 real scanned digits (UCI optdigits) that ship
inside the scikit-learn package, so nothing is downloaded.  Layout:

    ROOT/train/digit_<c>/<idx>.png   ROOT/val/digit_<c>/<idx>.png   ROOT/params.json   ROOT/README.txt

<idx> is the sample's index in ``sklearn.datasets.load_digits`` so every file is traceable.

Choice: NEAREST upscaling.  With size=32 each source pixel becomes an exact 4x4 block, so a
patch-4 ViT at img_size 32 sees the original 8x8 grid one pixel per patch, losslessly;
bilinear would blur ink across patch borders and invent values the scanner never produced.

    python -m vit_imagenet.make_mini_digits --out_dir ROOT [--seed 0 --val_fraction 0.2 --size 32] [--force]
"""
import argparse
import json
import os
import shutil
import time

import numpy as np
from PIL import Image

FORMAT_VERSION = 1  # bump when the on-disk format changes so old trees are rebuilt
README = ("Mini-scale data: scikit-learn's load_digits (1,797 real 8x8 handwritten digits, UCI optdigits), "
          "NOT ImageNet. Written by vit_imagenet/make_mini_digits.py; see params.json.\n")


def class_name(c: int) -> str:
    return f"digit_{c}"


def _params(seed, val_fraction, size):
    return {"format_version": FORMAT_VERSION, "source": "sklearn.datasets.load_digits",
            "seed": int(seed), "val_fraction": float(val_fraction), "size": int(size),
            "interpolation": "nearest"}


def make_mini_digits(out_dir, seed=0, val_fraction=0.2, size=32, force=False):
    """Build the tree; returns a summary dict (counts per split, ``skipped``, seconds)."""
    t0 = time.perf_counter()
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    params = _params(seed, val_fraction, size)
    params_path = os.path.join(out_dir, "params.json")
    if os.path.isfile(params_path) and not force:
        with open(params_path) as f:
            old = json.load(f)
        if {k: old.get(k) for k in params} == params:
            return {**old, "skipped": True, "seconds": time.perf_counter() - t0}

    # Only wipe splits we can tell we wrote (common.runs.foreign_outputs) or when told to.
    from common.runs import foreign_outputs, mark_generated
    if not force and foreign_outputs(out_dir, [os.path.join(out_dir, s) for s in ("train", "val")]):
        raise FileExistsError(f"{out_dir} holds a train/ or val/ tree not made by this script; pass --force")
    mark_generated(out_dir, "vit_imagenet/make_mini_digits.py")
    if os.path.isfile(params_path):
        os.remove(params_path)  # removed first so an interrupted rebuild is never mistaken for complete
    for s in ("train", "val"):
        shutil.rmtree(os.path.join(out_dir, s), ignore_errors=True)

    from sklearn.datasets import load_digits  # imported late: ~1.5 s, not needed when skipping
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images, y = digits.images, digits.target  # images: float 0..16, ink high
    idx = np.arange(len(y))
    tr_idx, va_idx = train_test_split(idx, test_size=val_fraction, random_state=seed, stratify=y)
    counts = {}
    for split, split_idx in (("train", tr_idx), ("val", va_idx)):
        per_class = {class_name(c): 0 for c in range(10)}
        for c in range(10):
            os.makedirs(os.path.join(out_dir, split, class_name(c)), exist_ok=True)
        for i in sorted(split_idx.tolist()):
            px = np.round(images[i] * (255.0 / 16.0)).astype(np.uint8)
            img = Image.fromarray(px).resize((size, size), Image.NEAREST)  # uint8 2-D array -> mode "L"
            img.save(os.path.join(out_dir, split, class_name(int(y[i])), f"{i:04d}.png"))
            per_class[class_name(int(y[i]))] += 1
        counts[split] = per_class

    with open(os.path.join(out_dir, "README.txt"), "w") as f:
        f.write(README)
    done = {**params, "counts": counts, "n_train": len(tr_idx), "n_val": len(va_idx)}
    tmp = params_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(done, f, indent=1)
    os.replace(tmp, params_path)  # written last: its presence marks a complete tree
    return {**done, "skipped": False, "seconds": time.perf_counter() - t0}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out_dir", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val_fraction", type=float, default=0.2)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--force", action="store_true")
    a = p.parse_args(argv)
    s = make_mini_digits(a.out_dir, a.seed, a.val_fraction, a.size, a.force)
    state = "already present (params match), skipped" if s["skipped"] else "written"
    print(f"{a.out_dir}: {s['n_train']} train / {s['n_val']} val images {state} in {s['seconds']:.2f}s")


if __name__ == "__main__":
    main()
