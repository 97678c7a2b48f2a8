"""Activation quantizers: PACT with learnable clips (Choi et al. 2018), its two-sided variant, PACT+, min-max.

One-sided PACT clamps to [0, alpha]; inputs that can be negative (after LayerNorm, Q/K/V, GELU's small negatives)
use the two-sided variant with learnable lo and hi. Whether a quantizer is signed is decided by calibration (the
observed minimum), or fixed at construction (softmax probabilities are never negative).
Gradients (straight-through estimator): x gets the upstream gradient inside [lo, hi]; hi gets it where x > hi, lo
where x < lo (PACT). PACT+ (IBM's LSQ-like variant) also gives hi/lo the rounding residual inside the range.
"""
from __future__ import annotations

import torch
from torch import nn

from . import kernels
from .fake_quant import act_qparams, quantize_act, quantize_act_codes


def _act_forward(x, lo, hi, bits, zero_preserving):
    scale, zp, lo_eff, hi_eff = act_qparams(lo, hi, bits, zero_preserving)
    return quantize_act(x, scale, zp, bits, zero_preserving), lo_eff, hi_eff


def _act_forward_codes(x, lo, hi, bits, values=True):
    """`_act_forward` on the zero-preserving grid, also giving the int8 codes (zero point folded in), the step and
    the zero point (for int_matmul); values=False: no float values (xq is None)."""
    scale, zp, lo_eff, hi_eff = act_qparams(lo, hi, bits, True)
    xq, codes = quantize_act_codes(x, scale, zp, bits, values)
    return xq, lo_eff, hi_eff, codes, scale, zp


def _act_backward(g, x, xq, lo_eff, hi_eff, want_lo, plus):
    """Gradients w.r.t. (x, lo, hi) of the STE, lo's only if `want_lo`. Shared by the standalone and the fused
    linear Functions, which ask for lo's exactly when it requires one: a one-sided quantizer's lo is fixed at 0 and
    not trained (`_sync_lo_trainable`), so the forward need not read the `signed` buffer, a tensor-to-bool read
    that would split a torch.compile'd model's graph at every quantizer."""
    gx, g_lo, g_hi, r = kernels.ste_backward(g, x, lo_eff, hi_eff, xq if plus else None, want_lo)
    if plus:  # rounding residual (xq - x)/(hi - lo): d xq / d hi inside the range (LSQ-like), minus that for lo
        r = r / (hi_eff - lo_eff)
        g_hi = g_hi + r
        if want_lo:
            g_lo = g_lo - r
    # in the clips' own shape (one element): autograd does not reduce a 0-dim sum to it
    return gx, None if g_lo is None else g_lo.reshape(lo_eff.shape), g_hi.reshape(hi_eff.shape)


class ActFakeQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, lo, hi, bits, zero_preserving, plus):
        xq, lo_eff, hi_eff = _act_forward(x, lo, hi, bits, zero_preserving)
        ctx.save_for_backward(x, xq if plus else None, lo_eff, hi_eff)
        ctx.plus = plus
        return xq

    @staticmethod
    def backward(ctx, g):
        x, xq, lo_eff, hi_eff = ctx.saved_tensors
        gx, g_lo, g_hi = _act_backward(g, x, xq, lo_eff, hi_eff, ctx.needs_input_grad[1], ctx.plus)
        return gx, g_lo, g_hi, None, None, None


