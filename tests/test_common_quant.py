"""Quantizer math: bit-exact against PyTorch's reference fake-quant ops, level counts, zero handling, STE grads."""
import copy

import pytest
import torch

from common.fake_quant import (act_qparams, dequantize_weight, quantize_act, quantize_weight, quantize_weight_codes,
                               weight_codes, weight_step)
from common.linear import WeightQuantSpec
from common.pact import ActFakeQuant, ActQuantizer
from common.sawb import sawb_clip


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("bits", [4, 8])
def test_zero_preserving_weight_equals_reference(bits, per_channel):
    w = torch.randn(16, 32)
    clip = w.abs().amax(1, keepdim=True) * 0.7 if per_channel else w.abs().max() * 0.7
    step = weight_step(clip, bits, True)
    q = quantize_weight(w, step, bits, True)
    n = 2 ** (bits - 1) - 1
    if per_channel:
        ref = torch.fake_quantize_per_channel_affine(w, step.reshape(-1), torch.zeros(16, dtype=torch.int32), 0, -n, n)
    else:
        ref = torch.fake_quantize_per_tensor_affine(w, float(step), 0, -n, n)
    assert torch.equal(q, ref)
    for row in (q if per_channel else q.reshape(1, -1)):
        assert row.unique().numel() <= 2 ** bits - 1
    assert quantize_weight(torch.zeros(3), weight_step(torch.tensor(1.0), bits, True), bits, True).eq(0).all()


def test_plain_grid_has_16_levels_and_no_zero():
    w = torch.linspace(-2, 2, 1001)
    c = torch.tensor(1.5)
    s = weight_step(c, 4, False)
    q = quantize_weight(w, s, 4, False)
    levels = q.unique()
    assert levels.numel() == 16
    torch.testing.assert_close(levels, (torch.arange(-8, 8) + 0.5) * s)  # (k + 1/2)·2c/15 spans [-c, c]
    assert levels.abs().max().item() == pytest.approx(1.5)
    zero_out = quantize_weight(torch.zeros(1), s, 4, False)
    assert zero_out.item() != 0 and abs(zero_out.item()) == pytest.approx(1.5 / 15)  # pruned weight -> ±c/15


def test_weight_codes_roundtrip_bit_exact():
    for zp in (True, False):
        w = torch.randn(64, 64)
        s = weight_step(sawb_clip(w, 4, zp), 4, zp)
        q = quantize_weight(w, s, 4, zp)
        codes = weight_codes(q, s, zp)
        assert codes.dtype == torch.int8
        assert torch.equal(dequantize_weight(codes, s, zp), q)
        q2, codes2 = quantize_weight_codes(w, s, 4, zp)  # the training Function's one-pass version
        assert torch.equal(q2, q) and torch.equal(codes2, codes)


def test_sawb_formula_and_fallback():
    w = torch.randn(1000)
    c = sawb_clip(w, 4, True)
    expect = 12.035 * w.pow(2).mean().sqrt() - 12.03 * w.abs().mean()
    torch.testing.assert_close(c, expect)
    c_plain = sawb_clip(w, 4, False)
    torch.testing.assert_close(c_plain, 12.68 * w.pow(2).mean().sqrt() - 12.80 * w.abs().mean())
    # all |w| equal: 12.68 - 12.80 < 0 on the plain grid, so the clip falls back to max|w|
    const = torch.full((100,), 0.5)
    assert sawb_clip(const, 4, False).item() == 0.5
    assert sawb_clip(const, 4, True).item() == pytest.approx(0.5 * (12.035 - 12.03), rel=1e-3)  # float32 cancellation


