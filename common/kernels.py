"""The quantizers' elementwise passes as fused kernels: torch.compile'd where it works, eager otherwise.

Why (issue 9): as chains of torch ops the fake-quantize forward is four passes over its input and the STE
backward nine (compares, masked copy, two masked sums); on CPU these passes, not the matmuls, made the QAT step
~1.25x the FP step. Compiled, each becomes one read-and-write pass (measured 3x faster forward, 13x backward on
BERT-base attention probabilities). The eager functions below are the specification; the compiled ones compute
the same (pointwise results bit-identical, tests compare them; sums may differ in the last bit, as any change of
reduction order does).

COMMON_COMPILE=auto (default) compiles on first use for tensors of at least AUTO_MIN_NUMEL elements and falls
back to eager, with one warning, where compiling fails (no C++ compiler for the CPU backend, no Triton on a GPU);
=1 compiles for every size and lets errors surface; =0 never compiles. `set_compile` does the same from Python.
Compiling costs ~25 s in a process's first call when inductor's on-disk cache is cold, ~5 s when warm.
"""
from __future__ import annotations

import os
import warnings

import torch

_MODES = ("auto", "0", "1")
_mode = "auto"


def parse_mode(mode: str | bool, modes: tuple[str, ...], true: str, what: str) -> str:
    """A switch's mode from a bool (True -> `true`, False -> '0') or a string, which must be one of `modes`."""
    mode = (true if mode else "0") if isinstance(mode, bool) else str(mode).strip().lower()
    if mode not in modes:
        raise ValueError(f"{what} mode {mode!r}: expected one of {modes} or a bool")
    return mode


def mode_from_env(var: str, setter) -> None:
    """setter(the environment variable `var`, default 'auto'), its error naming the variable."""
    try:
        setter(os.environ.get(var, "auto"))
    except ValueError as e:
        raise ValueError(f"{var}: {e}") from None


def set_compile(mode: str | bool) -> None:
    """'auto' / True ('1') / False ('0'): whether the kernels below are compiled (see the module docstring)."""
    global _mode
    _mode = parse_mode(mode, _MODES, "1", "compile")


mode_from_env("COMMON_COMPILE", set_compile)


def compile_mode() -> str:
    return _mode


# auto mode leaves smaller tensors eager (choice): there a compiled call's fixed cost (guards, ~50 us) and the
# process's one-off compile (~5 s warm) outweigh the passes it saves, e.g. for the tiny mini-scale models
AUTO_MIN_NUMEL = 1 << 16


# Choice: every kernel opens an OpenMP region and the runtime picks the threads. Otherwise inductor decides
# serial or parallel from the size of the tensor it first compiles for and keeps that for all sizes, in the
# process and in its on-disk cache, whose key ignores sizes: one first call on a small tensor (the tests') left
# the weight kernels serial afterwards (measured: fake_quant_codes on a 2304x768 weight 0.59 ms so, 0.33 parallel).
_OPTIONS = {"cpp.dynamic_threads": True}


class _Kernel:
    """A function of tensors, run compiled (dynamic shapes, one graph) or eager according to the mode."""

    def __init__(self, fn):
        self.fn = fn
        self._compiled = None
        self._broken = False
        self.__doc__, self.__name__ = fn.__doc__, fn.__name__

    def __call__(self, *args):
        if _mode == "0" or torch.compiler.is_compiling():
            return self.fn(*args)  # inside a user's torch.compile the eager body is traced and fused anyway
        if _mode == "auto" and (self._broken or args[0].numel() < AUTO_MIN_NUMEL):
            return self.fn(*args)
        if self._compiled is None:
            self._compiled = torch.compile(self.fn, dynamic=True, fullgraph=True, options=_OPTIONS)
        # detached, no-grad calls: the kernels are never differentiated, and dynamo would otherwise guard (and
        # recompile) on requires_grad, the grad mode and the shapes of a view's base tensor
        args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
        try:
            with torch.no_grad():
                return self._compiled(*args)
        except Exception as e:  # noqa: BLE001 -- any compiler failure: fall back, the eager result is the same
            if _mode == "1":
                raise
            self._broken = True
            warnings.warn(f"common.kernels: compiling {self.__name__} failed ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}); running it eagerly. Set COMMON_COMPILE=0 "
                          f"to skip the attempt.", RuntimeWarning, stacklevel=2)
            return self.fn(*args)


