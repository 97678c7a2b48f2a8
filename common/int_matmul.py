"""Integer matmul for the compressed linears: 4-bit codes times 4-bit codes, exact in int32, scaled once.

With zero-preserving grids on both operands (the paper's format, both sides), the fake-quantized input is
k_x * s_x (k_x an integer, its zero point folded in) and the weight k_w * s_w, so the layer's matmul is
(k_x @ k_wᵀ) * s_x * s_w: an int8 matmul whose int32 sum is exact, then one multiply. It gives the float32 matmul
of the fake-quantized operands up to float32's rounding, more exactly (one rounding, not one per addition).
Why (issue 9): on CPU, oneDNN's int8 matmul (torch._int_mm) measured 4.4x faster than the float32 one at
ViT-base shapes on an AMD EPYC with AVX512-VNNI; it is the training forward's largest cost. Without an int8
dot-product instruction it is the other way round: 21-27x *slower* than float32 at BERT-base shapes on an AMD EPYC
with AVX2 only (2026-12-02, `python benchmarks/bench_int_matmul.py`), which made a W4A4+2:4 BERT training step 7.5x
the FP one (`COMMON_INT_MATMUL=1 python benchmarks/bench_train_step.py --model bert`; 0.97x with the float32 one).
The backward is unchanged (float straight-through gradients from the saved float operands).

COMMON_INT_MATMUL=auto (default): on a CPU with an int8 dot-product instruction (x86 AVX512-VNNI, AVX-VNNI or
AMX-INT8: `has_int8_dot`), for float32 inputs outside autocast, where the sums are exact (below); =1: on every CPU
(e.g. to measure it); =0: never (the float32 matmul of the fake-quantized operands). `set_int_matmul` does the
same. Choice: CPU only, as it is the only place it was measured (a GPU's float matmul is another trade-off); of the
dot-product instructions only AVX512-VNNI was measured, the others are assumed alike.
"""
from __future__ import annotations

import torch

from .kernels import mode_from_env, parse_mode

_MODES = ("auto", "1", "0")
_mode = "auto"
INT8_DOT = ("avx512_vnni", "avx_vnni", "amx_int8")  # torch.cpu.get_capabilities() names


def set_int_matmul(mode: str | bool) -> None:
    """'auto', '1' / True or '0' / False: whether compressed linears use the integer matmul (module docstring)."""
    global _mode
    _mode = parse_mode(mode, _MODES, "1", "integer matmul")


def int8_dot_instructions() -> tuple[str, ...]:
    """The INT8_DOT instructions this CPU has; none where torch cannot tell (torch.cpu.get_capabilities is recent)."""
    try:
        caps = torch.cpu.get_capabilities()
    except (AttributeError, RuntimeError):
        return ()
    return tuple(k for k in INT8_DOT if caps.get(k))


# read once, at import, into a plain global rather than a cache: torch.compile reads a global as a constant, where it
# would trace into get_capabilities (whose result it cannot put in a graph) from inside a compiled model's first call
_int8_dot = bool(int8_dot_instructions())


def has_int8_dot() -> bool:
    """Whether this CPU has an instruction that oneDNN's int8 matmul needs to be fast (INT8_DOT); False where
    torch cannot tell: the float32 matmul is the safe side."""
    return _int8_dot


def active() -> bool:
    """Whether the mode turns the integer matmul on for this CPU (`usable` adds the per-call conditions)."""
    return _mode == "1" or (_mode == "auto" and has_int8_dot())


def describe() -> str:
    """The mode and what it means here, for benchmark records: e.g. 'auto (off: no int8 dot-product instruction)'."""
    if _mode == "auto":
        return f"auto ({'on' if _int8_dot else 'off'}: {'an' if _int8_dot else 'no'} int8 dot-product instruction)"
    return _mode


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
    return (active() and a_zero_preserving and w_zero_preserving and x.device.type == "cpu"
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
