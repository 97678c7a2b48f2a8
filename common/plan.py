"""What `prepare` will do to a model, before it does it: the linears it compresses, those that stay full precision
and why, the attention modules it quantizes, and the attention it cannot cover. `prepare` carries out this plan,
so the two cannot disagree. `python -m common.describe` prints it for a hub or timm model.
"""
from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import asdict, dataclass, field

from torch import nn

from .attention import is_hf_attention, is_timm_attention, unsupported_attention
from .linear import CompressedLinear, as_linear
from .recipe import Recipe


# what the compressed attention covers, for the messages that refuse a model
COVERED = ("Hugging Face models that call the attention interface (transformers 5.x) and timm's Attention (ViT, "
           "DeiT), Swin, BEiT, EVA and ViT-RoPE attention")


@dataclass
class Plan:
    compress: dict[str, tuple[int, int]] = field(default_factory=dict)  # linear -> (out, in): CompressedLinear
    keep: dict[str, str] = field(default_factory=dict)                  # linear -> why it stays full precision
    attention: list[str] = field(default_factory=list)                  # modules whose matmul operands get quantized
    unsupported: list[tuple[str, str]] = field(default_factory=list)    # (module, class): attention prepare refuses
    # timm attention with q/v biases (BEiT, EVA, Swin-V2) computes F.linear(x, qkv.weight, bias) itself, past the
    # compressed qkv; prepare sets their qkv_bias_separate (qkv(x) + bias: the same sum) so that qkv runs where
    # timm's forward stays (quantize_attention: false, or Swin-V2)
    separate_qkv_bias: list[str] = field(default_factory=list)
    indivisible: list[str] = field(default_factory=list)  # linears kept whole: input dim not a multiple of M
    recipe: Recipe | None = None

    def error(self) -> str | None:
        """Why `prepare` would refuse this model with this recipe, or None."""
        r = self.recipe
        if not (r and r.quantize_attention and r.quantize_acts):
            return None
        if self.unsupported:
            other = [f"{n} ({cls})" for n, cls in self.unsupported]
            return (f"{len(other)} attention modules are of a kind the compressed attention does not cover, e.g. "
                    f"{', '.join(other[:2])}; it covers {COVERED}. Set quantize_attention: false to compress the "
                    "linears only")
        if not self.attention:
            return (f"quantize_attention=True but the model has no supported attention module (the compressed "
                    f"attention covers {COVERED}); set it to false")
        return None

    def summary(self) -> dict:
        r = self.recipe or Recipe()
        n_c = sum(o * i for o, i in self.compress.values())
        density = r.nm[0] / r.nm[1] if r.nm else 1.0
        bits = (r.w_bits if r.quantize_weights else 32) * density
        return {"compressed_linears": len(self.compress), "compressed_weights": n_c,
                "full_precision_linears": len(self.keep), "quantized_attention": len(self.attention),
                "bits_per_backbone_weight": bits, "backbone_ratio_vs_fp32": round(32 / bits, 4),
                "error": self.error()}

    def to_dict(self) -> dict:
        d = asdict(self)
        d["recipe"] = self.recipe.to_dict() if self.recipe else None
        d["summary"] = self.summary()
        return d

    def format(self) -> str:
        """A short text report; layers that differ only by their index (encoder.layer.3.…) are one row."""
        def grouped(names):
            groups: OrderedDict[str, list[str]] = OrderedDict()
            for n in names:
                groups.setdefault(re.sub(r"\.\d+(?=\.|$)", ".*", n), []).append(n)
            return groups

        s = self.summary()
        out = [f"compress ({s['compressed_linears']} linears, {s['compressed_weights']:,} weights -> "
               f"{s['bits_per_backbone_weight']:g} bits each, {s['backbone_ratio_vs_fp32']:g}x vs fp32):"]
        for g, names in grouped(self.compress).items():
            o, i = self.compress[names[0]]
            out.append(f"  {g:<60s} x{len(names):<3d} {o}x{i}")
        out.append(f"full precision ({s['full_precision_linears']} linears):")
        for g, names in grouped(self.keep).items():
            out.append(f"  {g:<60s} x{len(names):<3d} {self.keep[names[0]]}")
        out.append(f"quantized attention ({s['quantized_attention']} modules):")
        out += [f"  {g:<60s} x{len(names)}" for g, names in grouped(self.attention).items()]
        if self.separate_qkv_bias:
            out.append("qkv bias added after the compressed qkv (qkv_bias_separate = True):")
            out += [f"  {g:<60s} x{len(names)}" for g, names in grouped(self.separate_qkv_bias).items()]
        if self.unsupported:
            out.append("attention of a kind not covered:")
            out += [f"  {g:<60s} x{len(names)}" for g, names in grouped(n for n, _ in self.unsupported).items()]
        if s["error"]:
            out.append(f"prepare would fail: {s['error']}")
        return "\n".join(out)


def output_heads(model: nn.Module) -> set[str]:
    """Names of the modules a Hugging Face model calls its output embeddings (the LM / CTC head, whatever its
    name: lm_head, proj_out, vocab_projector, ...)."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return {n for n, m in model.named_modules() if head is not None and m is head}


def prepare_plan(model: nn.Module, recipe: Recipe) -> Plan:
    """What `prepare(model, recipe)` will do; changes nothing (works on a model built on the meta device)."""
    p = Plan(recipe=recipe)
    heads = output_heads(model) if recipe.keep_output_embeddings else set()
    for name, mod in model.named_modules():
        lin = as_linear(mod)
        # other nn.Linear subclasses (Falcon's FalconLinear, nn.MultiheadAttention's out_proj) are listed, not taken:
        # their forward, or their owner's use of their weight, may differ from a linear's
        subclass = lin is None and isinstance(mod, nn.Linear) and not isinstance(mod, CompressedLinear)
        if lin is None and not subclass:
            continue
        hit = recipe.skip_match(name)
        if hit is not None:
            p.keep[name] = f"skip: matches {hit.group(0).strip('.')!r}"
        elif name in heads:
            p.keep[name] = "output embeddings"
        elif subclass:
            p.keep[name] = f"{type(mod).__name__}, a subclass of nn.Linear: not swapped"
        elif recipe.nm and lin.in_features % recipe.nm[1]:  # choice: keep it whole rather than refuse the model
            p.keep[name] = f"input dim {lin.in_features} is not a multiple of {recipe.nm[1]} ({recipe.sparsity})"
            p.indivisible.append(name)
        else:
            p.compress[name] = (lin.out_features, lin.in_features)
    p.separate_qkv_bias = [n for n, m in model.named_modules()
                           if getattr(m, "q_bias", None) is not None and getattr(m, "qkv_bias_separate", True) is False
                           and f"{n}.qkv" in p.compress]
    if recipe.quantize_attention and recipe.quantize_acts:
        supported = lambda m: is_timm_attention(m) or is_hf_attention(m)
        p.unsupported = [(n, c) for n, c in unsupported_attention(model, supported) if not recipe.skips(n)]
        p.attention = [n for n, m in model.named_modules() if supported(m) and not recipe.skips(n)]
    return p
