"""common.kernels: the compiled kernels compute what their eager definitions compute, in every layout."""
import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common import int_matmul, kernels
from common.linear import CompressedLinear, WeightQuantSpec
from common.pact import ActQuantizer


@pytest.fixture
def mode():
    """Restores the compile mode a test changed."""
    old = kernels.compile_mode()
    yield kernels.set_compile
    kernels.set_compile(old)


def both(mode, fn):
    """fn() with compilation forced on, then off."""
    mode(True)
    compiled = fn()
    mode(False)
    return compiled, fn()


def T(v, device):
    return torch.tensor(v, device=device)


def layouts(device="cpu"):
    g = torch.Generator().manual_seed(0)
    base = (torch.randn(2, 5, 3, 8, generator=g) * 3).to(device)
    return {"contiguous": base, "transposed": base.transpose(1, 2), "permuted": base.permute(3, 1, 0, 2),
            "sliced": base[:, 1:4, :, ::2], "2d": base.reshape(30, 8), "scalar": base[0, 0, 0, 0]}


@pytest.mark.parametrize("layout", list(layouts()))
def test_fake_quant_exact_in_every_layout(mode, layout, device):
    x = layouts(device)[layout]
    s = T(0.37, device)
    args = (x, 1.0 / s, s, T(-7.0, device), T(7.0, device))
    got, ref = both(mode, lambda: kernels.fake_quant(*args))
    assert torch.equal(got, ref)
    assert torch.equal(ref, torch.clamp(torch.round(x * (1.0 / s)), -7, 7) * s)
    if layout != "sliced":  # a permuted dense block keeps its strides, as eager pointwise ops do
        assert got.stride() == x.stride()


@pytest.mark.parametrize("layout", ["contiguous", "permuted", "sliced", "2d"])
def test_fake_quant_codes_are_the_fake_quant_values_as_int8(mode, layout, device):
    x = layouts(device)[layout]
    s = T(0.37, device)
    args = (x, 1.0 / s, s, T(-7.0, device), T(7.0, device))
    (wq, codes), (wq_ref, codes_ref) = both(mode, lambda: kernels.fake_quant_codes(*args))
    assert torch.equal(wq, wq_ref) and torch.equal(codes, codes_ref)
    assert torch.equal(wq, kernels.fake_quant(*args))
    assert codes.dtype == torch.int8 and torch.equal(codes * s, wq)
    if layout != "sliced":
        assert codes.stride() == x.stride()


def test_fake_quant_per_row(mode, device):
    w = torch.randn(6, 10, device=device)
    s = torch.rand(6, 1, device=device) + 0.1
    got, ref = both(mode, lambda: kernels.fake_quant(w, 1.0 / s, s, T(-7.0, device), T(7.0, device)))
    assert torch.equal(got, ref)


@pytest.mark.parametrize("layout", ["contiguous", "transposed", "sliced"])
@pytest.mark.parametrize("plus", [False, True])
def test_ste_backward_matches_eager(mode, layout, plus, device):
    x = layouts(device)[layout]
    g = torch.randn(x.shape, device=device).contiguous()  # the incoming gradient laid out unlike x
    lo, hi = T(-2.0, device), T(2.5, device)
    xq = x.clamp(-2.0, 2.5).round() if plus else None
    got, ref = both(mode, lambda: kernels.ste_backward(g, x, lo, hi, xq, want_lo=True))
    assert torch.equal(got[0], ref[0])
    for a, b in zip(got[1:], ref[1:]):
        if b is None:
            assert a is None
        else:
            torch.testing.assert_close(a, b)  # sums: the order of additions may differ
    inside = (x >= lo) & (x <= hi)
    assert torch.equal(ref[0], torch.where(inside, g, 0))
    torch.testing.assert_close(ref[2], g[x > hi].sum())
    torch.testing.assert_close(ref[1], g[x < lo].sum())
    assert kernels.ste_backward(g, x, lo, hi, None, want_lo=False)[1] is None


@pytest.mark.parametrize("per_row,layout", [(False, "contiguous"), (False, "transposed"), (False, "long rows"),
                                            (False, "1d"), (False, "scalar"), (True, "contiguous")])
