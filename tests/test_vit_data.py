"""Data and metric pieces of vit_imagenet: ImageFolder validation, mini digits, top-k, prediction CSVs."""
import csv
import filecmp
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from vit_imagenet.data import (ImageLoadError, MINI_DIGITS_TRANSFORM_KWARGS, build_datasets,
                               build_transforms, make_loader)
from vit_imagenet.make_mini_digits import make_mini_digits
from vit_imagenet.metrics import topk_accuracy, topk_correct, topk_indices, write_predictions_csv

TO_TENSOR = T.Compose([T.Resize((8, 8)), T.ToTensor()])


def _img(path, color, mode="RGB", size=(10, 12)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new(mode, size, color).save(path)


@pytest.fixture
def tiny_tree(tmp_path):
    """2 wnid classes per split, mixed extensions/case and a grayscale image."""
    for split in ("train", "val"):
        _img(tmp_path / split / "n0001" / "a.JPEG", (255, 0, 0))
        _img(tmp_path / split / "n0001" / "b.png", 128, mode="L")
        _img(tmp_path / split / "n0002" / "c.jpg", (0, 0, 255))
    return tmp_path


def test_imagefolder_reads_tree(tiny_tree):
    tr, va, names = build_datasets(tiny_tree, TO_TENSOR, TO_TENSOR)
    assert names == ["n0001", "n0002"] and len(tr) == 3 and len(va) == 3
    x, y = tr[0]
    assert x.shape == (3, 8, 8) and y == 0
    assert tr[1][0].shape == (3, 8, 8)  # grayscale PNG came back as RGB
    assert tr[2][1] == 1 and tr.class_to_idx == va.class_to_idx


def test_missing_dirs_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        build_datasets(tmp_path / "nowhere", None, None)
    _img(tmp_path / "train" / "n0001" / "a.png", (1, 2, 3))
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "val")):
        build_datasets(tmp_path, None, None)


@pytest.mark.parametrize("lose", ["val", "train"])
def test_class_missing_from_one_split(tiny_tree, lose):
    import shutil
    shutil.rmtree(tiny_tree / lose / "n0002")
    other = "train" if lose == "val" else "val"
    with pytest.raises(ValueError, match=rf"n0002.*{other}.*missing from .*{lose}"):
        build_datasets(tiny_tree, None, None)


def test_empty_class_folder(tiny_tree):
    os.makedirs(tiny_tree / "val" / "n0003")
    (tiny_tree / "val" / "n0003" / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match=r"no image files.*n0003"):
        build_datasets(tiny_tree, None, None)


def test_corrupt_image_names_file(tiny_tree):
    bad = tiny_tree / "val" / "n0002" / "broken.JPEG"
    bad.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    _, va, _ = build_datasets(tiny_tree, TO_TENSOR, TO_TENSOR)  # listing is fine; loading fails
    i = [p for p, _ in va.samples].index(str(bad))
    with pytest.raises(ImageLoadError, match="broken.JPEG"):
        va[i]
    with pytest.raises(ImageLoadError, match="broken.JPEG"):
        list(make_loader(va, batch_size=4))


