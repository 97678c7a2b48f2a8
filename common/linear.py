"""The compressed linear layer: 2:4-masked, fake-quantized weights on fake-quantized inputs, in one Function.

One autograd.Function for the whole layer (instead of a chain of torch ops) keeps the QAT step close to the FP
step: the backward reuses the quantized operands saved by the forward and needs no graph of its own.
The mask is a buffer computed once by `prepare`. The weight is stored already masked (at `prepare` and again after
every `load_state_dict`) and its gradient is masked in the backward, so the pruned weights stay exactly zero under
any optimizer whose update of a zero weight with zero gradient is zero (AdamW, SGD+momentum+weight decay): the
forward can use the stored weight as it is, one pass over it fewer per step.
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import nn

from . import int_matmul, kernels, sharding
from .fake_quant import dequantize_weight, quantize_weight, quantize_weight_codes, weight_step
from .pact import ActQuantizer, _act_backward, _act_forward, _act_forward_codes
from .sawb import weight_clip


def as_linear(mod: nn.Module) -> nn.Linear | None:
    """`mod` as an nn.Linear (sharing its tensors), or None. Besides nn.Linear itself this takes transformers'
    `Conv1D` (GPT-2 family: y = x·W + b with W stored [in, out]), whose weight is used transposed."""
    if type(mod) is nn.Linear:
        return mod
    pu = sys.modules.get("transformers.pytorch_utils")  # a model holding Conv1D has imported it already
    if pu is None or type(mod) is not getattr(pu, "Conv1D", None):
        return None
    lin = nn.Linear(mod.weight.shape[0], mod.weight.shape[1], bias=mod.bias is not None, device="meta")
    lin.weight = nn.Parameter(mod.weight.detach().t(), requires_grad=mod.weight.requires_grad)
    lin.bias = mod.bias
    return lin


class WeightQuantSpec:
    """How a layer quantizes its weight (no state: SAWB recomputes the clip from the weight every step)."""

    def __init__(self, bits, method="sawb", zero_preserving=True, per_channel=False, density=1.0):
        self.bits, self.method, self.zero_preserving = bits, method, zero_preserving
        self.per_channel, self.density = per_channel, density

    def step(self, w: torch.Tensor) -> torch.Tensor:
        per_row = w.shape[1] if self.per_channel else w.numel()
        kept = max(1, round(per_row * self.density))
        clip = weight_clip(self.method, w, self.bits, self.zero_preserving, self.per_channel, kept)
        return weight_step(clip, self.bits, self.zero_preserving)

    def __call__(self, w: torch.Tensor) -> torch.Tensor:
        return quantize_weight(w, self.step(w), self.bits, self.zero_preserving)

    def __repr__(self):
        return (f"W{self.bits}({self.method}{', per_channel' if self.per_channel else ''}"
                f"{', zero_preserving' if self.zero_preserving else ', plain grid'})")


class CompressedLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, mask, lo, hi, wspec, aspec):
        codes = step = None
        # 4-bit x 4-bit as an integer matmul where it applies (common.int_matmul): the weight's int8 codes serve
        # both it and the backward, and no float copy of the quantized weight is made
        use_int = wspec is not None and aspec is not None and int_matmul.usable(
            x, aspec[0], aspec[1], wspec.bits, wspec.zero_preserving)
        if wspec is not None:  # the weight is stored pre-masked (see the module docstring)
            step = wspec.step(weight)
            # the backward gets int8 codes, a quarter of the float weight's memory, and dequantizes them to
            # the same floats (peak memory of the QAT step: goal <= 1.3x FP)
            wq, codes = quantize_weight_codes(weight, step, wspec.bits, wspec.zero_preserving, values=not use_int)
        else:
            wq = weight
        if use_int:
            xq, lo_eff, hi_eff, xcodes, xstep, xzp = _act_forward_codes(x, lo, hi, aspec[0])
            y = int_matmul.int_linear(xcodes, xstep, xzp, codes, step, bias)
        else:
            if aspec is not None:
                xq, lo_eff, hi_eff = _act_forward(x, lo, hi, aspec[0], aspec[1])
            else:
                xq, lo_eff, hi_eff = x, None, None
            y = F.linear(xq, wq.to(xq.dtype), None if bias is None else bias.to(xq.dtype))
        ctx.save_for_backward(x if aspec is not None else None, xq, weight if wspec is None else codes, step, mask,
                              lo_eff, hi_eff)
        ctx.cfg = (aspec, bias is not None, weight.dtype, None if wspec is None else wspec.zero_preserving)
        return y

    @staticmethod
    def backward(ctx, gy):
        x, xq, wq, step, mask, lo_eff, hi_eff = ctx.saved_tensors
        aspec, has_bias, wdtype, zero_preserving = ctx.cfg
        g2 = gy.reshape(-1, gy.shape[-1])
        gw = gb = gx = g_lo = g_hi = None
        if ctx.needs_input_grad[1]:
            # STE for the weight quantizer (identity), masked so pruned weights never move
            gw = g2.t().mm(xq.reshape(-1, xq.shape[-1]).to(g2.dtype)).to(wdtype)
            if mask is not None:
                kernels.mask_(gw, mask)
        if has_bias and ctx.needs_input_grad[2]:
            gb = g2.sum(0).to(wdtype)
        if ctx.needs_input_grad[0] or (aspec is not None and (ctx.needs_input_grad[4] or ctx.needs_input_grad[5])):
            if step is not None:
                wq = dequantize_weight(wq, step, zero_preserving)
            gxq = gy.matmul(wq.to(gy.dtype))
            if aspec is not None:
                gx, g_lo, g_hi = _act_backward(gxq, x, xq, lo_eff, hi_eff, ctx.needs_input_grad[4], aspec[2])
            else:
                gx = gxq
        return gx, gw, gb, None, g_lo, g_hi, None, None


@torch.no_grad()
def _remask(module, incompatible_keys=None):
    """Keep the stored weight pruned whatever was loaded into it (a dense checkpoint, a resumed one)."""
    if module.mask is not None:
        module.weight.mul_(sharding.like(module.mask, module.weight))  # FSDP2: a full state loaded into shards


class CompressedLinear(nn.Linear):
    """Drop-in nn.Linear (same parameter names) with N:M-masked, fake-quantized weights and quantized inputs."""

    def __init__(self, in_features, out_features, bias=True, wspec: WeightQuantSpec | None = None,
                 input_quant: ActQuantizer | None = None, nm: tuple[int, int] | None = None, device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.wspec = wspec
        self.input_quant = input_quant
        self.nm = nm
        self.register_buffer("mask", None)
        self.register_load_state_dict_post_hook(_remask)

    @classmethod
    def from_linear(cls, lin: nn.Linear, wspec, input_quant, nm, mask: torch.Tensor | None = None):
        from .sparsity import nm_mask
        new = cls(lin.in_features, lin.out_features, lin.bias is not None, wspec, input_quant, nm,
                  device=lin.weight.device, dtype=lin.weight.dtype)
        with torch.no_grad():
            if nm is not None:
                m = nm_mask(lin.weight, *nm) if mask is None else mask.to(device=lin.weight.device, dtype=torch.bool)
                if m.shape != lin.weight.shape:
                    raise ValueError(f"mask shape {tuple(m.shape)} != weight shape {tuple(lin.weight.shape)}")
                new.mask = m
                new.weight.copy_(lin.weight * m)  # stored already masked
            else:
                new.weight.copy_(lin.weight)
            if lin.bias is not None:
                new.bias.copy_(lin.bias)
        new.weight.requires_grad_(lin.weight.requires_grad)
        return new

    def extra_repr(self):
        nm = f"{self.nm[0]}:{self.nm[1]}" if self.nm else "dense"
        return f"{super().extra_repr()}, weight={self.wspec or 'fp'}, sparsity={nm}"

    @torch.no_grad()
    def effective_weight(self) -> torch.Tensor:
        """Exactly the weight the forward multiplies with (masked, then fake-quantized), whole. Under FSDP2 this
        gathers the shards: call it on every rank."""
        w = sharding.full_tensor(self.weight)
        w = w if self.mask is None else w * self.mask
        return self.wspec(w) if self.wspec is not None else w.clone()

    def forward(self, x):
        aq = self.input_quant
        if aq is not None and aq.observing:
            aq.observe(x)
            aq = None
        aspec = None if aq is None else (aq.bits, aq.zero_preserving, aq.method == "pact+")
        # the Function sees rows and returns a tensor of its own, reshaped here: a view made inside an autograd
        # Function may not be modified in place afterwards (timm's `qkv += bias`, ReLU(inplace=True))
        y = CompressedLinearFn.apply(x.reshape(-1, x.shape[-1]), self.weight, self.bias, self.mask,
                                     None if aq is None else aq.lo, None if aq is None else aq.hi, self.wspec, aspec)
        return y.view(*x.shape[:-1], self.out_features)