def test_abs_moments(mode, per_row, layout, device):
    w = torch.randn(12, 40, device=device)
    # the whole-tensor sums go over rows in memory order: a transposed weight (GPT-2's Conv1D), rows longer than
    # inductor's 4096-value chunk, and tensors without rows
    w = {"contiguous": w, "transposed": w.t(), "long rows": torch.randn(3, 5000, device=device), "1d": w.reshape(-1),
         "scalar": w[0, 0]}[layout]
    got, ref = both(mode, lambda: kernels.abs_moments(w, per_row))
    dims = dict(dim=1, keepdim=True) if per_row else {}
    expect = ((w * w).sum(**dims), w.abs().sum(**dims), w.abs().amax(**dims))
    for a, b, e in zip(got, ref, expect):
        torch.testing.assert_close(a, e)
        torch.testing.assert_close(b, e)


def test_compressed_linear_same_compiled_or_not(mode, device):
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 8)
    aq = ActQuantizer(4, "pact")
    aq.lo.data.fill_(-1.5)
    aq.hi.data.fill_(1.5)
    layer = CompressedLinear.from_linear(lin, WeightQuantSpec(4, density=0.5), aq, (2, 4)).to(device)
    x = torch.randn(3, 5, 16, device=device) * 2

    def run():
        layer.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        y = layer(xi)
        y.square().sum().backward()
        return y.detach(), xi.grad, layer.weight.grad, aq.lo.grad, aq.hi.grad

    (y1, *g1), (y0, *g0) = both(mode, run)
    assert torch.equal(y1, y0)
    assert torch.equal(g1[0], g0[0]) and torch.equal(g1[1], g0[1])
    torch.testing.assert_close(g1[2], g0[2])
    torch.testing.assert_close(g1[3], g0[3])


def test_compile_failure_falls_back_with_a_warning(mode, monkeypatch):
    def broken_compile(fn, **kw):
        def run(*a):
            raise RuntimeError("no C++ compiler here")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    k = kernels._Kernel(kernels._fake_quant)
    args = (torch.randn(kernels.AUTO_MIN_NUMEL), torch.tensor(2.0), torch.tensor(0.5), torch.tensor(-7.0),
            torch.tensor(7.0))
    mode("1")
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler"):
        k(*args)
    k = kernels._Kernel(kernels._fake_quant)
    mode("auto")
    with pytest.warns(RuntimeWarning, match="compiling _fake_quant failed.*COMMON_COMPILE=0"):
        out = k(*args)
    assert torch.equal(out, kernels._fake_quant(*args))
    assert k._broken  # no second attempt
    k(*args)
    small = kernels._Kernel(kernels._fake_quant)  # auto: small tensors stay eager, nothing is compiled
    small(torch.randn(5), *args[1:])
    assert small._compiled is None


def test_set_compile_rejects_unknown_modes(mode):
    with pytest.raises(ValueError, match="expected one of"):
        mode("sometimes")


@pytest.mark.parametrize("var,what", [("COMMON_COMPILE", "compile"), ("COMMON_INT_MATMUL", "integer matmul")])
def test_bad_environment_mode_is_named(var, what):
    r = subprocess.run([sys.executable, "-c", "import common"], cwd=Path(__file__).resolve().parents[1],
                       env={**os.environ, var: "sometimes"}, capture_output=True, text=True)
    assert r.returncode != 0 and f"{var}: {what} mode 'sometimes'" in r.stderr


@pytest.mark.parametrize("layout", ["contiguous", "permuted", "sliced"])
def test_quant_codes_are_fake_quant_codes_codes(mode, layout, device):
    x = layouts(device)[layout]
    s = T(0.37, device)
    lo, hi = T(-7.0, device), T(7.0, device)
    got, ref = both(mode, lambda: kernels.quant_codes(x, 1.0 / s, lo, hi))
    assert torch.equal(got, ref) and got.dtype == torch.int8
    assert torch.equal(ref, kernels.fake_quant_codes(x, 1.0 / s, s, lo, hi)[1])