def test_topk_hand_computed():
    logits = torch.tensor([[0.1, 0.5, 0.2, 0.9, 0.0, 0.3],   # target 3: rank 0 -> top1, top5
                           [0.9, 0.8, 0.7, 0.6, 0.5, 0.4],   # target 5: rank 5 -> neither
                           [0.9, 0.8, 0.7, 0.6, 0.5, 0.4],   # target 4: rank 4 -> top5 only
                           [0.5, 0.5, 0.1, 0.1, 0.1, 0.1]])  # target 0 tied with class 1 -> top5 only
    targets = torch.tensor([3, 5, 4, 0])
    assert topk_correct(logits, targets) == {"top1": 1, "top5": 3}
    assert topk_accuracy(logits, targets) == {"top1": 25.0, "top5": 75.0}
    # Ties are pessimistic: constant logits score 0 until k covers every class.
    flat = torch.zeros(4, 10)
    assert topk_accuracy(flat, torch.arange(4), ks=(1, 5, 10)) == {"top1": 0.0, "top5": 0.0, "top10": 100.0}
    # k clipped to the number of classes; NaN logit is never a hit below that.
    three = torch.tensor([[1.0, 2.0, 3.0], [float("nan"), 0.0, 1.0]])
    assert topk_accuracy(three, [0, 0], ks=(1, 2, 5)) == {"top1": 0.0, "top2": 0.0, "top5": 100.0}
    # topk_indices breaks ties by lower index, matching argmax.
    assert topk_indices(logits, 3)[3].tolist() == [0, 1, 2]
    assert topk_indices(three, 5).shape == (2, 3)


def test_predictions_csv_round_trip(tmp_path):
    names = ["cat", "dog", "eel"]
    logits = torch.tensor([[0.1, 0.7, 0.2], [3.0, 1.0, 2.0]])
    path = tmp_path / "out" / "preds.csv"
    write_predictions_csv(path, ["a/x.png", "b/y,z.png"], torch.tensor([1, 2]), topk_indices(logits, 5), names)
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows == [{"path": "a/x.png", "label": "dog", "top1": "dog", "top2": "eel", "top3": "cat"},
                    {"path": "b/y,z.png", "label": "eel", "top1": "cat", "top2": "eel", "top3": "dog"}]


@pytest.fixture(scope="module")
def digits_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("mini_digits")
    summary = make_mini_digits(root, seed=0, val_fraction=0.2, size=32)
    assert not summary["skipped"]
    return root


def _tree(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def test_mini_digits_counts(digits_root):
    from sklearn.datasets import load_digits
    per_class = np.bincount(load_digits().target)  # 1,797 images
    n = {s: {c: len(os.listdir(digits_root / s / f"digit_{c}")) for c in range(10)} for s in ("train", "val")}
    assert sum(n["val"].values()) == 360 and sum(n["train"].values()) == 1437  # ceil(0.2 * 1797) held out
    for c in range(10):
        assert n["train"][c] + n["val"][c] == per_class[c]
        assert abs(n["val"][c] - 0.2 * per_class[c]) <= 1  # stratified
    train_ids = {f for c in range(10) for f in os.listdir(digits_root / "train" / f"digit_{c}")}
    val_ids = {f for c in range(10) for f in os.listdir(digits_root / "val" / f"digit_{c}")}
    assert not train_ids & val_ids
    im = Image.open(digits_root / "val" / "digit_3" / sorted(os.listdir(digits_root / "val" / "digit_3"))[0])
    a = np.asarray(im)
    assert im.mode == "L" and a.shape == (32, 32)
    assert (a == np.repeat(np.repeat(a[::4, ::4], 4, 0), 4, 1)).all()  # nearest: exact 4x4 blocks
    assert "scikit-learn" in (digits_root / "README.txt").read_text()
    assert json.loads((digits_root / "params.json").read_text())["counts"]["val"]["digit_0"] == n["val"][0]


def test_mini_digits_deterministic_and_skips(digits_root, tmp_path):
    make_mini_digits(tmp_path, seed=0)
    files = _tree(digits_root)
    assert files == _tree(tmp_path)
    match, mismatch, errors = filecmp.cmpfiles(digits_root, tmp_path, files, shallow=False)
    assert not mismatch and not errors
    assert make_mini_digits(tmp_path, seed=0)["skipped"]
    assert not make_mini_digits(tmp_path, seed=1)["skipped"]  # new params -> rebuilt, not mixed
    rebuilt = [f for f in _tree(tmp_path) if f.endswith(".png")]
    assert rebuilt != [f for f in files if f.endswith(".png")]  # a different split ...
    assert len({os.path.basename(f) for f in rebuilt}) == len(rebuilt) == 1797  # ... with no stale leftovers
    assert json.loads((tmp_path / "params.json").read_text())["seed"] == 1


def test_digits_through_timm_transforms_and_loader(digits_root):
    import timm
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4,
                              depth=1, num_classes=10)
    tr_tf = build_transforms(model, True, **MINI_DIGITS_TRANSFORM_KWARGS)
    ev_tf = build_transforms(model, False, **MINI_DIGITS_TRANSFORM_KWARGS)
    tr, va, names = build_datasets(digits_root, tr_tf, ev_tf)
    assert names == [f"digit_{c}" for c in range(10)] and (len(tr), len(va)) == (1437, 360)
    x, _ = va[0]
    assert x.shape == (3, 32, 32)  # model's img_size, not the 224 in its pretrained_cfg
    assert (x == x.reshape(3, 8, 4, 8, 4)[:, :, :1, :, :1].expand(3, 8, 4, 8, 4).reshape(3, 32, 32)).all()
    order = lambda seed: [y.tolist() for _, y in make_loader(tr, 64, shuffle=True, seed=seed)][:3]
    assert order(0) == order(0) != order(1)
    with torch.no_grad():
        assert model(next(iter(make_loader(va, 8)))[0]).shape == (8, 10)


