"""Fake quantization grids and the uniform quantize-dequantize op (shared by weight and activation quantizers).

Weights use a symmetric grid over [-c, c]:
  zero-preserving (paper): 2^b - 1 levels k*c/(2^(b-1)-1), k = -(2^(b-1)-1)..(2^(b-1)-1); 4 bits: k*c/7, exact 0.
  plain (ablation): 2^b levels spread evenly over [-c, c], (k + 1/2)*s, s = 2c/(2^b-1), k = -2^(b-1)..2^(b-1)-1;
  it has no zero level, so a pruned weight comes back as +-s/2 = +-c/15 at 4 bits.
Activations use an asymmetric grid of 2^b levels over [lo, hi]; zero-preserving rounds the zero point to an
integer so that 0.0 (padding, masked positions, pruned inputs) is exactly a level.
"""
from __future__ import annotations

import torch

from . import kernels


def weight_qrange(bits: int, zero_preserving: bool) -> tuple[int, int]:
    half = 2 ** (bits - 1)
    return (-(half - 1), half - 1) if zero_preserving else (-half, half - 1)


def weight_step(clip: torch.Tensor, bits: int, zero_preserving: bool) -> torch.Tensor:
    """Step s of the weight grid for clip c (tensor, per tensor or per channel)."""
    return clip / (2 ** (bits - 1) - 1) if zero_preserving else clip * (2.0 / (2**bits - 1))


def fq(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """(clamp(round(x/scale) + zp, qmin, qmax) - zp) * scale, per tensor (scalar scale) or per row (scale [C, 1]).

    Bit-identical to torch.fake_quantize_per_{tensor,channel}_affine (x * (1/scale), round half to even; the tests
    compare against them). Without autograd it runs `kernels.fake_quant`, one fused pass where compiled (those
    torch kernels measured ~3x slower on CPU and dominated quantized inference); with autograd it calls them for
    their straight-through gradient.
    """
    per_row = not (scale.dim() == 0 or scale.numel() == 1)
    if torch.is_grad_enabled() and x.requires_grad:
        if not per_row:
            return torch.fake_quantize_per_tensor_affine(x, scale.reshape(()).float(), zero_point.reshape(()).int(),
                                                         qmin, qmax)
        return torch.fake_quantize_per_channel_affine(
            x, scale.reshape(-1).float(), zero_point.reshape(-1).int(), 0, qmin, qmax)
    shape = (-1, *([1] * (x.dim() - 1))) if per_row else ()
    s = scale.reshape(shape).float()
    z = zero_point.reshape(shape).float()
    # round(x/s) + z clamped to [qmin, qmax], minus z == round(x/s) clamped to [qmin - z, qmax - z]: exact in
    # float (small integers), and two operations fewer
    return kernels.fake_quant(x.float(), 1.0 / s, s, qmin - z, qmax - z).to(x.dtype)


def quantize_weight(w: torch.Tensor, step: torch.Tensor, bits: int, zero_preserving: bool) -> torch.Tensor:
    """Fake-quantize weights with a symmetric grid of step `step` (scalar or [C, 1])."""
    qmin, qmax = weight_qrange(bits, zero_preserving)
    zp = torch.zeros_like(step, dtype=torch.int32)
    if zero_preserving:
        return fq(w, step, zp, qmin, qmax)
    half = step * 0.5  # plain grid: integer grid shifted by half a step (no exact zero, by design of the ablation)
    return fq(w - half, step, zp, qmin, qmax) + half


def _grid_codes(x, s, code_lo, code_hi, values: bool):
    """(fake-quantized x or None, its int8 codes) on the grid of step s: one pass, the values only if asked."""
    if not values:
        return None, kernels.quant_codes(x, 1.0 / s, code_lo, code_hi)
    return kernels.fake_quant_codes(x, 1.0 / s, s, code_lo, code_hi)


def quantize_weight_codes(w: torch.Tensor, step: torch.Tensor, bits: int, zero_preserving: bool, values: bool = True):
    """(quantize_weight(w, ...), its int8 codes) in one pass, without autograd: the same float ops, so the same
    values, and dequantize_weight(codes, step) gives them back bit for bit. values=False: (None, the codes)."""
    qmin, qmax = weight_qrange(bits, zero_preserving)
    s = step.reshape((-1, 1) if step.numel() > 1 else ()).float()
    half = s * 0.5
    x = w.float() if zero_preserving else w.float() - half
    wq, codes = _grid_codes(x, s, s.new_tensor(float(qmin)), s.new_tensor(float(qmax)), values)
    if wq is None:
        return None, codes
    return (wq if zero_preserving else wq + half).to(w.dtype), codes


def weight_codes(wq: torch.Tensor, step: torch.Tensor, zero_preserving: bool) -> torch.Tensor:
    """Integer codes k of already fake-quantized weights (inverse of `dequantize_weight`), as int8."""
    if not zero_preserving:
        wq = wq - step * 0.5
    return torch.round(wq / step).to(torch.int8)


def dequantize_weight(codes: torch.Tensor, step: torch.Tensor, zero_preserving: bool) -> torch.Tensor:
    """codes * step (+ step/2 on the plain grid): the same float ops as `quantize_weight`, hence bit-identical."""
    w = codes.to(step.dtype).mul_(step)  # faster here than codes * step, whose promotion copies first
    return w if zero_preserving else w + step * 0.5


def act_qparams(lo: torch.Tensor, hi: torch.Tensor, bits: int, zero_preserving: bool):
    """Scale, zero point and the effective clip range of the activation grid over [lo, hi]."""
    n = 2**bits - 1
    if zero_preserving:  # the range holds 0 (a clip trained past it would otherwise shift the grid, not clip it)
        lo, hi = lo.clamp_max(0), hi.clamp_min(0)
    scale = ((hi - lo) / n).clamp_min(1e-8)
    zp = -lo / scale
    if zero_preserving:
        zp = torch.round(zp).clamp(0, n)
    return scale, zp, -zp * scale, (n - zp) * scale


def quantize_act_codes(x: torch.Tensor, scale, zp, bits: int, values: bool = True):
    """(quantize_act(x, ...) on the zero-preserving grid, its codes minus the zero point as int8), without
    autograd and in one pass: the same float ops as `fq`, so the same values. values=False: (None, the codes)."""
    s, z = scale.reshape(()).float(), zp.reshape(()).float()
    xq, codes = _grid_codes(x.float(), s, 0 - z, 2**bits - 1 - z, values)
    return None if xq is None else xq.to(x.dtype), codes


def quantize_act(x: torch.Tensor, scale, zp, bits: int, zero_preserving: bool) -> torch.Tensor:
    n = 2**bits - 1
    if zero_preserving:
        return fq(x, scale, zp.to(torch.int32), 0, n)
    # plain asymmetric grid: the zero point is not an integer, so 0.0 is generally not a level
    off = zp * scale
    return fq(x + off, scale, torch.zeros((), dtype=torch.int32), 0, n) - off
