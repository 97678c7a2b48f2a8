"""Integer matmul for the compressed linears: 4-bit codes times 4-bit codes, exact in int32, scaled once.

With zero-preserving grids on both operands (the paper's format, both sides), the fake-quantized input is
k_x * s_x (k_x an integer, its zero point folded in) and the weight k_w * s_w, so the layer's matmul is
(k_x @ k_wᵀ) * s_x * s_w: an int8 matmul whose int32 sum is exact, then one multiply. It gives the float32 matmul
of the fake-quantized operands up to float32's rounding, more exactly (one rounding, not one per addition).
The backward is unchanged (float straight-through gradients from the saved float operands).

Why (issue 9): the forward's matmul is the largest single cost of a CPU training step. Two kernels, each where it
was measured faster than float32 (`python benchmarks/bench_int_matmul.py`, BERT/ViT-base shapes):
- `int_mm`: torch._int_mm (oneDNN, signed int8 codes both sides): 4.4x faster than float32 at ViT-base shapes on an
  AMD EPYC with AVX512-VNNI. Without an int8 dot-product instruction it is the other way round: 21-27x *slower*
  on an AMD EPYC with AVX2 only (2026-12-02), which made a W4A4+2:4 BERT step 7.5x the FP one.
- `onednn`: oneDNN's quantized linear (torch.ops.onednn.qlinear_pointwise, the kernel of PyTorch's x86 int8
  inference) on unsigned activation codes with their zero point (k_x + z in 0..2^a - 1) and signed weight codes,
  the weight packed at each call (weights change every step): 1.5-2x faster than float32, packing included, on
  that AVX2-only EPYC (2026-12-02), where AVX2's u8 x s8 multiply-add serves it.

COMMON_INT_MATMUL=auto (default): `int_mm` on a CPU with an int8 dot-product instruction (x86 AVX512-VNNI,
AVX-VNNI or AMX-INT8: `has_int8_dot`), `onednn` on other x86 CPUs with AVX2, off elsewhere; in each case for
float32 inputs outside autocast, where the sums are exact (below). =1: on with the kernel auto picks (`int_mm`
where auto picks none); =int_mm or =onednn: that kernel on every CPU (e.g. to measure it); =0: never (the float32
matmul of the fake-quantized operands). `set_int_matmul` does the same. Choice: CPU only, as it is the only place
it was measured (a GPU's float matmul is another trade-off); `int_mm` on the dot-product CPUs because it beat
`onednn` there: 0.14-0.64x float32's time against 0.35-0.78x at BERT-base shapes on a 2-core AMD EPYC with
AVX512-VNNI (2026-12-03, `bench_int_matmul.py --iters 20`).
"""
from __future__ import annotations

import torch

from .kernels import mode_from_env, parse_mode

KERNELS = ("int_mm", "onednn")
_MODES = ("auto", "1", "0", *KERNELS)
_mode = "auto"
INT8_DOT = ("avx512_vnni", "avx_vnni", "amx_int8")  # torch.cpu.get_capabilities() names


def set_int_matmul(mode: str | bool) -> None:
    """'auto', '1' / True, '0' / False, or a kernel of KERNELS: whether and how compressed linears use the integer
    matmul (module docstring)."""
    global _mode
    _mode = parse_mode(mode, _MODES, "1", "integer matmul")


def _capabilities() -> dict:
    try:
        return torch.cpu.get_capabilities()
    except (AttributeError, RuntimeError):  # torch.cpu.get_capabilities is recent
        return {}


def int8_dot_instructions() -> tuple[str, ...]:
    """The INT8_DOT instructions this CPU has; none where torch cannot tell."""
    caps = _capabilities()
    return tuple(k for k in INT8_DOT if caps.get(k))


def onednn_qlinear_usable() -> bool:
    """Whether `onednn` can serve here: an x86 CPU with AVX2 and a torch built with oneDNN's quantized linear."""
    return (bool(_capabilities().get("avx2")) and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.onednn, "qlinear_pointwise"))


