"""The integer matmul kernels of the compressed linears vs the float32 matmul, at BERT-base shapes, measured in one
run; prints ratios and what COMMON_INT_MATMUL=auto chooses on this CPU.

    python benchmarks/bench_int_matmul.py [--tokens 768] [--iters 10]

Every side multiplies the same 4-bit operands: int8 codes through `common.int_matmul.int_linear` with each kernel
that runs on this CPU (`int_mm`: torch._int_mm; `onednn`: oneDNN's quantized linear, weight packing included, as
each training step packs it) and their float32 values through `F.linear`, as the compressed linear does in each
mode. Interleaved, so machine load affects all alike; the median of `--iters` timed calls each.
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
    kernels = [k for k in int_matmul.KERNELS if k != "onednn" or int_matmul.onednn_qlinear_usable()]
    mode = int_matmul.int_matmul_mode()
    for k, n in SHAPES:
        k, n = k // args.scale, n // args.scale
        zp = torch.tensor(7.0)  # activation codes with their zero point folded in: k_x in -7..8
        xc = torch.randint(-7, 9, (args.tokens, k), dtype=torch.int8, generator=g)
        wc = torch.randint(-7, 8, (n, k), dtype=torch.int8, generator=g)
        sx, sw = torch.tensor(0.05), torch.tensor(0.01)
        x, w = xc.float() * sx, wc.float() * sw  # the same operands in float32, as the float mode multiplies them

        def kernel_call(name):
            def call():
                int_matmul.set_int_matmul(name)
                try:
                    return int_matmul.int_linear(xc, sx, zp, wc, sw, None)
                finally:
                    int_matmul.set_int_matmul(mode)
            return call
        calls = {"float32": lambda: F.linear(x, w), **{name: kernel_call(name) for name in kernels}}
        times = {name: [] for name in calls}
        for it in range(args.iters + 1):  # the first round warms up
            for name, f in calls.items():
                t0 = time.perf_counter()
                f()
                if it:
                    times[name].append(time.perf_counter() - t0)
        med = {name: statistics.median(v) for name, v in times.items()}
        row = {"shape": f"{args.tokens}x{k} @ {k}x{n}", "float32_ms": 1e3 * med["float32"]}
        for name in kernels:
            row[f"{name}_ms"] = 1e3 * med[name]
            row[f"{name}_over_float32"] = med[name] / med["float32"]
        rows.append(row)
        print(f"{row['shape']:>22}: float32 {row['float32_ms']:8.2f} ms" + "".join(
            f", {name} {row[f'{name}_ms']:8.2f} ms ({name} / float32 = {row[f'{name}_over_float32']:.2f}x)"
            for name in kernels))
    return rows


if __name__ == "__main__":
    main()