@pytest.mark.parametrize("method", ["sawb", "minmax"])
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("zero_preserving", [True, False])
def test_all_zero_weights_quantize_to_finite_values(method, per_channel, zero_preserving):
    """A zero-initialised layer (or a zero row, per channel) has no weight range: its clip must still be positive,
    so that the prepared layer's outputs stay finite and convert's frozen codes give the same outputs."""
    from common.linear import CompressedLinear
    from common.prepare import FrozenCompressedLinear
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 4)
    with torch.no_grad():
        if per_channel:
            lin.weight[1] = 0
        else:
            lin.weight.zero_()
    spec = WeightQuantSpec(4, method, zero_preserving, per_channel, 0.5)
    cl = CompressedLinear.from_linear(lin, spec, ActQuantizer(4, "pact", True), (2, 4))
    x = torch.randn(3, 8)
    y = cl(x)
    assert torch.isfinite(y).all() and torch.isfinite(cl.effective_weight()).all()
    if zero_preserving:
        assert cl.effective_weight()[1].eq(0).all()
    torch.testing.assert_close(FrozenCompressedLinear(cl).eval()(x), cl.eval()(x), rtol=0, atol=0)


@pytest.mark.parametrize("lo,hi", [(0.0, 3.0), (-1.0, 2.0), (-0.37, 5.1)])
def test_zero_preserving_act_equals_reference_and_keeps_zero(lo, hi):
    x = torch.randn(1000) * 3
    scale, zp, _, _ = act_qparams(torch.tensor(lo), torch.tensor(hi), 4, True)
    assert float(zp) == round(float(zp))
    q = quantize_act(x, scale, zp, 4, True)
    ref = torch.fake_quantize_per_tensor_affine(x, float(scale), int(zp), 0, 15)
    assert torch.equal(q, ref)
    assert q.unique().numel() <= 16
    assert quantize_act(torch.zeros(5), scale, zp, 4, True).eq(0).all()


@pytest.mark.parametrize("lo,hi", [(0.5, 1.0), (-1.0, -0.5)])
def test_zero_preserving_act_range_keeps_zero_when_a_clip_crosses_it(lo, hi):
    """A trained clip may cross 0 (lo above it, hi below it): the zero-preserving grid then spans [0, hi] (or
    [lo, 0]), keeping 0 a level and clipping at the other clip, instead of shifting to [0, hi - lo]."""
    x = torch.cat([torch.linspace(-1.2, 1.2, 49), torch.zeros(1)])
    y = ActFakeQuant.apply(x, torch.tensor([lo]), torch.tensor([hi]), 4, True, False)
    a, b = min(lo, 0.0), max(hi, 0.0)
    ref = torch.fake_quantize_per_tensor_affine(x, (b - a) / 15, round(-a / ((b - a) / 15)), 0, 15)
    torch.testing.assert_close(y, ref, rtol=0, atol=0)
    assert y.min() == a and y.max() == b and y[-1] == 0


def test_plain_act_grid_moves_zero():
    scale, zp, _, _ = act_qparams(torch.tensor(-0.37), torch.tensor(5.1), 4, False)
    assert float(zp) != round(float(zp))
    assert quantize_act(torch.zeros(1), scale, zp, 4, False).item() != 0


