"""common.int_matmul: the integer matmul is the exact product of the codes, the layers use it only where it is
exact, and it changes the forward only by float32 rounding and the backward not at all."""
import pytest
import torch

import common
from common import int_matmul
from common.linear import CompressedLinear, WeightQuantSpec
from common.pact import ActQuantizer


@pytest.fixture
def mode():
    old = int_matmul.int_matmul_mode()
    yield int_matmul.set_int_matmul
    int_matmul.set_int_matmul(old)


def test_exact_bounds():
    assert int_matmul.exact(4, 4, 10_000_000)
    assert not int_matmul.exact(4, 4, 30_000_000)  # the int32 sum could overflow
    assert not int_matmul.exact(8, 4, 64)          # 255-level activation codes do not fit int8
    assert not int_matmul.exact(4, 8, 64)          # int16 pair sums of AVX2 int8 kernels could saturate
    assert int_matmul.exact(7, 4, 64)


def test_int_linear_is_the_exact_integer_product():
    g = torch.Generator().manual_seed(0)
    xc = torch.randint(-15, 16, (3, 5, 96), dtype=torch.int8, generator=g)
    wc = torch.randint(-7, 8, (40, 96), dtype=torch.int8, generator=g)
    one = torch.tensor(1.0)
    exact = (xc.reshape(15, 96).long() @ wc.long().t()).reshape(3, 5, 40)
    assert torch.equal(int_matmul.int_linear(xc, one, wc, one, None), exact.float())
    sx, sw, bias = torch.tensor(0.37), torch.rand(40, 1) + 0.1, torch.randn(40)
    y = int_matmul.int_linear(xc, sx, wc, sw, bias)
    assert torch.equal(y, exact.float() * (sx * sw.reshape(1, -1)) + bias)
    ref = (xc.double() * 0.37) @ (wc.double() * sw.double()).t() + bias.double()
    torch.testing.assert_close(y, ref.float(), rtol=1e-5, atol=1e-5)


def _layer(per_channel=False, zero_preserving=True):
    torch.manual_seed(0)
    aq = ActQuantizer(4, "pact", zero_preserving)
    aq.lo.data.fill_(-1.5)
    aq.hi.data.fill_(2.0)
    wspec = WeightQuantSpec(4, per_channel=per_channel, zero_preserving=zero_preserving, density=0.5)
    return CompressedLinear.from_linear(torch.nn.Linear(64, 48), wspec, aq, (2, 4))


def _fwd_bwd(layer, x, gy):
    layer.zero_grad(set_to_none=True)
    xi = x.clone().requires_grad_(True)
    y = layer(xi)
    y.backward(gy)
    return y.detach(), xi.grad, layer.weight.grad, layer.bias.grad, layer.input_quant.lo.grad, \
        layer.input_quant.hi.grad


@pytest.mark.parametrize("per_channel", [False, True])
def test_layer_forward_rounds_differently_backward_is_identical(mode, per_channel):
    layer = _layer(per_channel)
    x, gy = torch.randn(2, 7, 64) * 1.5, torch.randn(2, 7, 48)
    mode("1")
    y_int, *g_int = _fwd_bwd(layer, x, gy)
    mode(False)
    y_fp, *g_fp = _fwd_bwd(layer, x, gy)
    assert torch.equal(y_fp, torch.nn.functional.linear(layer.input_quant(x), layer.effective_weight(), layer.bias))
    torch.testing.assert_close(y_int, y_fp, rtol=1e-5, atol=1e-5)
    for a, b in zip(g_int, g_fp):
        assert torch.equal(a, b)


def test_used_only_where_exact_and_asked(mode, monkeypatch):
    calls = []
    real = int_matmul.int_linear
    monkeypatch.setattr(int_matmul, "int_linear", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(4, 64)
    mode("1")
    _layer()(x)
    assert len(calls) == 1
    _layer(zero_preserving=False)(x)  # the plain grid has no integer codes
    layer = _layer()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer(x)
    layer.to(torch.float64)(x.double())
    assert len(calls) == 1
    mode("0")
    _layer()(x)
    assert len(calls) == 1


def test_prepared_and_converted_agree_in_both_modes(mode):
    for m in ("1", "0"):
        mode(m)
        model = common.prepare(torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.GELU(), torch.nn.Linear(32, 8)),
                               common.Recipe(quantize_attention=False, skip=[]))
        x = torch.randn(5, 64)
        common.calibrate(model, [x])
        model.eval()
        with torch.no_grad():
            a = model(x)
            b = common.convert(model)(x)
        assert torch.equal(a, b)


@pytest.mark.parametrize("caps,on", [({"avx2": True}, False), ({"avx2": True, "avx512_vnni": True}, True),
                                     ({"avx_vnni": True}, True), ({"amx_int8": True}, True)])
def test_auto_uses_it_only_with_an_int8_dot_product_instruction(mode, monkeypatch, caps, on):
    """Without VNNI/AMX, oneDNN's int8 matmul measured 21-27x slower than float32 (benchmarks/bench_int_matmul.py):
    auto leaves it off there; 1 forces it, 0 never."""
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: caps)
    # what the import reads, from the capabilities above; restored after
    monkeypatch.setattr(int_matmul, "_int8_dot", bool(int_matmul.int8_dot_instructions()))
    calls = []
    real = int_matmul.int_linear
    monkeypatch.setattr(int_matmul, "int_linear", lambda *a: calls.append(1) or real(*a))
    mode("auto")
    _layer()(torch.randn(4, 64))
    assert len(calls) == on and int_matmul.describe() == f"auto ({'on' if on else 'off'}: " \
        f"{'an' if on else 'no'} int8 dot-product instruction)"
    mode(True)
    _layer()(torch.randn(4, 64))
    assert len(calls) == on + 1 and int_matmul.describe() == "1"


def test_set_int_matmul_rejects_unknown_modes(mode):
    with pytest.raises(ValueError, match="expected one of"):
        mode("fast")


def test_activation_codes_are_the_fake_quant_grid():
    from common.fake_quant import act_qparams, quantize_act, quantize_act_codes
    x = torch.randn(3, 50) * 2
    scale, zp, _, _ = act_qparams(torch.tensor(-1.3), torch.tensor(2.1), 4, True)
    xq, k = quantize_act_codes(x, scale, zp, 4)
    assert torch.equal(xq, quantize_act(x, scale, zp, 4, True)) and k.dtype == torch.int8
    assert torch.equal(k.float() * scale, xq)  # codes with the zero point folded in, on the same grid
    assert int(k.min()) == -int(zp) and int(k.max()) == 15 - int(zp)  # x spans the clip range: both ends reached
    assert torch.equal(quantize_act_codes(x, scale, zp, 4, values=False)[1], k)


@pytest.mark.parametrize("int_mode", ["auto", False])
def test_output_may_be_modified_in_place_in_training(mode, int_mode):
    """Models add to a linear's output in place (timm's `qkv += qkv_bias`, ReLU(inplace=True)): the layer's output
    must be a tensor of its own, with the gradients of the out-of-place computation."""
    layer = _layer(False)
    mode(int_mode)
    x, b = torch.randn(2, 7, 64) * 1.5, torch.randn(48)
    grads = []
    for inplace in (True, False):
        layer.zero_grad()
        xi = x.clone().requires_grad_()
        y = layer(xi)
        if inplace:
            y += b
            y.relu_()
        else:
            y = (y + b).relu()
        y.pow(2).sum().backward()
        grads.append((y.detach(), xi.grad, layer.weight.grad, layer.input_quant.hi.grad))
    for a, c in zip(*grads):
        assert torch.equal(a, c)
