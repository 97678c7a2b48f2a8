"""common.int_matmul: the integer matmul is the exact product of the codes (with either kernel), the layers use it
only where it is exact, and it changes the forward only by float32 rounding and the backward not at all."""
import pytest
import torch

import common
from common import int_matmul
from common.linear import CompressedLinear, WeightQuantSpec
from common.pact import ActQuantizer


# both kernels on any CPU where they run (the slow one only at the tests' tiny shapes); oneDNN's quantized linear
# needs x86 AVX2 and a torch built with oneDNN
KERNELS = ["int_mm", pytest.param("onednn", marks=pytest.mark.skipif(
    not int_matmul.onednn_qlinear_usable(), reason="no AVX2 CPU with oneDNN's quantized linear"))]


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


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("zp", [0, 6, 15])
def test_int_linear_is_the_exact_integer_product(mode, kernel, zp):
    """4-bit activation codes with their zero point folded in (k - zp for k in 0..15, both ends present) times 4-bit
    weight codes (-7..7), the extreme ones included (the largest products and sums)."""
    mode(kernel)
    g = torch.Generator().manual_seed(0)
    xc = torch.randint(-zp, 16 - zp, (3, 5, 96), dtype=torch.int8, generator=g)
    xc[0, 0], xc[0, 1] = -zp, 15 - zp
    wc = torch.randint(-7, 8, (40, 96), dtype=torch.int8, generator=g)
    wc[0], wc[1] = 7, -7
    one, z = torch.tensor(1.0), torch.tensor(float(zp))
    exact = (xc.reshape(15, 96).long() @ wc.long().t()).reshape(3, 5, 40)
    assert torch.equal(int_matmul.int_linear(xc, one, z, wc, one, None), exact.float())
    sx, sw, bias = torch.tensor(0.37), torch.rand(40, 1) + 0.1, torch.randn(40)
    y = int_matmul.int_linear(xc, sx, z, wc, sw, bias)
    if kernel == "int_mm":  # ours: the sum, one multiply, the bias; oneDNN's rounds in its own order
        assert torch.equal(y, exact.float() * (sx * sw.reshape(1, -1)) + bias)
    ref = (xc.double() * 0.37) @ (wc.double() * sw.double()).t() + bias.double()
    torch.testing.assert_close(y, ref.float(), rtol=1e-5, atol=1e-5)
    ref = (xc.double() * 0.37) @ (wc.double() * sw[0].double()).t()  # one weight step for all rows
    torch.testing.assert_close(int_matmul.int_linear(xc, sx, z, wc, sw[0], None), ref.float(), rtol=1e-5, atol=1e-5)


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


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("per_channel", [False, True])
def test_layer_forward_rounds_differently_backward_is_identical(mode, per_channel, kernel):
    layer = _layer(per_channel)
    x, gy = torch.randn(2, 7, 64) * 1.5, torch.randn(2, 7, 48)
    mode(kernel)
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


@pytest.mark.parametrize("kernel", [*KERNELS, "0"])
def test_prepared_and_converted_agree_in_every_mode(mode, kernel):
    mode(kernel)
    model = common.prepare(torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.GELU(), torch.nn.Linear(32, 8)),
                           common.Recipe(quantize_attention=False, skip=[]))
    x = torch.randn(5, 64)
    common.calibrate(model, [x])
    model.eval()
    with torch.no_grad():
        a = model(x)
        b = common.convert(model)(x)
    assert torch.equal(a, b)


@pytest.mark.parametrize("caps,kernel,why", [
    ({"avx2": True, "avx512_vnni": True}, "int_mm", "int_mm: an int8 dot-product instruction"),
    ({"avx_vnni": True}, "int_mm", "int_mm: an int8 dot-product instruction"),
    ({"amx_int8": True}, "int_mm", "int_mm: an int8 dot-product instruction"),
    ({"avx2": True}, "onednn", "onednn: AVX2, no int8 dot-product instruction"),
    ({"sve": True}, None, "off: neither an int8 dot-product instruction nor AVX2 with oneDNN")])
def test_auto_picks_the_kernel_measured_faster_on_this_cpu(mode, monkeypatch, caps, kernel, why):
    """torch._int_mm where there is an int8 dot-product instruction (without one it measured 21-27x slower than
    float32, benchmarks/bench_int_matmul.py), oneDNN's quantized linear on AVX2 without one, none elsewhere; 1 forces
    the kernel auto picks (torch._int_mm where auto has none), 0 never."""
    if kernel == "onednn" and not int_matmul.onednn_qlinear_usable():
        pytest.skip("no AVX2 CPU with oneDNN's quantized linear to run it")
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: caps)
    # what the import reads, from the capabilities above; restored after
    monkeypatch.setattr(int_matmul, "_int8_dot", bool(int_matmul.int8_dot_instructions()))
    monkeypatch.setattr(int_matmul, "_avx2_onednn", int_matmul.onednn_qlinear_usable())
    calls = []
    real = int_matmul.int_linear
    monkeypatch.setattr(int_matmul, "int_linear", lambda *a: calls.append(int_matmul.kernel()) or real(*a))
    mode("auto")
    _layer()(torch.randn(4, 64))
    assert calls == ([kernel] if kernel else []) and int_matmul.describe() == f"auto ({why})"
    mode(True)
    _layer()(torch.randn(4, 64))
    assert calls[-1] == (kernel or "int_mm") and int_matmul.describe() == f"1 ({kernel or 'int_mm'})"
    mode(False)
    _layer()(torch.randn(4, 64))
    assert len(calls) == 1 + bool(kernel) and int_matmul.describe() == "0"


@pytest.mark.parametrize("kernel", KERNELS)
def test_onednn_gives_way_inside_torch_compile(mode, kernel):
    """Inductor lowers oneDNN's quantized linear only for a weight packed once (a graph constant), and ours is packed
    at every step: inside a torch.compile'd model the layers take the float32 matmul instead; int_mm stays."""
    mode(kernel)
    x = torch.zeros(2, 64)
    fn = torch.compile(lambda t: t + 1 if int_matmul.usable(t, 4, True, 4, True) else t - 1, backend="eager",
                       fullgraph=True)
    assert int_matmul.usable(x, 4, True, 4, True)
    assert float(fn(x)[0, 0]) == (1.0 if kernel == "int_mm" else -1.0)


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


@pytest.mark.parametrize("int_mode", [*KERNELS, False])
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
