"""Size accounting of a prepared model (theoretical bits; `common.export` measures real bytes)."""
from __future__ import annotations

from torch import nn

from .linear import CompressedLinear


def compression_summary(model: nn.Module) -> dict:
    """Bits per backbone weight (value bits × density; index and scale overhead are counted by the export report)
    and the ratio vs FP32, over the compressed (backbone) linears; plus parameter counts."""
    from .prepare import FrozenCompressedLinear
    n_backbone = 0
    bits = 0.0
    for m in model.modules():
        if isinstance(m, (CompressedLinear, FrozenCompressedLinear)):
            n = m.in_features * m.out_features
            wbits = (m.wspec.bits if m.wspec else 32) if isinstance(m, CompressedLinear) else m.w_bits
            density = m.nm[0] / m.nm[1] if m.nm else 1.0
            n_backbone += n
            bits += n * wbits * density
    n_total = sum(p.numel() for p in model.parameters()) + sum(
        b.numel() for n, b in model.named_buffers() if n.endswith("weight_codes") or n.endswith(".weight"))
    bpw = bits / n_backbone if n_backbone else 32.0
    recipe = getattr(model, "compression_recipe", None)
    return {
        "backbone_params": n_backbone,
        "total_params": n_total,
        "bits_per_backbone_weight": round(bpw, 4),
        "compression_ratio": round(32.0 / bpw, 4),
        "w_bits": recipe.w_bits if recipe else 32,
        "a_bits": recipe.a_bits if recipe else 32,
        "sparsity": recipe.sparsity if recipe else None,
        "quantize_attention": bool(recipe.quantize_attention and recipe.quantize_acts) if recipe else False,
        "zero_preserving": recipe.zero_preserving if recipe else None,
    }
