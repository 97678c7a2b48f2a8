"""Top-k accuracy and per-image prediction CSVs."""
import csv
import os

import torch


def topk_correct(logits, targets, ks=(1, 5)):
    """Number of samples whose target is in the top-k, for each k: ``{"top1": n, "top5": n}``.

    Ties policy (pessimistic): the target is in the top-k only if fewer than k *other* classes have a
    logit >= the target's, so a collapsed model with constant logits scores 0, not 1/num_classes.
    NaN logits count as -inf.  k is clipped to the number of classes (the key keeps the asked k).
    """
    logits = torch.as_tensor(logits).detach().float()
    targets = torch.as_tensor(targets).detach().long().to(logits.device)
    if logits.ndim != 2 or targets.shape != logits.shape[:1] or logits.shape[0] == 0:
        raise ValueError(f"need logits (N, C) with N > 0 and targets (N,), got {tuple(logits.shape)} "
                         f"and {tuple(targets.shape)}")
    logits = torch.where(torch.isnan(logits), torch.full_like(logits, float("-inf")), logits)
    tgt = logits.gather(1, targets[:, None])
    rank = (logits >= tgt).sum(1) - 1  # other classes at least as high as the target
    n_cls = logits.shape[1]
    return {f"top{k}": int((rank < min(k, n_cls)).sum()) for k in ks}


def topk_accuracy(logits, targets, ks=(1, 5)):
    """Top-k accuracy in percent, e.g. ``{"top1": 81.1, "top5": 95.6}``; see :func:`topk_correct`."""
    n = len(targets)
    return {k: 100.0 * v / n for k, v in topk_correct(logits, targets, ks).items()}


def topk_indices(logits, k=5):
    """(N, min(k, C)) class indices, highest logit first; ties go to the lower class index (stable sort)."""
    logits = torch.as_tensor(logits).detach().float()
    k = min(k, logits.shape[1])
    return torch.sort(logits, dim=1, descending=True, stable=True).indices[:, :k]


def write_predictions_csv(path, image_paths, labels, topk_indices, class_names):
    """Write ``path,label,top1..topK`` (class names; K = columns of ``topk_indices``), one row per image."""
    idx = torch.as_tensor(topk_indices).long().reshape(len(image_paths), -1).tolist() if len(image_paths) else []
    labels = torch.as_tensor(labels).long().tolist()
    if len(labels) != len(image_paths):
        raise ValueError(f"{len(image_paths)} image paths but {len(labels)} labels")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"] + [f"top{j + 1}" for j in range(len(idx[0]) if idx else 0)])
        for p, y, row in zip(image_paths, labels, idx):
            w.writerow([str(p), class_names[y]] + [class_names[c] for c in row])