class _Flat:
    """Runs kernels on 1-D views in a tensor's memory order, and views results back in its layout.

    Every shape and layout then shares one compiled graph (dynamo would otherwise recompile per rank and stride
    pattern, e.g. for the transposed Q/K/V views of attention), and outputs keep the input's strides, as eager
    pointwise ops do. A tensor that is not a permuted dense block is made contiguous first."""

    def __init__(self, t: torch.Tensor):
        order = list(range(t.dim()))
        # inside a user's torch.compile the kernels' eager bodies are traced, on any layout, and dynamo cannot sort
        # symbolic strides: a plain flattening there
        if not torch.compiler.is_compiling():
            by_stride = sorted(order, key=lambda i: (-t.stride(i), -t.size(i)))
            if t.permute(by_stride).is_contiguous():
                order = by_stride
        self.order = order
        self.shape = [t.shape[i] for i in order]
        self.inverse = sorted(range(t.dim()), key=order.__getitem__)

    def __call__(self, t: torch.Tensor) -> torch.Tensor:  # copies only a tensor laid out otherwise
        return t.permute(self.order).contiguous().view(-1)

    def back(self, y: torch.Tensor) -> torch.Tensor:
        return y.view(self.shape).permute(self.inverse)


def _fake_quant(x, inv_s, s, code_lo, code_hi):
    """clamp(round(x * inv_s), code_lo, code_hi) * s: the integer grid of step s (zero point folded into the bounds)."""
    y = x * inv_s  # in place after the first op: eager (small tensors, fallback) allocates once
    return y.round_().clamp_(code_lo, code_hi).mul_(s)


def _fake_quant_codes(x, inv_s, s, code_lo, code_hi):
    """`_fake_quant`, and the integer codes it puts on the grid, as int8: one pass, two outputs."""
    k = (x * inv_s).round_().clamp_(code_lo, code_hi)
    return k * s, k.to(torch.int8)


def _quant_codes(x, inv_s, code_lo, code_hi):
    """Only the int8 codes of `_fake_quant_codes` (for the integer matmul, which needs no float values)."""
    return (x * inv_s).round_().clamp_(code_lo, code_hi).to(torch.int8)


def _ste_backward(g, x, lo, hi, xq):
    """PACT's straight-through gradients: x inside [lo, hi], lo and hi the sums outside their side; with `xq`
    (PACT+), also the rounding residual sum((xq - x) * gx). (g_lo is computed for one-sided quantizers too and
    dropped: one graph instead of two, and free in the fused kernel.)"""
    above = x > hi
    below = x < lo
    gx = torch.where(above | below, 0, g)
    g_hi = torch.where(above, g, 0).sum()
    g_lo = torch.where(below, g, 0).sum()
    r = ((xq - x) * gx).sum() if xq is not None else None
    return gx, g_lo, g_hi, r


def _mul_(g, m):
    """g *= m in place (the 2:4 mask on a weight gradient). Eager ops first copy a uint8 `m` to g's dtype, a
    weight-sized write; this reads it as it is (on GPUs; on CPUs `mask_` runs ATen in chunks, see there)."""
    g.mul_(m)


def _abs_moments(w, per_row: bool):
    """(sum w^2, sum |w|, max |w|) of a 2-D w in one pass (SAWB's statistics), per row (kept) or over the whole
    tensor. The whole-tensor sums go row by row, then over the rows: inductor sums rows of at most 4096 values
    without the cascade summation it uses for longer reductions, measured 2x faster on BERT/ViT-base weights
    (0.49 against 1.02 ms on 3072x768, AVX2) and at least as accurate (short sums, then their sum)."""
    a = w.abs()
    if not per_row:
        return (a * a).sum(1).sum(), a.sum(1).sum(), a.amax()
    return (a * a).sum(1, keepdim=True), a.sum(1, keepdim=True), a.amax(1, keepdim=True)