def test_pact_gradients_by_hand():
    # one-sided PACT on [0, 2]: x inside gets g, x > 2 passes its g to alpha, x < 0 gets nothing; lo is fixed
    x = torch.tensor([-1.0, 0.5, 1.0, 3.0, 4.0], requires_grad=True)
    lo = torch.tensor(0.0)
    hi = torch.tensor(2.0, requires_grad=True)
    g = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    y = ActFakeQuant.apply(x, lo, hi, 4, True, False)
    y.backward(g)
    assert torch.equal(x.grad, torch.tensor([0.0, 2.0, 3.0, 0.0, 0.0]))
    assert hi.grad.item() == 9.0
    # lo gets its gradient exactly when it requires one (how a two-sided quantizer's lo is set up): x < lo
    lo.requires_grad_(True)
    ActFakeQuant.apply(x, lo, hi, 4, True, False).backward(g)
    assert lo.grad.item() == 1.0
    # two-sided: below lo passes to lo
    x2 = torch.tensor([-3.0, -0.5, 0.5, 3.0], requires_grad=True)
    lo2 = torch.tensor(-1.0, requires_grad=True)
    hi2 = torch.tensor(2.0, requires_grad=True)
    ActFakeQuant.apply(x2, lo2, hi2, 4, True, False).backward(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert torch.equal(x2.grad, torch.tensor([0.0, 2.0, 3.0, 0.0]))
    assert lo2.grad.item() == 1.0 and hi2.grad.item() == 4.0


def test_weight_ste_is_identity_inside_linear():
    from common.linear import CompressedLinear
    lin = torch.nn.Linear(8, 4)
    cl = CompressedLinear.from_linear(lin, WeightQuantSpec(4), None, None)
    x = torch.randn(3, 8)
    cl(x).sum().backward()
    # d/dW sum(x Wq^T) with identity STE = column sums of x, for every output row
    torch.testing.assert_close(cl.weight.grad, x.sum(0).expand(4, 8))


def test_calibration_sets_percentile_clips():
    q = ActQuantizer(4)
    q.observing = 99.0
    x = torch.arange(-100, 1001, dtype=torch.float32)
    q(x)
    q.observing = False
    assert q.finish_calibration()
    assert bool(q.signed)
    torch.testing.assert_close(q.hi.detach(), torch.quantile(x, 0.99).reshape(1))
    torch.testing.assert_close(q.lo.detach(), torch.quantile(x, 0.01).reshape(1))
    pos = ActQuantizer(4)
    pos.observing = 100.0
    pos(torch.rand(100))
    pos.observing = False
    pos.finish_calibration()
    assert not bool(pos.signed) and pos.lo.item() == 0.0


def test_minmax_calibrates_to_the_observed_range():
    """min/max takes the observed extremes whatever percentile calibrate asks for, and is not learned."""
    q = ActQuantizer(4, "minmax")
    q.observing = 99.0
    x = torch.arange(-100, 1001, dtype=torch.float32)
    q(x)
    q.observing = False
    assert q.finish_calibration()
    assert (q.lo.item(), q.hi.item()) == (-100.0, 1000.0) and not q.hi.requires_grad


def test_softmax_output_quantizer_is_a_recipe_choice():
    """attn_prob_quantizer: null follows a_quantizer (PACT, percentile clip); minmax (IBM's default, with 8 bits)
    keeps the whole observed probability range, so the largest probabilities are not cut."""
    import common
    from common.recipe import RecipeError
    from tiny_models import bert_batch, tiny_bert_qa
    clips = {}
    for which in (None, "minmax"):
        torch.manual_seed(0)
        model = common.prepare(tiny_bert_qa(), common.Recipe(attn_prob_quantizer=which, attn_prob_bits=8))
        common.calibrate(model, [bert_batch()], percentile=90.0)
        ps = [m.attn_quant.p for m in model.modules() if hasattr(m, "attn_quant")]
        assert ps and all(p.method == (which or "pact") and p.bits == 8 for p in ps)
        assert all(m.attn_quant.q.method == "pact" for m in model.modules() if hasattr(m, "attn_quant"))
        clips[which] = [p.hi.item() for p in ps]
    assert all(pct < mx <= 1.0 for pct, mx in zip(clips[None], clips["minmax"]))
    # 32 bits: the probabilities stay as they are (as 32 means off for w_bits and a_bits), in prepare and export
    torch.manual_seed(0)
    model = common.prepare(tiny_bert_qa(), common.Recipe(attn_prob_bits=32))
    assert all(m.attn_quant.p is None for m in model.modules() if hasattr(m, "attn_quant"))
    batch = bert_batch()
    common.calibrate(model, [batch])
    ref = model.eval()(**batch).start_logits
    torch.testing.assert_close(common.convert(model)(**batch).start_logits, ref, rtol=0, atol=0)
    with pytest.raises(RecipeError, match="attn_prob_quantizer"):
        common.Recipe(attn_prob_quantizer="lsq")


def test_clips_are_one_element_and_old_scalar_checkpoints_load():
    """FSDP2 refuses 0-dim parameters, so the clips have shape [1]; a checkpoint that stored them 0-dim (before
    that change) still loads, to the same values, and trains."""
    q = ActQuantizer(4)
    assert q.lo.shape == q.hi.shape == (1,)
    old = {"lo": torch.tensor(-1.5), "hi": torch.tensor(2.25), "signed": torch.tensor(True)}
    q.load_state_dict(old)
    assert q.lo.shape == (1,) and q.lo.item() == -1.5 and q.hi.item() == 2.25
    x = torch.linspace(-3, 3, 50, requires_grad=True)
    q(x).sum().backward()
    assert q.lo.grad.shape == q.hi.grad.shape == (1,) and q.lo.grad.item() != 0 and q.hi.grad.item() != 0


@pytest.mark.parametrize("opt_cls", [torch.optim.AdamW, torch.optim.SGD])
def test_optimizer_state_of_scalar_clips_resumes(opt_cls):
    """A run interrupted while the clips were 0-dim: its optimizer state (Adam's moments, SGD's momentum) is
    reshaped to the one-element clips on load (common.pact.clip_state_as_1d) and the next step equals the step
    the old state would have taken."""
    from common.pact import clip_state_as_1d
    kw = {"momentum": 0.9} if opt_cls is torch.optim.SGD else {}
    x = torch.linspace(-12, 12, 50)  # beyond the clips, so that they get gradients

    def step(q, opt):
        q(x).square().sum().backward()
        opt.step()
        opt.zero_grad()

    q = ActQuantizer(4)
    opt = opt_cls(q.parameters(), lr=0.1, **kw)
    step(q, opt)
    old_model = {k: v.clone().reshape(()) if k in ("lo", "hi") else v.clone() for k, v in q.state_dict().items()}
    old_opt = copy.deepcopy(opt.state_dict())  # state_dict() shares the live state dicts
    for st in old_opt["state"].values():
        for k, v in st.items():
            if k != "step":
                st[k] = v.reshape(())
    step(q, opt)  # what the run would have done next
    q2 = ActQuantizer(4)
    q2.load_state_dict(old_model)
    opt2 = opt_cls(q2.parameters(), lr=0.1, **kw)
    opt2.register_load_state_dict_post_hook(clip_state_as_1d)
    opt2.load_state_dict(old_opt)
    step(q2, opt2)
    assert torch.equal(q2.lo, q.lo) and torch.equal(q2.hi, q.hi)


def test_loaded_sign_decides_whether_lo_trains():
    """A resumed checkpoint's one-sided quantizers get no lo gradient, as after calibration (DDP, optimizer state)."""
    from common.pact import ActQuantizer, fix_one_sided_clips
    saved = ActQuantizer(4, "pact")
    saved.signed.fill_(False)
    fresh = ActQuantizer(4, "pact")
    assert fresh.lo.requires_grad
    fresh.load_state_dict(saved.state_dict())
    assert not fresh.lo.requires_grad and fresh.hi.requires_grad
    saved.signed.fill_(True)
    fresh.load_state_dict(saved.state_dict())
    assert fresh.lo.requires_grad
    fresh.signed.fill_(False)  # changed behind load_state_dict's back (a broadcast): the explicit sync
    assert fix_one_sided_clips(torch.nn.Sequential(fresh)) == 1 and not fresh.lo.requires_grad
    frozen = ActQuantizer(4, "pact")
    frozen.requires_grad_(False)  # a model frozen on purpose stays frozen
    frozen.load_state_dict(saved.state_dict())
    assert not frozen.lo.requires_grad


@pytest.mark.parametrize("size", [(16, 8), (256, 256)])  # the larger one runs the compiled kernels (auto mode)
@pytest.mark.parametrize("zp,per_channel", [(True, False), (False, False), (True, True)])
def test_compressed_linear_saves_int8_weight_codes_and_backprops_through_the_forward_weight(zp, per_channel, size):
    from common.linear import CompressedLinear
    torch.manual_seed(0)
    lin = torch.nn.Linear(*size)
    cl = CompressedLinear.from_linear(lin, WeightQuantSpec(4, zero_preserving=zp, per_channel=per_channel,
                                                           density=0.5), None, (2, 4))
    x = torch.randn(5, size[0], requires_grad=True)
    gy = torch.randn(5, size[1])
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = cl(x)
    # for the backward: int8 codes of the weight, no float copy of it (a quarter of the memory)
    assert [t.dtype for t in saved if t.shape == cl.weight.shape] == [torch.int8, torch.bool]  # codes, mask
    y.backward(gy)
    assert torch.equal(x.grad, gy @ cl.effective_weight())  # dequantized codes == the weight the forward used
    assert torch.equal(cl.weight.grad, (gy.t() @ x.detach()) * cl.mask)  # identity STE, masked
