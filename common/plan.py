"""What `prepare` will do to a model, before it does it: the linears it compresses, those that stay full precision
and why, the attention modules it quantizes, and the attention it cannot cover. `prepare` carries out this plan,
so the two cannot disagree. `python -m common.describe` prints it for a hub or timm model.
"""
from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import asdict, dataclass, field

from torch import nn

from . import packing
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
    bad_masks: list[str] = field(default_factory=list)    # masks given to prepare that do not fit their layer
    recipe: Recipe | None = None

    def error(self) -> str | None:
        """Why `prepare` would refuse this model with this recipe, or None."""
        r = self.recipe
        if self.bad_masks:
            return (f"{len(self.bad_masks)} given masks do not fit their layer, e.g. {'; '.join(self.bad_masks[:2])}"
                    " (a checkpoint of another architecture or size?)")
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

    def summary(self, index: str = "combo5", float_bytes: int = 2) -> dict:
        """Counts, and the backbone's size two ways. `bits_per_backbone_weight`, `backbone_ratio_vs_fp32`,
        `backbone_bytes`: what common.export's file stores for the compressed linears (codes + N:M index + weight
        scales, computed from the shapes; its default format: `index` combo5, `float_bytes` 2 = fp16 for unquantized
        values), the same numbers as the export report. `value_bits_per_weight`, `value_ratio_vs_fp32`: the paper's
        accounting, weight bits x density, values only (W4 + 2:4: 2 bits, "16x")."""
        r = self.recipe or Recipe()
        n_c = sum(o * i for o, i in self.compress.values())
        density = r.nm[0] / r.nm[1] if r.nm else 1.0
        value_bits = (r.w_bits if r.quantize_weights else 32) * density
        nbytes = sum(_stored_bytes(o, i, r, index, float_bytes) for o, i in self.compress.values())
        ratio = lambda a, b: round(a / b, 4) if b else None  # noqa: E731
        return {"compressed_linears": len(self.compress), "compressed_weights": n_c,
                "full_precision_linears": len(self.keep), "quantized_attention": len(self.attention),
                "backbone_bytes": nbytes, "bits_per_backbone_weight": round(8 * nbytes / n_c, 4) if n_c else None,
                "backbone_ratio_vs_fp32": ratio(4 * n_c, nbytes), "index_encoding": index,
                "value_bits_per_weight": value_bits, "value_ratio_vs_fp32": round(32 / value_bits, 4),
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
        size = (f"{s['bits_per_backbone_weight']:g} bits each in the exported file (codes, index, scales), "
                f"{s['backbone_ratio_vs_fp32']:g}x vs fp32; values alone {s['value_bits_per_weight']:g} bits, "
                f"{s['value_ratio_vs_fp32']:g}x, the paper's accounting" if s["compressed_linears"] else "nothing")
        out = [f"compress ({s['compressed_linears']} linears, {s['compressed_weights']:,} weights -> {size}):"]
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


def _stored_bytes(out_f: int, in_f: int, r: Recipe, index: str, float_bytes: int) -> int:
    """Bytes common.export stores for one compressed linear's weight, from its shape (its _pack_linear: codes at
    the kept positions, the index of the mask, the weight step; the bias is not counted, as in its report)."""
    n = out_f * in_f
    quantized = r.quantize_weights
    kept = n * r.nm[0] // r.nm[1] if r.nm and (r.zero_preserving or not quantized) else n  # plain grid: dense codes
    codes = (kept + 1) // 2 if quantized and r.w_bits <= 4 else kept if quantized else kept * float_bytes
    idx = 0
    if r.nm == (2, 4):
        idx = packing.combo5_nbytes(n // 4) if index == "combo5" else -(-(n // 4) // 3)
    elif r.nm:
        idx = -(-n // 8)  # bitmask
    step = (4 * out_f if r.per_channel else 4) if quantized else 0  # float32
    return codes + idx + step


def prepare_plan(model: nn.Module, recipe: Recipe, masks: dict | None = None) -> Plan:
    """What `prepare(model, recipe, masks)` will do; changes nothing (works on a model built on the meta device).
    `masks` ({linear name: mask}) are checked against the shapes of the layers they are for."""
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
            mask = (masks or {}).get(name)
            if recipe.nm and mask is not None and tuple(mask.shape) != p.compress[name]:
                p.bad_masks.append(f"{name}: mask {tuple(mask.shape)}, layer {lin.out_features}x{lin.in_features} "
                                   "[out x in]")
    p.separate_qkv_bias = [n for n, m in model.named_modules()
                           if getattr(m, "q_bias", None) is not None and getattr(m, "qkv_bias_separate", True) is False
                           and f"{n}.qkv" in p.compress]
    if recipe.quantize_attention and recipe.quantize_acts:
        supported = lambda m: is_timm_attention(m) or is_hf_attention(m)
        p.unsupported = [(n, c) for n, c in unsupported_attention(model, supported) if not recipe.skips(n)]
        p.attention = [n for n, m in model.named_modules() if supported(m) and not recipe.skips(n)]
    return p
