"""Integer matmul for the compressed linears: 4-bit codes times 4-bit codes, exact in int32, scaled once.

With zero-preserving grids on both operands (the paper's format, both sides), the fake-quantized input is
k_x * s_x (k_x an integer, its zero point folded in) and the weight k_w * s_w, so the layer's matmul is
(k_x @ k_wᵀ) * s_x * s_w: an int8 matmul whose int32 sum is exact, then one multiply. It gives the float32 matmul
of the fake-quantized operands up to float32's rounding, more exactly (one rounding, not one per addition).
Why (issue 9): on CPU, oneDNN's int8 matmul (torch._int_mm) measured 4.4x faster than the float32 one at
ViT-base shapes here (AMD EPYC, AVX512-VNNI); it is the training forward's largest cost. The backward is
unchanged (float straight-through gradients from the saved float operands).

COMMON_INT_MATMUL=auto (default): on CPU, for float32 inputs outside autocast, where the sums are exact (below);
=0: never (the float32 matmul of the fake-quantized operands, as before). `set_int_matmul` does the same. Choice:
CPU only, as it is the only place it was measured (a GPU's float matmul is another trade-off).
"""
from __future__ import annotations

import torch

from .kernels import mode_from_env, parse_mode

_MODES = ("auto", "0")
_mode = "auto"


def set_int_matmul(mode: str | bool) -> None:
    """'auto' / True or '0' / False: whether compressed linears use the integer matmul (module docstring)."""
    global _mode
    _mode = parse_mode(mode, _MODES, "auto", "integer matmul")


mode_from_env("COMMON_INT_MATMUL", set_int_matmul)


def int_matmul_mode() -> str:
    return _mode


def exact(a_bits: int, w_bits: int, k: int) -> bool:
    """Whether int8 codes of these widths multiply exactly over k inputs: the codes fit int8 (|k_x| <= 2^a - 1
    with the zero point folded in, |k_w| <= 2^(w-1) - 1), the int32 sum cannot overflow, and, for CPU kernels
    that add pairs of u8*s8 products in saturating int16 (AVX2 without VNNI, codes shifted by 128), neither can
    those pairs: 2 * (n_x + 128) * n_w <= 32767. True for the paper's 4/4 bits for k below 20 million."""
    n_x, n_w = 2 ** a_bits - 1, 2 ** (w_bits - 1) - 1
    return n_x <= 127 and n_w <= 127 and 2 * (n_x + 128) * n_w <= 32767 and k * n_x * n_w < 2 ** 31


def usable(x: torch.Tensor, a_bits: int, a_zero_preserving: bool, w_bits: int, w_zero_preserving: bool) -> bool:
    """Whether the integer matmul applies to input `x` of a layer quantized so (see the module docstring)."""
    return (_mode == "auto" and a_zero_preserving and w_zero_preserving and x.device.type == "cpu"
            and x.dtype == torch.float32 and not torch.is_autocast_enabled("cpu") and x.numel() > 0
            and exact(a_bits, w_bits, x.shape[-1]))


def int_linear(x_codes: torch.Tensor, x_step: torch.Tensor, w_codes: torch.Tensor, w_step: torch.Tensor,
               bias: torch.Tensor | None) -> torch.Tensor:
    """(x_codes @ w_codesᵀ) * x_step * w_step + bias in float32; x_codes [..., K] and w_codes [N, K] int8,
    x_step one step, w_step one step or one per output row ([N, 1])."""
    k = x_codes.shape[-1]
    acc = torch._int_mm(x_codes.reshape(-1, k), w_codes.t())  # w_codesᵀ as a view: measured faster than a copy
    scale = x_step.float() * (w_step.float().reshape(1, -1) if w_step.numel() > 1 else w_step.float())
    # int32 -> float32 is exact while |sum| < 2^24 (4-bit codes: k < 159,000), one rounding beyond. Shaped before
    # the conversion, so that the result is a tensor of its own, not a view: a view made inside an autograd
    # Function may not be modified in place afterwards (timm's `qkv += bias`, ReLU(inplace=True))
    y = acc.view(*x_codes.shape[:-1], w_codes.shape[0]).to(torch.float32).mul_(scale)
    if bias is not None:
        y.add_(bias.to(torch.float32))
    return y
