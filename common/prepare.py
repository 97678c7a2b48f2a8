"""prepare / calibrate / convert: turn a model into the compressed training model, and freeze it for inference."""
from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Iterable

import torch
from torch import nn

from . import int_matmul
from .attention import (AttentionQuantizers, is_timm_attention, timm_compressed_attention,
                        use_hf_compressed_attention)
from .fake_quant import act_qparams, dequantize_weight, quantize_act, quantize_weight_codes
from .linear import CompressedLinear, WeightQuantSpec, as_linear
from .pact import ActQuantizer, _act_forward_codes
from .plan import prepare_plan
from .recipe import Recipe


def _set_child(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)


def prepare(model: nn.Module, recipe: Recipe, masks: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """Swap the backbone's nn.Linear layers for CompressedLinear and quantize attention inputs, in place.

    N:M masks are computed here, once, from the weights the model holds now (so the stage's init checkpoint
    decides them), unless `masks` ({linear name: bool mask}, e.g. from a sparse checkpoint) gives them.
    transformers' Conv1D layers (GPT-2) become CompressedLinear too, their weight stored [out, in] from then on.
    Attention modules of a kind the compressed attention does not cover are an error (their matmuls would stay
    full precision) unless recipe.quantize_attention is False; the model is left as it was. `prepare_plan` says
    beforehand what this will do (common/plan.py).
    """
    if getattr(model, "compression_recipe", None) is not None:
        raise ValueError("model is already prepared; build a fresh model to prepare it with another recipe")
    # what can fail comes before the first module is swapped, so that a refusal leaves the model as it was: the plan
    # (unsupported attention, masks that do not fit their layers), then the attention switch (undone on error).
    # choice: layers are then swapped one at a time, not all built first (that would hold every backbone weight twice)
    todo = prepare_plan(model, recipe, masks)
    if todo.error():
        raise ValueError(f"prepare: {todo.error()}")
    if todo.attention:
        _switch_attention(model)
    masks = masks or {}
    nm = recipe.nm
    density = nm[0] / nm[1] if nm else 1.0
    for name in todo.compress:
        wspec = (WeightQuantSpec(recipe.w_bits, recipe.w_quantizer, recipe.zero_preserving, recipe.per_channel,
                                 density) if recipe.quantize_weights else None)
        aq = ActQuantizer(recipe.a_bits, recipe.a_quantizer, recipe.zero_preserving) if recipe.quantize_acts else None
        lin = as_linear(model.get_submodule(name))
        _set_child(model, name, CompressedLinear.from_linear(lin, wspec, aq, nm, masks.get(name)))
    for name in todo.separate_qkv_bias:
        model.get_submodule(name).qkv_bias_separate = True
    odd = todo.indivisible
    if odd:
        warnings.warn(f"prepare: {len(odd)} linears stay full precision, their input dimension not being a multiple "
                      f"of M in {recipe.sparsity}: {odd[:3]}{' ...' if len(odd) > 3 else ''}")
    if not todo.compress and recipe.compresses:
        warnings.warn("prepare: no nn.Linear outside the skip patterns was found; nothing was compressed")

    prob_bits = recipe.attn_prob_bits or recipe.a_bits
    for name in todo.attention:
        mod = model.get_submodule(name)
        quants = AttentionQuantizers(recipe.a_bits, prob_bits, recipe.a_quantizer, recipe.zero_preserving,
                                     recipe.attn_prob_quantizer)
        if is_timm_attention(mod):
            _set_child(model, name, timm_compressed_attention(mod, quants))
        else:
            mod.attn_quant = quants
    model.compression_recipe = recipe
    return model


def _switch_attention(model: nn.Module) -> None:
    """use_hf_compressed_attention, undone if it fails: every config the model's modules hold gets its attention
    implementation back (parents before their sub-configs, whose value a parent's setter overwrites)."""
    configs, seen = [], set()
    queue = [m.config for m in model.modules() if getattr(m, "config", None) is not None]
    while queue:
        cfg = queue.pop(0)
        if id(cfg) in seen or not hasattr(cfg, "_attn_implementation"):
            continue
        seen.add(id(cfg))
        configs.append((cfg, cfg._attn_implementation))
        queue += [getattr(cfg, k, None) for k in getattr(cfg, "sub_configs", {})]
    try:
        use_hf_compressed_attention(model)
    except BaseException:
        for cfg, impl in configs:
            cfg._attn_implementation = impl
        raise


def compressed_linears(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (CompressedLinear, FrozenCompressedLinear))}


def act_quantizers(model: nn.Module) -> dict[str, ActQuantizer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, ActQuantizer)}