class ActQuantizer(nn.Module):
    """Per-tensor activation fake-quantizer with clip range [lo, hi] (learnable for PACT, fixed for min-max).

    `observing=True` turns it into a pass-through that records statistics for `common.calibrate`.
    """

    def __init__(self, bits: int = 4, method: str = "pact", zero_preserving: bool = True, signed: bool | None = None,
                 init_range: tuple[float, float] = (-8.0, 8.0)):
        super().__init__()
        self.bits, self.method, self.zero_preserving = bits, method, zero_preserving
        learn = method in ("pact", "pact+")
        lo, hi = init_range if signed is not False else (0.0, init_range[1])
        # one-sided: lo is fixed at 0 and gets no gradient (marked so DDP does not wait for one). One-element
        # tensors, not 0-dim: FSDP2's fully_shard (the HF Trainer's default FSDP) refuses scalar parameters
        self.lo = nn.Parameter(torch.tensor([float(lo)]), requires_grad=learn and signed is not False)
        self.hi = nn.Parameter(torch.tensor([float(hi)]), requires_grad=learn)
        # persisted, so a reloaded model quantizes exactly as the trained one
        self.register_buffer("signed", torch.tensor(True if signed is None else bool(signed)))
        self.fixed_sign = signed is not None
        self.observing = False
        self._obs, self._pending, self._piece, self._pct = None, [], None, 99.9
        self.register_load_state_dict_pre_hook(_clips_as_1d)
        self.register_load_state_dict_post_hook(_sync_after_load)

    def extra_repr(self):
        return f"bits={self.bits}, method={self.method}, zero_preserving={self.zero_preserving}, " \
               f"signed={bool(self.signed)}, range=[{self.lo.item():.4g}, {self.hi.item():.4g}]"

    # -- calibration -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        """Keep a strided subsample (at most 2^18 values) of this piece of the calibration batch.

        `self._piece = (start, n, total)` (set by `common.calibrate`) says the piece holds samples [start,
        start + n) of a batch of `total`: the stride and phase are then those of the whole batch's flattened
        activation, so a batch observed in micro-batches keeps exactly the values one forward would keep."""
        flat = x.detach().reshape(-1).float()
        start, n, total = self._piece or (0, 1, 1)
        per = flat.numel() // n if flat.numel() % n == 0 else None  # batch-major layouts only
        whole, offset = (per * total, per * start) if per is not None else (flat.numel(), 0)
        stride = whole // (1 << 18) + 1 if whole > 1 << 18 else 1  # keeps percentile estimation cheap
        self._pending.append(flat[(-offset) % stride:: stride])
        # min/max takes the observed range (percentile 100), whatever percentile calibrate asks of the others
        self._pct = 100.0 if self.method == "minmax" else float(self.observing) if self.observing else 99.9

    @torch.no_grad()
    def end_batch(self) -> None:
        """Add the percentiles of the batch observed since the last call to the running sums."""
        if not self._pending:
            return
        flat = torch.cat(self._pending) if len(self._pending) > 1 else self._pending[0]
        self._pending, percentile = [], self._pct
        q = torch.tensor([1 - percentile / 100, percentile / 100], device=flat.device)
        p_lo, p_hi = torch.quantile(flat, q) if percentile < 100 else (flat.min(), flat.max())
        mn = flat.min()
        if self._obs is None:
            self._obs = [p_lo * 0, p_hi * 0, mn, 0]
        o = self._obs
        o[0], o[1], o[2], o[3] = o[0] + p_lo, o[1] + p_hi, torch.minimum(o[2], mn), o[3] + 1

    @torch.no_grad()
    def finish_calibration(self) -> bool:
        """Set the clips from the mean per-batch percentiles. Returns False if nothing was observed. (choice: the
        mean over batches of each batch's percentiles, on a strided subsample of at most 2^18 values per batch;
        the IBM library is known only to start the clips from the 0.1/99.9 percentiles of calibration data.)"""
        self.end_batch()
        if self._obs is None:
            return False
        s_lo, s_hi, mn, n = self._obs
        self._obs = None
        if not self.fixed_sign:
            self.signed.fill_(bool(mn < 0))
            _sync_lo_trainable(self)
        hi = max(float(s_hi / n), 1e-4)
        lo = min(float(s_lo / n), 0.0) if bool(self.signed) else 0.0
        if lo >= hi:
            lo = -hi
        self.lo.fill_(lo)
        self.hi.fill_(hi)
        return True

    # -- forward ---------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:  # the calibration percentile while calibrating, else False
            self.observe(x)
            return x
        return ActFakeQuant.apply(x, self.lo, self.hi, self.bits, self.zero_preserving, self.method == "pact+")

    def freeze(self) -> None:
        """Turn the clips into buffers (for `convert`): same values, no longer trainable."""
        for name in ("lo", "hi"):
            v = getattr(self, name).detach().clone()
            delattr(self, name)
            self.register_buffer(name, v)


def _sync_lo_trainable(q: ActQuantizer) -> bool:
    """lo is trained exactly when the quantizer is two-sided (and its clips are trained at all): after calibration,
    and after loading a state (a resumed checkpoint), so that the trainable parameters match the run that saved
    it (its optimizer state, and DDP without find_unused_parameters, rely on that). Returns whether it changed."""
    if not isinstance(q.lo, nn.Parameter) or q.fixed_sign or q.method == "minmax" or not q.hi.requires_grad:
        return False
    want = bool(q.signed)
    changed = q.lo.requires_grad != want
    q.lo.requires_grad_(want)
    return changed


def _clips_as_1d(module, state_dict, prefix, *args):
    # checkpoints written before the clips became one-element tensors hold them 0-dim
    for name in ("lo", "hi"):
        v = state_dict.get(prefix + name)
        if v is not None and v.dim() == 0:
            state_dict[prefix + name] = v.reshape(1)


def clip_state_as_1d(optimizer: torch.optim.Optimizer) -> None:
    """An optimizer's load_state_dict post-hook: state saved while the clips were 0-dim (momentum, Adam's moments)
    reshaped to the one-element clips, so that a run interrupted before that change resumes after it."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p)
            if state and p.shape == (1,):
                for k, v in state.items():
                    if k != "step" and torch.is_tensor(v) and v.dim() == 0:  # Adam's step counter is 0-dim
                        state[k] = v.reshape(1)


def _sync_after_load(module, incompatible_keys=None):
    _sync_lo_trainable(module)


def fix_one_sided_clips(model: nn.Module) -> int:
    """Sync every quantizer's trainable lo with its `signed` flag (see `_sync_lo_trainable`); call after something
    other than load_state_dict changed `signed`, e.g. a rank-0 broadcast. Returns how many were changed."""
    return sum(_sync_lo_trainable(q) for q in model.modules() if isinstance(q, ActQuantizer))
