"""SAWB: statistics-aware weight binning (Choi et al. 2018), the weight clip used by the paper's group (IBM).

c = a*sqrt(E[w^2]) + b*E[|w|], per tensor or per output channel, recomputed every training step.
"""
from __future__ import annotations

import torch

from . import kernels

# Published 4-bit coefficients (a, b) for the plain 16-level grid and for the zero-aligned 15-level grid.
SAWB_COEFFS = {(4, False): (12.68, -12.80), (4, True): (12.035, -12.03)}


def sawb_clip(w: torch.Tensor, bits: int, zero_preserving: bool, per_channel: bool = False,
              n_nonzero: int | None = None) -> torch.Tensor:
    """Clip c (scalar, or [C, 1] per channel). Falls back to max|w| where c <= 0 or no coefficients are known.

    `n_nonzero`: statistics over the kept weights only when the tensor holds pruned zeros (choice: the zeros of a
    2:4 mask are not part of the weight distribution the grid must cover). Given as a count per row (or total).
    """
    sum_sq, sum_abs, absmax = kernels.abs_moments(w, per_channel)  # one pass: this runs every step, per weight
    coeffs = SAWB_COEFFS.get((bits, zero_preserving))
    if coeffs is None:
        # No published coefficients for this width: min-max (choice; at 8 bits clipping matters little).
        return absmax
    a, b = coeffs
    count = (w.shape[1] if per_channel else w.numel()) if n_nonzero is None else n_nonzero
    e2 = sum_sq / count
    e1 = sum_abs / count
    c = a * e2.sqrt() + b * e1
    return torch.where(c > 0, c, absmax)


def minmax_clip(w: torch.Tensor, per_channel: bool = False) -> torch.Tensor:
    return kernels.abs_moments(w, per_channel)[2]


def weight_clip(method: str, w: torch.Tensor, bits: int, zero_preserving: bool, per_channel: bool,
                n_nonzero: int | None = None) -> torch.Tensor:
    if method == "sawb":
        c = sawb_clip(w, bits, zero_preserving, per_channel, n_nonzero)
    elif method == "minmax":
        c = minmax_clip(w, per_channel)
    else:
        raise ValueError(f"unknown weight quantizer {method!r}")
    # An all-zero tensor (or row: a zero-initialised layer) has no range. Any positive clip puts it on code 0; a
    # clip of 0 gave a step of 0 and codes 0 * (1/0) = NaN.
    return torch.where(c > 0, c, 1.0)