def test_hf_wrapper_on_in_memory_dataset():
    datasets = pytest.importorskip("datasets")
    from vit_imagenet.data import HFImageDataset
    hf = datasets.Dataset.from_dict(
        {"image": [Image.new("L", (5, 7), 9), Image.new("RGB", (5, 7))], "label": [1, 0]},
        features=datasets.Features({"image": datasets.Image(),
                                    "label": datasets.ClassLabel(names=["a", "b"])}))
    ds = HFImageDataset(hf)
    x, y = ds[0]
    assert x.shape == (3, 7, 5) and y == 1 and ds.class_names == ["a", "b"] and len(ds) == 2


def test_init_source_names_the_weights_file():
    """The log and metrics.json's init_from say which file a stage started from."""
    from vit_imagenet.pipeline import init_source
    m = {"name": "vit_tiny_patch16_224", "pretrained": True, "checkpoint_path": None, "pretrained_cfg_overlay": None}
    assert init_source({"model": m}) == "timm pretrained vit_tiny_patch16_224"
    assert init_source({"model": {**m, "pretrained_cfg_overlay": {"file": "/w/vit.safetensors"}}}) == \
        "timm pretrained vit_tiny_patch16_224 from /w/vit.safetensors"
    assert init_source({"model": {**m, "pretrained": False, "checkpoint_path": "/w/vit.pth"}}) == "checkpoint /w/vit.pth"
    assert init_source({"model": {**m, "pretrained": False}}) == "random (from scratch)"
    assert init_source({"model": m, "init_from": "runs/paper/vit_imagenet/sparse"}) == "runs/paper/vit_imagenet/sparse"


def test_the_mini_generator_never_replaces_a_users_image_tree(tmp_path):
    from types import SimpleNamespace

    from common.runs import RunError
    from vit_imagenet.pipeline import ensure_mini_data
    mine = tmp_path / "val" / "n01440764" / "a.JPEG"
    mine.parent.mkdir(parents=True)
    mine.write_bytes(b"mine")
    with pytest.raises(RunError, match=f"{tmp_path}: not made by the mini generator.*data.make_mini_digits=false"):
        ensure_mini_data({"data": {"make_mini_digits": True, "data_dir": str(tmp_path)}},
                         SimpleNamespace(main=True, barrier=lambda: None))
    assert mine.read_bytes() == b"mine"
    # a build of its own interrupted before params.json (its mark is written first): rebuilt, not refused
    built = tmp_path / "built"
    make_mini_digits(built, seed=0)
    (built / "params.json").unlink()
    assert not make_mini_digits(built, seed=0)["skipped"] and (built / "params.json").is_file()
