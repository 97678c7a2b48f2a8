"""Faster dropout on CPU (our choice, speed only; the paper trains on GPUs, where this is not used).

ATen's CPU dropout draws one Bernoulli number per element, serially: ~7 ns an element here, a fifth of the
tiny wav2vec2's training step. Here one 64-bit random word gives four 16-bit lanes, each compared with
round(p·2¹⁶): ~4x less time. The kept fraction is exactly 1 − round(p·2¹⁶)/2¹⁶ in expectation, and the scale
divides by it, so E[dropout(x)] = x as with F.dropout. Seeded by torch's default generator, as F.dropout is.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_LANES = 1 << 16


def fast_dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """F.dropout(x, p, training), with the faster mask on CPU; other devices call F.dropout."""
    thr = round(p * _LANES)
    if not training or thr <= 0 or thr >= _LANES or x.device.type != "cpu" or not x.is_floating_point():
        return F.dropout(x, p, training)
    n = x.numel()
    words = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-(1 << 63), None)  # full 64-bit range
    lanes = words.view(torch.int16)[:n].view(x.shape)  # uniform on [-2^15, 2^15)
    return _KeepScale.apply(x, lanes >= thr - _LANES // 2, _LANES / (_LANES - thr))


class _KeepScale(torch.autograd.Function):
    """x · keep · scale, saving the bool mask for the backward: 1 byte an element (ATen's CPU dropout keeps a
    float mask, 4)."""

    @staticmethod
    def forward(ctx, x, keep, scale):
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return x * keep.to(x.dtype).mul_(scale)  # a float mask: multiplying by a bool tensor is ~4x slower here

    @staticmethod
    def backward(ctx, g):
        (keep,) = ctx.saved_tensors
        return g * keep.to(g.dtype).mul_(ctx.scale), None, None


class FastDropout(nn.Dropout):
    """nn.Dropout whose forward is fast_dropout (same `p`, so ScheduledDropout drives it unchanged)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fast_dropout(x, self.p, self.training)


def use_fast_dropout(model: nn.Module) -> int:
    """In place, for training on CPU: every nn.Dropout becomes a FastDropout, and a transformers model runs the
    explicit "compressed" attention path and a timm Attention its explicit subclass (their probability dropout is
    fast_dropout; with no quantizers on the module it is plain attention), where SDPA would draw the dropout mask
    with ATen's serial Bernoulli.
    Returns the number of dropout modules swapped. Call it only when training on CPU: on a GPU the fused kernels
    are faster."""
    from .attention import is_timm_attention, timm_compressed_attention, use_hf_compressed_attention
    from .prepare import _set_child
    n = 0
    for name, mod in list(model.named_modules()):
        if type(mod) is nn.Dropout:
            _set_child(model, name, FastDropout(mod.p, mod.inplace).train(mod.training))
            n += 1
        elif is_timm_attention(mod):  # timm's fused path would draw its dropout mask inside SDPA
            _set_child(model, name, timm_compressed_attention(mod, None))
    use_hf_compressed_attention(model)
    return n
