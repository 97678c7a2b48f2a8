"""N:M fine-grained structured sparsity masks (paper: 2:4, 50%)."""
import torch


def nm_mask(weight: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """Bool mask keeping the `n` largest-|w| of every `m` consecutive weights along the input (last) dimension.

    Magnitude criterion and grouping along the input dimension follow NVIDIA's 2:4 layout (and IBM's library).
    Ties are broken by position (the earlier weight is kept), so the mask is deterministic.
    """
    in_f = weight.shape[-1]
    if in_f % m:
        raise ValueError(f"input dimension {in_f} is not a multiple of M={m}; cannot apply {n}:{m} sparsity")
    groups = weight.detach().abs().reshape(-1, m)
    # stable ordering: sort descending by magnitude, ties keep original order
    order = torch.sort(groups, dim=1, descending=True, stable=True).indices[:, :n]
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, order, True)
    return mask.reshape(weight.shape)


def check_nm(mask_or_weight: torch.Tensor, n: int = 2, m: int = 4) -> bool:
    """True when every group of m along the last dim has at most n nonzeros (for a mask: n Trues)."""
    g = (mask_or_weight.reshape(-1, m) != 0).sum(dim=1)
    return bool((g <= n).all())
