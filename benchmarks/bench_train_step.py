"""Training-step time (and peak memory) of FP vs compressed recipes, measured in one run; prints ratios.

    python benchmarks/bench_train_step.py --model bert --layers 2 --batch 2 --seq 384
Ratios come from the same process, interleaved, so machine load affects all variants alike.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402

VARIANTS = {
    "fp": None,
    "w4a4": dict(sparsity=None),
    "w4a4_2:4": dict(),
    "w4a4_2:4_kd": dict(),
}


def build(model: str, layers: int):
    if model == "bert":
        from transformers import BertConfig, BertForQuestionAnswering
        cfg = BertConfig(num_hidden_layers=layers, attn_implementation="sdpa")
        return BertForQuestionAnswering(cfg)
    if model == "vit":
        import timm
        return timm.create_model("vit_base_patch16_224", pretrained=False, depth=layers, num_classes=1000)
    raise ValueError(model)


def make_batch(model: str, batch: int, seq: int):
    g = torch.Generator().manual_seed(0)
    if model == "bert":
        return dict(input_ids=torch.randint(1000, 20000, (batch, seq), generator=g),
                    attention_mask=torch.ones(batch, seq, dtype=torch.long),
                    start_positions=torch.randint(0, seq, (batch,), generator=g),
                    end_positions=torch.randint(0, seq, (batch,), generator=g))
    return dict(x=torch.randn(batch, 3, 224, 224, generator=g), y=torch.randint(0, 1000, (batch,), generator=g))


def step_fn(model_kind, model, batch, distiller):
    if model_kind == "bert":
        out = model(**batch)
        loss = out.loss
        if distiller is not None:
            t = distiller.teacher_outputs(**{k: v for k, v in batch.items() if "positions" not in k})
            loss = distiller(loss, out, t)
    else:
        logits = model(batch["x"])
        loss = torch.nn.functional.cross_entropy(logits, batch["y"])
        if distiller is not None:
            loss = distiller(loss, logits, distiller.teacher_outputs(batch["x"]))
    loss.backward()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["bert", "vit"], default="bert")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=384)
    ap.add_argument("--iters", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--json", type=str, default=None, help="append the result as one JSON line to this file")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    base = build(args.model, args.layers)
    batch = make_batch(args.model, args.batch, args.seq)
    models, distillers = {}, {}
    for name, kw in VARIANTS.items():
        m = copy.deepcopy(base).train()
        if kw is not None:
            common.prepare(m, common.Recipe(**kw))
            calib = {k: v for k, v in batch.items() if "positions" not in k and k != "y"}
            common.calibrate(m, [calib if args.model == "bert" else calib["x"]])
            m.train()
        models[name] = m
        distillers[name] = common.DistillationLoss(copy.deepcopy(base)) if name.endswith("_kd") else None
    times = {n: [] for n in models}
    for it in range(args.warmup + args.iters):  # interleaved: each round times every variant once
        for n, m in models.items():
            m.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            step_fn(args.model, m, batch, distillers[n])
            if it >= args.warmup:
                times[n].append(time.perf_counter() - t0)
    med = {n: statistics.median(v) for n, v in times.items()}
    res = {"model": args.model, "layers": args.layers, "batch": args.batch, "seq": args.seq,
           "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
           "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "step_s": {n: round(v, 4) for n, v in med.items()},
           "ratio_vs_fp": {n: round(v / med["fp"], 3) for n, v in med.items()}}
    print(json.dumps(res, indent=1))
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(res) + "\n")
    return res


if __name__ == "__main__":
    main()
