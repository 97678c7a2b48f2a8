"""Weights sharded by FSDP2 (`fully_shard`, the HF Trainer's default FSDP): its parameters are DTensors, each rank
holding a slice, while masks and other buffers stay whole on every rank. These helpers let the library's
weight-level operations (remasking after a load, the effective weight) work on either kind of tensor."""
from __future__ import annotations

import torch


def is_sharded(t: torch.Tensor) -> bool:
    # duck-typed, so that plain use never imports torch.distributed
    return hasattr(t, "device_mesh") and hasattr(t, "placements") and hasattr(t, "full_tensor")


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor. For a sharded one this is a collective: every rank must call it."""
    return t.full_tensor() if is_sharded(t) else t


def like(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """`t` (whole, the same on every rank, shaped like `ref`) laid out as `ref`: sharded the same way when `ref` is
    sharded, without communication (each rank takes its own slice)."""
    if not is_sharded(ref):
        return t
    from torch.distributed.tensor import distribute_tensor
    return distribute_tensor(t.to(ref.device), ref.device_mesh, ref.placements, src_data_rank=None)


def shard_frozen(module: torch.nn.Module, layer_cls_names, mp_policy=None) -> int:
    """`fully_shard` a frozen module (a KD teacher): each submodule whose class name is in `layer_cls_names`, then
    the module itself. Parameters are resharded after every forward: a module run under no_grad has no backward
    that would reshard them later. Returns the number of FSDP units."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    kw = dict(mp_policy=mp_policy or MixedPrecisionPolicy(), reshard_after_forward=True)
    names = set(layer_cls_names or ())
    units = [m for m in module.modules() if m is not module and type(m).__name__ in names]
    for m in units:
        fully_shard(m, **kw)
    fully_shard(module, **kw)
    return len(units) + 1


def local_fraction(module: torch.nn.Module) -> float:
    """The share of the module's parameters this rank holds (1.0 when nothing is sharded)."""
    local = sum((p.to_local() if is_sharded(p) else p).numel() for p in module.parameters())
    return local / max(1, sum(p.numel() for p in module.parameters()))