@pytest.mark.parametrize("dtype", [torch.bool, torch.float32])
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_mask_in_place(mode, dtype, layout, device, monkeypatch):
    monkeypatch.setattr(kernels, "CPU_MASK_CHUNK", 64)  # 480 values: 7 whole chunks and a part on CPU
    g0 = torch.randn(12, 40, device=device)
    mask = torch.rand(12, 40, device=device) > 0.5
    if layout == "transposed":  # not laid out alike: the eager fallback
        g0, mask = g0.t(), mask.t()
    expect = torch.where(mask, g0, 0)
    for m in (True, False):
        mode(m)
        g = g0.clone()
        out = kernels.mask_(g, mask.to(dtype))
        assert out is g and torch.equal(g, expect)


@pytest.mark.parametrize("int_mm", ["auto, off", "int_mm", pytest.param("onednn", marks=pytest.mark.skipif(
    not int_matmul.onednn_qlinear_usable(), reason="no AVX2 CPU with oneDNN's quantized linear"))])
def test_a_compressed_block_compiles_as_one_graph(monkeypatch, int_mm):
    """A user's torch.compile(model, fullgraph=True) over compressed linears and quantized attention: no graph
    break, and the outputs and gradients of eager execution, also after a second batch size has made dynamo
    recompile with dynamic shapes (checked on BERT and ViT too, by hand: 65-85 s of compiling). What used to break
    it: the `signed` buffer read in the forward, the CPU's capabilities traced through a cache, `_Flat` sorting
    symbolic strides. With the float32 matmul as `auto` picks it on a CPU that has no fast integer kernel (the
    capabilities read as constants), and with each integer kernel forced: `onednn` gives way to the float32 matmul
    in the compiled model (inductor takes oneDNN's quantized linear only with a weight packed once), within float
    rounding of the eager model's."""
    from common.attention import AttentionQuantizers, attention_core
    monkeypatch.setattr(int_matmul, "_mode", int_mm.split(",")[0])
    monkeypatch.setattr(int_matmul, "_int8_dot", False)
    monkeypatch.setattr(int_matmul, "_avx2_onednn", False)
    H, D = 2, 8

    class Block(torch.nn.Module):  # timm's ViT attention in miniature: fused qkv, q/k/v views of it, projection
        def __init__(self):
            super().__init__()
            spec = WeightQuantSpec(4, density=0.5)
            self.qkv = CompressedLinear.from_linear(torch.nn.Linear(H * D, 3 * H * D), spec, ActQuantizer(4), (2, 4))
            self.proj = CompressedLinear.from_linear(torch.nn.Linear(H * D, H * D), spec, ActQuantizer(4), (2, 4))
            self.attn_quant = AttentionQuantizers(4, 4, "pact", True)
            for q in (self.qkv.input_quant, self.proj.input_quant, self.attn_quant.q, self.attn_quant.k):
                q.lo.data.fill_(-2.0)
                q.hi.data.fill_(2.0)
            # one-sided like calibration leaves ReLU outputs and probabilities: lo fixed at 0, no gradient
            self.attn_quant.v.signed.fill_(False)
            self.attn_quant.v.lo.data.fill_(0.0)
            self.attn_quant.v.lo.requires_grad_(False)

        def forward(self, x):
            B, N, _ = x.shape
            q, k, v = self.qkv(x).reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)
            o, _ = attention_core(q, k, v.relu(), None, D ** -0.5, 0.0, False, self.attn_quant)
            return self.proj(o.transpose(1, 2).reshape(B, N, H * D))

    eager = Block()
    compiled = copy.deepcopy(eager)
    # aot_eager: dynamo's capture and AOTAutograd's tracing of forward and backward, where graph breaks and
    # untraceable code show, without inductor's C++ build (tens of seconds here, and torch's to test)
    fn = torch.compile(compiled, fullgraph=True, backend="aot_eager")
    for batch in (2, 3):
        x = torch.randn(batch, 5, H * D)
        for m in (eager, compiled):
            m.zero_grad(set_to_none=True)
        y0, y1 = eager(x), fn(x)
        y0.square().sum().backward()
        y1.square().sum().backward()
        torch.testing.assert_close(y1, y0)
        grads = {n: p.grad for n, p in compiled.named_parameters()}
        for n, p in eager.named_parameters():
            if p.requires_grad:
                torch.testing.assert_close(grads[n], p.grad, msg=n)
            else:
                assert grads[n] is None and p.grad is None, n
        assert eager.qkv.weight.grad[~eager.qkv.mask].abs().sum() == 0  # pruned weights get no gradient
