"""The integer matmul of the compressed linears vs the float32 one, at BERT-base shapes, measured in one run; prints
ratios and what COMMON_INT_MATMUL=auto chooses on this CPU.

    python benchmarks/bench_int_matmul.py [--tokens 768] [--iters 10]

Both sides multiply the same 4-bit operands: int8 codes through `common.int_matmul.int_linear` (oneDNN's
torch._int_mm, int32 sums, one scale) and their float32 values through `F.linear`, as the compressed linear does
in each mode. Interleaved, so machine load affects both alike; the median of `--iters` timed calls each.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import int_matmul  # noqa: E402
from common.runs import cpu_model  # noqa: E402

# (in, out) of BERT-base's linears: attention projections, FFN up, FFN down
SHAPES = ((768, 768), (768, 3072), (3072, 768))


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=768, help="rows of the input (batch x sequence; 2 x 384 here)")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--scale", type=int, default=1, help="divide the shapes' widths by this (tests: tiny shapes)")
    args = ap.parse_args(argv)
    g = torch.Generator().manual_seed(0)
    print(f"CPU {cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__}; int8 dot-product "
          f"instructions: {', '.join(int_matmul.int8_dot_instructions()) or 'none'}; "
          f"COMMON_INT_MATMUL={int_matmul.describe()}")
    rows = []
    for k, n in SHAPES:
        k, n = k // args.scale, n // args.scale
        xc = torch.randint(-15, 16, (args.tokens, k), dtype=torch.int8, generator=g)
        wc = torch.randint(-7, 8, (n, k), dtype=torch.int8, generator=g)
        sx, sw = torch.tensor(0.05), torch.tensor(0.01)
        x, w = xc.float() * sx, wc.float() * sw  # the same operands in float32, as the float mode multiplies them
        calls = {"int8": lambda: int_matmul.int_linear(xc, sx, wc, sw, None), "float32": lambda: F.linear(x, w)}
        times = {name: [] for name in calls}
        for it in range(args.iters + 1):  # the first round warms up
            for name, f in calls.items():
                t0 = time.perf_counter()
                f()
                if it:
                    times[name].append(time.perf_counter() - t0)
        med = {name: statistics.median(v) for name, v in times.items()}
        row = {"shape": f"{args.tokens}x{k} @ {k}x{n}", "int8_ms": 1e3 * med["int8"],
               "float32_ms": 1e3 * med["float32"], "int8_over_float32": med["int8"] / med["float32"]}
        rows.append(row)
        print(f"{row['shape']:>22}: int8 {row['int8_ms']:8.2f} ms, float32 {row['float32_ms']:8.2f} ms, "
              f"int8 / float32 = {row['int8_over_float32']:.2f}x")
    return rows


if __name__ == "__main__":
    main()