_fake_quant_k = _Kernel(_fake_quant)
_fake_quant_codes_k = _Kernel(_fake_quant_codes)
_quant_codes_k = _Kernel(_quant_codes)
_abs_moments_k = _Kernel(_abs_moments)
_mul_k = _Kernel(_mul_)
_ste_backward_k = _Kernel(_ste_backward)


def _on_grid(kernel, x, *grid):
    """Per-tensor grids (one-element tensors) run on a flat view; per-row ones ([C, 1]) on a contiguous x."""
    if grid[0].numel() == 1:
        f = _Flat(x)
        out = kernel(f(x), *(g.reshape(()) for g in grid))
        return tuple(map(f.back, out)) if isinstance(out, tuple) else f.back(out)
    return kernel(x.contiguous(), *grid)


def fake_quant(x: torch.Tensor, inv_s: torch.Tensor, s: torch.Tensor, code_lo: torch.Tensor,
               code_hi: torch.Tensor) -> torch.Tensor:
    """See `_fake_quant`."""
    return _on_grid(_fake_quant_k, x, inv_s, s, code_lo, code_hi)


def fake_quant_codes(x: torch.Tensor, inv_s: torch.Tensor, s: torch.Tensor, code_lo: torch.Tensor,
                     code_hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """See `_fake_quant_codes`."""
    return _on_grid(_fake_quant_codes_k, x, inv_s, s, code_lo, code_hi)


def quant_codes(x: torch.Tensor, inv_s: torch.Tensor, code_lo: torch.Tensor, code_hi: torch.Tensor) -> torch.Tensor:
    """See `_quant_codes`."""
    return _on_grid(_quant_codes_k, x, inv_s, code_lo, code_hi)


# CPU masks go through ATen in chunks of this many elements. Inductor's C++ kernel loads a uint8 operand 8 lanes at
# a time through a partial-vector copy (torch 2.14); a chunk's cast to float, still in cache, and a float multiply
# took the 2:4 masks of a ViT-base training step (2 layers, AVX2) from 18.0 to 12.8 ms (ATen's bool multiply: 29.9),
# with no weight-sized temporary (chunks of 2^16: 16.4 ms)
CPU_MASK_CHUNK = 1 << 19


def mask_(g: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """g *= mask in place, and returns g; `mask` bool (read as uint8) or of g's dtype."""
    m = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
    if not (g.shape == m.shape and g.is_contiguous() and m.is_contiguous()):
        g.mul_(m)
    elif g.device.type == "cpu" and m.dtype != g.dtype and not torch.compiler.is_compiling():
        for gs, ms in zip(g.view(-1).split(CPU_MASK_CHUNK), m.view(-1).split(CPU_MASK_CHUNK)):
            gs.mul_(ms.to(g.dtype))
    else:
        _mul_k(g.view(-1), m.view(-1))
    return g


def ste_backward(g, x, lo, hi, xq=None, want_lo=True):
    """See `_ste_backward`; returns (gx, g_lo or None if not `want_lo`, g_hi, residual sum or None)."""
    f = _Flat(x)
    gx, g_lo, g_hi, r = _ste_backward_k(f(g), f(x), lo.reshape(()), hi.reshape(()), None if xq is None else f(xq))
    return f.back(gx), g_lo if want_lo else None, g_hi, r


def abs_moments(w: torch.Tensor, per_row: bool = False):
    """See `_abs_moments`: over the whole tensor (its rows in memory order), or per row of a 2-D tensor."""
    if not per_row:
        f = _Flat(w)
        return _abs_moments_k(f(w).view(-1, f.shape[-1] if f.shape else 1), False)
    return _abs_moments_k(w.contiguous(), True)


def warm_up(device=None) -> None:
    """Compile the kernels now, on small tensors on `device`, instead of inside the first training step (the flat
    graphs serve every size later). A no-op where the mode does not compile."""
    x = torch.randn(AUTO_MIN_NUMEL, device=device)
    one = torch.ones((), device=device)
    fake_quant(x, one, one, -7 * one, 7 * one)
    fake_quant_codes(x, one, one, -7 * one, 7 * one)
    quant_codes(x, one, -7 * one, 7 * one)
    ste_backward(x, x, -one, one)
    abs_moments(x.view(256, -1))  # rows as weights have them: the graph for rows of at most 4096 values
    mask_(x, x > 0)
