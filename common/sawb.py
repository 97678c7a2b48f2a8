"""SAWB: statistics-aware weight binning (Choi et al. 2018), the weight clip used by the paper's group (IBM).

c = a*sqrt(E[w^2]) + b*E[|w|], per tensor or per output channel, recomputed every training step.
"""
from __future__ import annotations

import torch

# Published 4-bit coefficients (a, b) for the plain 16-level grid and for the zero-aligned 15-level grid.
SAWB_COEFFS = {(4, False): (12.68, -12.80), (4, True): (12.035, -12.03)}


def sawb_clip(w: torch.Tensor, bits: int, zero_preserving: bool, per_channel: bool = False,
              n_nonzero: int | None = None) -> torch.Tensor:
    """Clip c (scalar, or [C, 1] per channel). Falls back to max|w| where c <= 0 or no coefficients are known.

    `n_nonzero`: statistics over the kept weights only when the tensor holds pruned zeros (choice: the zeros of a
    2:4 mask are not part of the weight distribution the grid must cover). Given as a count per row (or total).
    """
    dims = (1,) if per_channel else None
    absmax = w.abs().amax(dim=1, keepdim=True) if per_channel else torch.stack(torch.aminmax(w)).abs().max()
    coeffs = SAWB_COEFFS.get((bits, zero_preserving))
    if coeffs is None:
        # No published coefficients for this width: min-max (choice; at 8 bits clipping matters little).
        return absmax
    a, b = coeffs
    if dims is None:
        count = w.numel() if n_nonzero is None else n_nonzero
        e2 = torch.linalg.vector_norm(w).square() / count  # one pass, no temporary (this runs every step)
        e1 = w.abs().sum() / count
    else:
        count = w.shape[1] if n_nonzero is None else n_nonzero
        e2 = w.square().sum(dim=1, keepdim=True) / count
        e1 = w.abs().sum(dim=1, keepdim=True) / count
    c = a * e2.sqrt() + b * e1
    return torch.where(c > 0, c, absmax)


def minmax_clip(w: torch.Tensor, per_channel: bool = False) -> torch.Tensor:
    return w.abs().amax(dim=1, keepdim=True) if per_channel else w.abs().max()


def weight_clip(method: str, w: torch.Tensor, bits: int, zero_preserving: bool, per_channel: bool,
                n_nonzero: int | None = None) -> torch.Tensor:
    if method == "sawb":
        return sawb_clip(w, bits, zero_preserving, per_channel, n_nonzero)
    if method == "minmax":
        return minmax_clip(w, per_channel)
    raise ValueError(f"unknown weight quantizer {method!r}")

