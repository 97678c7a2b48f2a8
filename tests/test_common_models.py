"""prepare/convert on tiny BERT QA, Wav2Vec2 CTC and timm ViT built from configs (no downloads)."""
import copy

import pytest
import torch
from torch import nn

import common
from common.attention import is_hf_attention
from tiny_models import bert_batch, logits, tiny_bert_qa, tiny_vit, tiny_wav2vec2_ctc, to_device, wav_batch


CASES = {
    "bert": (tiny_bert_qa, bert_batch, {"embeddings", "qa_outputs"}),
    "wav2vec2": (tiny_wav2vec2_ctc, wav_batch, {"feature_projection", "lm_head"}),
    "vit": (tiny_vit, lambda: torch.randn(2, 3, 32, 32), {"head"}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_prepare_swaps_every_backbone_linear(name):
    build, batch_fn, skipped_parts = CASES[name]
    model = build()
    before = {n for n, m in model.named_modules() if type(m) is nn.Linear}
    recipe = common.Recipe()
    common.prepare(model, recipe)
    swapped = set(common.compressed_linears(model))
    expected = {n for n in before if not recipe.skips(n)}
    assert swapped == expected and len(swapped) >= 8  # q, k, v, o, ffn in / out per layer
    untouched = {n for n, m in model.named_modules() if type(m) is nn.Linear}
    assert untouched == before - expected
    assert all(any(p in n for p in skipped_parts) for n in untouched)
    n_attn = sum(1 for m in model.modules() if isinstance(m, common.AttentionQuantizers))
    assert n_attn == 2


@pytest.mark.parametrize("name", list(CASES))
def test_convert_equals_prepared_exactly(name, device):
    build, batch_fn, _ = CASES[name]
    model = common.prepare(build(), common.Recipe()).to(device)
    batch = to_device(batch_fn(), device)
    common.calibrate(model, [batch])
    model.eval()
    with torch.no_grad():
        a = logits(model, batch)
        common.convert(model)
        b = logits(model, batch)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    lin = next(iter(common.compressed_linears(model).values()))
    assert isinstance(lin, common.FrozenCompressedLinear) and lin.weight_codes.dtype == torch.int8
    assert lin.weight_codes.abs().max() <= 7 and lin.weight_codes[~lin.mask].eq(0).all()
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.endswith((".lo", ".hi")))


# batches big enough that some quantizer sees more than 2^18 values, so calibration subsamples them
BIG_BATCHES = {"bert": lambda: bert_batch(70, 64), "wav2vec2": lambda: wav_batch(9, 2610),
               "vit": lambda: torch.randn(250, 3, 32, 32)}


@pytest.mark.parametrize("name", list(CASES))
def test_calibration_in_micro_batches_equals_one_forward(name, device):
    """A pipeline calibrates on its global batch in slices of its per-device batch: the clips must not depend on
    the slicing (uneven slices too), or on where the strided subsample of a large activation falls. The batches
    stay on the CPU; `device=` moves each slice to the model's device."""
    build, _, _ = CASES[name]
    torch.manual_seed(0)
    base = build().eval()
    batches = [BIG_BATCHES[name]() for _ in range(2)]
    seen = []
    hook = lambda q, args: seen.append(args[0].numel())  # noqa: E731
    clips = {}
    for micro in (None, 2, 3):
        model = common.prepare(copy.deepcopy(base), common.Recipe()).to(device)
        handles = [q.register_forward_pre_hook(hook) for q in common.act_quantizers(model).values()]
        assert common.calibrate(model, batches, micro_batch=micro, device=device) == 2
        for h in handles:
            h.remove()
        clips[micro] = {n: torch.cat([q.lo, q.hi, q.signed[None].float()]).cpu()
                        for n, q in common.act_quantizers(model).items()}
    assert max(seen) > 1 << 18
    for micro in (2, 3):
        assert clips[micro].keys() == clips[None].keys()
        for n in clips[None]:
            torch.testing.assert_close(clips[micro][n], clips[None][n], rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.parametrize("name", list(CASES))
def test_attention_quantization_changes_output_and_gets_gradients(name, device):
    build, batch_fn, _ = CASES[name]
    base = build().eval()
    batch = to_device(batch_fn(), device)
    off = common.prepare(copy.deepcopy(base), common.Recipe(quantize_attention=False)).to(device)
    on = common.prepare(copy.deepcopy(base), common.Recipe(quantize_attention=True)).to(device)
    for m in (off, on):
        common.calibrate(m, [batch])
    with torch.no_grad():
        assert not torch.equal(logits(off.eval(), batch)[0], logits(on.eval(), batch)[0])
    on.train()
    logits(on, batch)[0].float().pow(2).mean().backward()
    aq = next(m for m in on.modules() if isinstance(m, common.AttentionQuantizers))
    assert aq.q.hi.grad is not None and aq.v.hi.grad is not None


def test_hf_attention_unquantized_path_equals_eager():
    base = tiny_bert_qa().eval()
    batch = bert_batch()
    ref = logits(base, batch)[0]
    m = common.prepare(copy.deepcopy(base), common.Recipe.none() if False else common.Recipe(
        w_bits=32, a_bits=32, sparsity=None, quantize_attention=False))
    torch.testing.assert_close(logits(m, batch)[0], ref)
    # the registered function with no quantizers attached must equal the eager path
    from common.attention import register_hf_attention
    register_hf_attention()
    m2 = copy.deepcopy(base)
    m2.set_attn_implementation("compressed")
    torch.testing.assert_close(logits(m2, batch)[0], ref, atol=1e-5, rtol=1e-5)
    assert any(is_hf_attention(x) for x in base.modules())


def test_timm_explicit_path_equals_fused_when_unquantized():
    from common.attention import timm_compressed_attention
    base = tiny_vit().eval()
    x = torch.randn(2, 3, 32, 32)
    ref = base(x)
    m = copy.deepcopy(base)
    for blk in m.blocks:
        blk.attn = timm_compressed_attention(blk.attn, None)
    torch.testing.assert_close(m(x), ref, atol=1e-5, rtol=1e-5)
    assert set(m.state_dict()) == set(base.state_dict())


def test_prepare_twice_and_no_attention_errors():
    m = common.prepare(tiny_bert_qa(), common.Recipe())
    with pytest.raises(ValueError, match="already prepared"):
        common.prepare(m, common.Recipe())
    with pytest.raises(ValueError, match="no supported attention"):
        common.prepare(nn.Sequential(nn.Linear(8, 8)), common.Recipe(skip=[]))


def test_summary_reports_16x():
    m = common.prepare(tiny_bert_qa(), common.Recipe())
    s = common.compression_summary(m)
    assert s["bits_per_backbone_weight"] == 2.0 and s["compression_ratio"] == 16.0
    s8 = common.compression_summary(common.prepare(tiny_bert_qa(), common.Recipe(sparsity=None)))
    assert s8["compression_ratio"] == 8.0


@pytest.mark.parametrize("name", list(CASES))
def test_compiled_kernels_train_like_eager(name, device):
    """W4A4+2:4 with quantized attention, forward and backward, compiled kernels (forced for these tiny tensors)
    vs eager: the same outputs and gradients (up to the order of additions in the SAWB and clip sums)."""
    from common import kernels
    build, batch_fn, _ = CASES[name]
    torch.manual_seed(0)
    model = common.prepare(build(), common.Recipe()).to(device)
    batch = to_device(batch_fn(), device)
    common.calibrate(model, [batch])
    model.train()
    results = []
    old = kernels.compile_mode()
    try:
        for mode in ("1", "0"):
            kernels.set_compile(mode)
            model.zero_grad(set_to_none=True)
            torch.manual_seed(1)  # the same dropout masks
            out = logits(model, batch)[0]
            out.float().pow(2).mean().backward()
            results.append((out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                           if p.grad is not None}))
    finally:
        kernels.set_compile(old)
    (out1, g1), (out0, g0) = results
    torch.testing.assert_close(out1, out0, rtol=1e-5, atol=1e-6)
    assert g1.keys() == g0.keys() and any(n.endswith(".hi") for n in g1)
    for n in g1:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("name", list(CASES))
def test_bf16_autocast_training_steps(name, device):
    """Mixed-precision fine-tuning (Trainer's bf16=true): the compressed forward and backward run under autocast,
    the masks hold and the activation clips train."""
    build, batch_fn, _ = CASES[name]
    model = common.prepare(build(), common.Recipe()).to(device)
    batch = to_device(batch_fn(), device)
    common.calibrate(model, [batch])
    model.train()
    lins = common.compressed_linears(model)
    masks = {n: lin.mask.clone() for n, lin in lins.items()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(3):
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = logits(model, batch)[0]
        loss = out.float().pow(2).mean()
        loss.backward()
        assert torch.isfinite(loss)
        assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
        opt.step()
    for n, lin in lins.items():
        assert torch.equal(lin.mask, masks[n]) and lin.weight[~lin.mask].eq(0).all()
    hi = [m.hi for m in model.modules() if isinstance(m, common.ActQuantizer)]
    assert hi and any(h.grad is not None and h.grad.ne(0).any() for h in hi)