# read once, at import, into plain globals rather than a cache: torch.compile reads a global as a constant, where it
# would trace into get_capabilities (whose result it cannot put in a graph) from inside a compiled model's first call
_int8_dot = bool(int8_dot_instructions())
_avx2_onednn = onednn_qlinear_usable()


def has_int8_dot() -> bool:
    """Whether this CPU has an instruction that oneDNN's int8 matmul needs to be fast (INT8_DOT); False where
    torch cannot tell: the float32 matmul is the safe side."""
    return _int8_dot


def _auto_kernel() -> str | None:
    return "int_mm" if _int8_dot else "onednn" if _avx2_onednn else None


def kernel() -> str | None:
    """The kernel (of KERNELS) the mode selects on this CPU, None where the integer matmul is off (`usable` adds
    the per-call conditions)."""
    if _mode in KERNELS:
        return _mode
    if _mode == "auto":
        return _auto_kernel()
    return (_auto_kernel() or "int_mm") if _mode == "1" else None


def describe() -> str:
    """The mode and what it means here, for run and benchmark records, e.g. 'auto (onednn: AVX2, no int8
    dot-product instruction)'; each kernel rounds in its own way."""
    if _mode == "auto":
        k = _auto_kernel()
        why = {"int_mm": "an int8 dot-product instruction", "onednn": "AVX2, no int8 dot-product instruction",
               None: "neither an int8 dot-product instruction nor AVX2 with oneDNN"}[k]
        return f"auto ({k or 'off'}: {why})"
    return f"1 ({kernel()})" if _mode == "1" else _mode


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
    """Whether the integer matmul applies to input `x` of a layer quantized so (see the module docstring). Not
    `onednn` inside a user's torch.compile: inductor lowers oneDNN's quantized linear only for weights packed once,
    as graph constants, and ours change every step (the compiled model runs the float32 matmul instead)."""
    k = kernel()
    return (k is not None and not (k == "onednn" and torch.compiler.is_compiling())
            and a_zero_preserving and w_zero_preserving and x.device.type == "cpu"
            and x.dtype == torch.float32 and not torch.is_autocast_enabled("cpu") and x.numel() > 0
            and exact(a_bits, w_bits, x.shape[-1]))


def int_linear(x_codes: torch.Tensor, x_step: torch.Tensor, x_zero_point: torch.Tensor, w_codes: torch.Tensor,
               w_step: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """(x_codes @ w_codesᵀ) * x_step * w_step + bias in float32, with the kernel `kernel()` names; x_codes [..., K]
    and w_codes [N, K] int8 (x_codes with the zero point folded in: k_x = code - zero point), x_step one step and
    x_zero_point its integer zero point (one element each), w_step one step or one per output row ([N, 1])."""
    if kernel() == "onednn":
        return _onednn_linear(x_codes, x_step, x_zero_point, w_codes, w_step, bias)
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


def _onednn_linear(x_codes, x_step, x_zero_point, w_codes, w_step, bias):
    """`int_linear` through oneDNN's quantized linear: the activation codes back on their unsigned grid (code + zero
    point, 0..2^a - 1 as uint8, which AVX2's u8 x s8 multiply-add takes as it is), the weight packed for oneDNN."""
    zp = x_zero_point.reshape(()).to(torch.int8)
    xu = (x_codes + zp).view(torch.uint8)  # in 0..2^a - 1 < 128: the same bits as uint8
    w_scale = w_step.float().reshape(-1)
    packed = torch.ops.onednn.qlinear_prepack(w_codes, None)
    return torch.ops.onednn.qlinear_pointwise.tensor(
        xu, x_step.float().reshape(()), zp.long(), packed, w_scale, torch.zeros_like(w_scale, dtype=torch.long),
        None if bias is None else bias.to(torch.float32), 1.0, 0, torch.float32, "none", [], "")