def masks_of(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{linear name: mask} from a prepared model's state dict (to carry masks into the next stage)."""
    return {k[: -len(".mask")]: v.bool() for k, v in state_dict.items() if k.endswith(".mask")}


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable, percentile: float | None = None,
              forward=None, max_batches: int | None = None, micro_batch: int | None = None, device=None) -> int:
    """Initialise every activation clip from data before QAT: mean over batches of the per-batch percentiles
    (lo from 100-p, hi from p; percentile 100 = min/max). Activations are observed unquantized, weights quantized.

    `batches`: dicts (passed as **kwargs), tuples (*args) or tensors; `forward(model, batch)` overrides that.
    `micro_batch`: forward each batch in slices of that many samples (along dim 0 of its tensors) and take the
    percentiles over the whole batch, the same values one forward of it gives (up to float rounding), in less
    memory. So a pipeline calibrates on its global batch whatever its per-device batch. A quantizer called more
    than once per forward (shared layers, as in ALBERT) takes its percentiles over all it saw in the batch.
    `device`: move each slice's tensors there first (the batches may then stay on the CPU).
    Returns the number of batches used.
    """
    recipe = getattr(model, "compression_recipe", None)
    p = percentile if percentile is not None else (recipe.calib_percentile if recipe else 99.9)
    limit = max_batches if max_batches is not None else (recipe.calib_batches if recipe else None)
    quants = act_quantizers(model)
    if not quants:
        return 0
    was_training = model.training
    model.eval()
    for q in quants.values():
        q.observing = float(p)
    n = 0
    try:
        for batch in batches:
            if limit is not None and n >= limit:
                break
            for piece, where in _slices(batch, micro_batch):
                for q in quants.values():
                    q._piece = where
                if device is not None:
                    piece = _to(piece, device)
                if forward is not None:
                    forward(model, piece)
                elif isinstance(piece, Mapping):  # dicts and HF BatchEncoding
                    model(**piece)
                elif isinstance(piece, (tuple, list)):
                    model(*piece)
                else:
                    model(piece)
            for q in quants.values():
                q.end_batch()
            n += 1
    finally:
        for q in quants.values():
            q.observing, q._piece = False, None
    unseen = [name for name, q in quants.items() if not q.finish_calibration()]
    if n and unseen:
        warnings.warn(f"calibrate: {len(unseen)} activation quantizers saw no data, e.g. {unseen[:3]}")
    model.train(was_training)
    return n


def _map(batch, fn):
    """`fn` over the values of a batch given as a mapping or a tuple/list (mappings become dicts, tuples lists), or
    over the batch itself."""
    if isinstance(batch, Mapping):
        return {k: fn(v) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return [fn(v) for v in batch]
    return fn(batch)


def _to(batch, device):
    if isinstance(batch, (Mapping, tuple, list)):
        return _map(batch, lambda v: _to(v, device))
    return batch.to(device) if torch.is_tensor(batch) else batch


def _slices(batch, size: int | None):
    """Yield (slice of `batch`, (start, n, total)) over dim 0 of its tensors; the whole batch if `size` covers
    it or is None. Tensors of another leading size, and non-tensors, are passed to every slice whole."""
    items = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (tuple, list)) else [batch]
    total = next((v.shape[0] for v in items if torch.is_tensor(v) and v.dim() > 0), None)
    if size is None or total is None or total <= size:
        yield batch, None
        return

    def cut(v, a, b):
        return v[a:b] if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == total else v

    for a in range(0, total, size):
        b = min(a + size, total)
        yield _map(batch, lambda v: cut(v, a, b)), (a, b - a, total)


class FrozenCompressedLinear(nn.Module):
    """Inference form of CompressedLinear: integer weight codes + step (pruned positions are code 0 on the
    zero-preserving grid), the mask, and the frozen input quantizer. Same outputs as the prepared layer in eval."""

    def __init__(self, src: CompressedLinear):
        super().__init__()
        self.in_features, self.out_features = src.in_features, src.out_features
        self.nm = src.nm
        w = src.weight.detach() if src.mask is None else src.weight.detach() * src.mask
        self.w_bits = src.wspec.bits if src.wspec else 32
        self.zero_preserving = src.wspec.zero_preserving if src.wspec else True
        self.register_buffer("mask", None if src.mask is None else src.mask.clone())
        if src.wspec is not None:
            step = src.wspec.step(w)
            # the codes exactly as the prepared layer's forward makes them
            _, codes = quantize_weight_codes(w, step, self.w_bits, self.zero_preserving, values=False)
            self.register_buffer("weight_codes", codes)
            self.register_buffer("weight_step", step.detach().clone())
            self.weight = None
        else:
            self.register_buffer("weight", w.clone())
        self.register_buffer("bias", None if src.bias is None else src.bias.detach().clone())
        self.input_quant = src.input_quant
        if self.input_quant is not None:
            self.input_quant.freeze()

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, w_bits={self.w_bits}, nm={self.nm}"

    def effective_weight(self) -> torch.Tensor:
        if self.weight is not None:
            return self.weight
        return dequantize_weight(self.weight_codes, self.weight_step, self.zero_preserving)

    def forward(self, x):
        aq = self.input_quant
        if aq is not None and self.weight is None and int_matmul.usable(x, aq.bits, aq.zero_preserving, self.w_bits,
                                                                         self.zero_preserving):
            # as the prepared layer computes it (common.int_matmul), so that both give the same outputs
            _, _, _, codes, step, zp = _act_forward_codes(x, aq.lo, aq.hi, aq.bits, values=False)
            return int_matmul.int_linear(codes, step, zp, self.weight_codes, self.weight_step, self.bias)
        if aq is not None:
            scale, zp, _, _ = act_qparams(aq.lo, aq.hi, aq.bits, aq.zero_preserving)
            x = quantize_act(x, scale, zp, aq.bits, aq.zero_preserving)
        w = self.effective_weight()
        return nn.functional.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


@torch.no_grad()
def convert(model: nn.Module) -> nn.Module:
    """Freeze a prepared model for inference/export, in place: integer weight codes + steps, frozen clips."""
    if getattr(model, "compression_recipe", None) is None:
        raise ValueError("convert: the model was not prepared (common.prepare)")
    for name, mod in list(model.named_modules()):
        if isinstance(mod, CompressedLinear):
            _set_child(model, name, FrozenCompressedLinear(mod))
    for q in act_quantizers(model).values():
        if isinstance(q.hi, nn.Parameter):
            q.freeze()
    model.compression_converted = True
    return model.eval()
