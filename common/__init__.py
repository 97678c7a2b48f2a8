"""common: the paper's compression toolkit — 4-bit quantizers with a zero-preserving format, N:M sparsity,
distillation and scheduled dropout — for Hugging Face and timm transformers. See common/README.md."""
from . import int_matmul, kernels
from .attention import AttentionQuantizers
from .distill import DistillationLoss, kd_kl, logits_of
from .dropout import ScheduledDropout
from .fast_dropout import FastDropout, fast_dropout, use_fast_dropout
from .linear import CompressedLinear, WeightQuantSpec
from .pact import ActQuantizer
from .plan import Plan, prepare_plan
from .prepare import (FrozenCompressedLinear, act_quantizers, calibrate, compressed_linears, convert, masks_of,
                      prepare)
from .recipe import DEFAULT_SKIP, Recipe, RecipeError
from .report import compression_summary
from .sparsity import check_nm, nm_mask

__all__ = [
    "ActQuantizer", "int_matmul", "kernels", "AttentionQuantizers", "CompressedLinear", "DEFAULT_SKIP",
    "DistillationLoss",
    "FastDropout", "FrozenCompressedLinear", "Recipe", "RecipeError", "ScheduledDropout", "WeightQuantSpec",
    "act_quantizers", "calibrate", "check_nm", "compressed_linears", "compression_summary", "convert", "fast_dropout",
    "kd_kl", "logits_of", "masks_of", "nm_mask", "Plan", "prepare", "prepare_plan", "use_fast_dropout",
]
