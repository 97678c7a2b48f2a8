"""common.prepare on architectures users bring besides the paper's three: tiny models built from configs (no
downloads), one per attention / linear flavour the library has to get right."""
import copy
import json
import math
import re
import warnings

import pytest
import torch
from torch import nn

import common
from common.export import export_model, load_compressed
from tiny_models import logits, to_device

V = 100  # vocabulary of the tiny text models
SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=V)
SEQ2SEQ = dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
               encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=V)


def _text(b=2, seq=12, decoder=False):
    batch = dict(input_ids=torch.randint(3, V, (b, seq)), attention_mask=torch.ones(b, seq, dtype=torch.long))
    batch["attention_mask"][-1, seq - 4:] = 0  # padding, so the mask path is exercised
    if decoder:
        batch["decoder_input_ids"] = torch.randint(3, V, (b, 5))
    return batch


def _build(name):
    """(model, batch, number of backbone linears, names that must stay full precision)."""
    import transformers as T
    if name == "distilbert":  # q_lin/k_lin/v_lin, pre_classifier head
        cfg = T.DistilBertConfig(dim=32, n_layers=2, n_heads=4, hidden_dim=64, vocab_size=V)
        return T.DistilBertForSequenceClassification(cfg), _text(), 12, {"pre_classifier", "classifier"}
    if name == "roberta":  # classification head with its own dense layer
        return T.RobertaForSequenceClassification(T.RobertaConfig(**SMALL)), _text(), 12, {
            "classifier.dense", "classifier.out_proj"}
    if name == "gpt2":  # transformers Conv1D layers, fused c_attn, causal mask
        cfg = T.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=V)
        return T.GPT2LMHeadModel(cfg), _text(), 8, {"lm_head"}
    if name == "llama":  # grouped-query attention, RoPE, causal mask, untied LM head
        cfg = T.LlamaConfig(num_key_value_heads=2, tie_word_embeddings=False, **SMALL)
        return T.LlamaForCausalLM(cfg), _text(), 14, {"lm_head"}
    if name == "gemma2":  # attention logit soft-capping, sliding-window layers
        cfg = T.Gemma2Config(num_key_value_heads=2, head_dim=8, attn_logit_softcapping=0.5, sliding_window=4,
                             **SMALL)
        model = T.Gemma2ForSequenceClassification(cfg)
        with torch.no_grad():  # scores of a few units, so that the cap bends them (at init they are ~1e-3)
            for layer in model.model.layers:
                layer.self_attn.q_proj.weight.mul_(30)
                layer.self_attn.k_proj.weight.mul_(30)
        return model, _text(), 14, {"score"}
    if name == "t5":  # relative position bias (position_bias), unscaled scores, encoder-decoder
        cfg = T.T5Config(d_model=32, d_ff=64, num_layers=2, num_heads=4, d_kv=8, vocab_size=V)
        return T.T5ForConditionalGeneration(cfg), _text(decoder=True), 32, {"lm_head"}
    if name == "bart":  # encoder-decoder with cross-attention, classification head (at each row's one <eos>)
        batch = _text()
        batch["input_ids"][:, -1] = 2
        batch["input_ids"][-1, -5], batch["input_ids"][-1, -4:] = 2, 1  # the padded row: <eos>, then <pad>
        return T.BartForSequenceClassification(T.BartConfig(**SEQ2SEQ)), batch, 32, {
            "classification_head.dense", "classification_head.out_proj"}
    if name == "whisper":  # LM head called proj_out: found as the output embeddings
        cfg = T.WhisperConfig(num_mel_bins=16, max_source_positions=16, pad_token_id=1, bos_token_id=1,
                              eos_token_id=2, decoder_start_token_id=1, **SEQ2SEQ)
        batch = dict(input_features=torch.randn(2, 16, 32), decoder_input_ids=torch.randint(3, V, (2, 5)))
        return T.WhisperForConditionalGeneration(cfg), batch, 32, {"proj_out"}
    if name == "deit_distilled":  # timm, two heads
        import timm
        m = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, img_size=32, patch_size=8,
                              embed_dim=32, depth=2, num_heads=4, num_classes=10)
        return m, torch.randn(2, 3, 32, 32), 8, {"head", "head_dist"}
    if name == "swin":  # timm WindowAttention: relative position bias, shifted-window mask, patch merging
        import timm
        m = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=32, patch_size=4,
                              window_size=4, embed_dim=16, depths=(2, 2), num_heads=(2, 4), num_classes=10)
        return m, torch.randn(2, 3, 32, 32), 17, {"head.fc"}  # 2 stages x 2 blocks x 4, + the merging reduction
    if name in ("beit", "eva02"):  # q/v biases, own + shared relative position bias (BEiT); RoPE, SwiGLU (EVA-02)
        import timm
        kw = dict(use_rel_pos_bias=True, use_shared_rel_pos_bias=True) if name == "beit" else {}
        m = timm.create_model({"beit": "beit_base_patch16_224", "eva02": "eva02_tiny_patch14_224"}[name],
                              pretrained=False, img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4,
                              num_classes=10, **kw)
        with torch.no_grad():  # biases are zero and scores ~0 at init, which would hide a bias or RoPE left out
            for n, p in m.named_parameters():
                if n.endswith(("q_bias", "v_bias", "relative_position_bias_table")):
                    p.normal_()
            for blk in m.blocks:
                blk.attn.qkv.weight.mul_(20)
        # BEiT: qkv, proj, fc1, fc2 per block; EVA-02: qkv, proj, its SwiGLU's fused fc1 (fc2 takes 85 inputs: FP)
        return m, torch.randn(2, 3, 32, 32), 8 if name == "beit" else 6, {"head"}
    if name == "vit_rope":  # timm AttentionRope: rotary embedding on the patch tokens
        import timm
        m = timm.create_model("vit_base_patch16_rope_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                              depth=2, num_heads=4, num_classes=10)
        with torch.no_grad():  # scores ~0 at init would hide RoPE left out
            for blk in m.blocks:
                blk.attn.qkv.weight.mul_(20)
        return m, torch.randn(2, 3, 32, 32), 8, {"head"}
    raise KeyError(name)


TIMM_ARCHS = ["deit_distilled", "swin", "beit", "eva02", "vit_rope"]
ARCHS = ["distilbert", "roberta", "gpt2", "llama", "gemma2", "t5", "bart", "whisper"] + TIMM_ARCHS
HF_ARCHS = [a for a in ARCHS if a not in TIMM_ARCHS]
# EVA-02's and Swin-V2's narrow linears stay full precision with a warning (tested where it is the point)
pytestmark = pytest.mark.filterwarnings(r"ignore:prepare. \d+ linears stay full precision")


def _run(model, batch):
    return logits(model, batch)[0]


@pytest.mark.parametrize("name", ARCHS)
def test_prepare_compresses_the_backbone_and_quantizes_every_attention(name, device, eager_quantizers):
    model, batch, n_backbone, heads = _build(name)
    common.prepare(model, common.Recipe()).to(device)
    batch = to_device(batch, device)
    lin = common.compressed_linears(model)
    assert len(lin) == n_backbone, sorted(lin)
    kept = {n for n, m in model.named_modules() if type(m) is nn.Linear}
    assert heads <= kept and not heads & set(lin)
    for m in lin.values():
        assert common.check_nm(m.weight, 2, 4) and m.weight.shape == (m.out_features, m.in_features)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="calibrate")  # every quantizer must see data
        common.calibrate(model, [batch])
    model.train()
    _run(model, batch).float().pow(2).mean().backward()
    attn = [m for m in model.modules() if isinstance(m, common.AttentionQuantizers)]
    assert attn and all(a.q.hi.grad is not None and a.p.hi.grad is not None for a in attn)  # all of them ran
    model.eval()
    with torch.no_grad():
        a = _run(model, batch)
        common.convert(model)
        assert torch.equal(a, _run(model, batch))


@pytest.mark.parametrize("name", HF_ARCHS)
def test_compressed_attention_function_equals_the_models_eager_attention(name):
    """With no quantizers attached, the registered "compressed" function must compute the model's own eager
    attention: GQA, RoPE, causal and sliding masks, T5's position bias, Gemma-2's soft-capping, cross-attention."""
    from common.attention import register_hf_attention
    model, batch, _, _ = _build(name)
    model.eval().set_attn_implementation("eager")
    with torch.no_grad():
        ref = _run(model, batch)
        register_hf_attention()
        model.set_attn_implementation("compressed")
        torch.testing.assert_close(_run(model, batch), ref, atol=1e-5, rtol=1e-5)


def test_conv1d_layers_compute_what_they_computed():
    """GPT-2's Conv1D (x·W + b, W stored [in, out]) becomes a CompressedLinear holding Wᵀ: with every compression
    off the model's outputs are unchanged, and the 2:4 mask runs along the input dimension as for nn.Linear."""
    model, batch, _, _ = _build("gpt2")
    model.eval()
    ref = _run(model, batch)
    w = model.transformer.h[0].mlp.c_fc.weight.detach().clone()  # [in, out]
    off = common.prepare(copy.deepcopy(model), common.Recipe(w_bits=32, a_bits=32, sparsity=None,
                                                             quantize_attention=False))
    torch.testing.assert_close(_run(off, batch), ref, atol=1e-5, rtol=1e-5)
    on = common.prepare(copy.deepcopy(model), common.Recipe(w_bits=32, a_bits=32, quantize_attention=False))
    fc = on.transformer.h[0].mlp.c_fc
    assert torch.equal(fc.mask, common.nm_mask(w.t(), 2, 4)) and torch.equal(fc.weight, w.t() * fc.mask)


@pytest.mark.parametrize("name", ARCHS)
def test_export_and_reload_bit_exactly(name, tmp_path, eager_quantizers):
    """The compressed checkpoint of each architecture reloads to the same outputs (float32 storage): HF models are
    rebuilt from the file alone (GPT-2's Conv1D prepared again), timm ones into a given model."""
    model, batch, _, _ = _build(name)
    common.prepare(model, common.Recipe())
    common.calibrate(model, [batch])
    common.convert(model)
    with torch.no_grad():
        ref = _run(model, batch)
    export_model(model, tmp_path / "m.c16.safetensors", dtype=torch.float32)
    timm_model = name in TIMM_ARCHS
    back = load_compressed(tmp_path / "m.c16.safetensors", model=_build(name)[0] if timm_model else None)
    with torch.no_grad():
        assert torch.equal(_run(back, batch), ref)


@pytest.mark.parametrize("name", ["swin", "beit", "eva02", "vit_rope"])
def test_timm_explicit_paths_equal_timms_own(name):
    """Each compressed timm attention with no quantizers computes timm's own: Swin's shifted windows (its second
    block), BEiT's relative position bias and q/v biases, EVA-02's and ViT-RoPE's rotary embedding."""
    from common.attention import is_timm_attention, timm_compressed_attention
    model, x, _, _ = _build(name)
    model.eval()
    ref = model.forward_features(x)  # the head's init is near zero: its output would hide differences
    swapped = 0
    for n, m in list(model.named_modules()):
        if is_timm_attention(m):
            parent, _, attr = n.rpartition(".")
            setattr(model.get_submodule(parent), attr, timm_compressed_attention(m, None))
            swapped += 1
    assert swapped == (4 if name == "swin" else 2)
    if name == "swin":
        assert model.layers[0].blocks[1].attn_mask is not None  # the shifted block's mask is exercised
    torch.testing.assert_close(model.forward_features(x), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["deberta_v2", "swinv2"])
def test_attention_of_an_unsupported_kind_is_an_error_that_names_it(name):
    import transformers as T
    if name == "deberta_v2":  # disentangled attention, not through the attention interface
        build = lambda: T.DebertaV2ForSequenceClassification(T.DebertaV2Config(**SMALL))
        want = r"deberta\.encoder\.layer\.0\.attention\.self \(.*DisentangledSelfAttention\)"
    else:
        import timm
        build = lambda: timm.create_model("swinv2_tiny_window8_256", pretrained=False, img_size=32, patch_size=4,
                                          window_size=4, embed_dim=16, depths=(2, 2), num_heads=(2, 4),
                                          num_classes=10)
        want = r"layers\.0\.blocks\.0\.attn \(timm\.models\.swin_transformer_v2\.WindowAttention\)"
    model = build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=want + r".*quantize_attention: false"):
        common.prepare(model, common.Recipe())
    assert not common.compressed_linears(model) and getattr(model, "compression_recipe", None) is None  # untouched
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    model = common.prepare(build(), common.Recipe(quantize_attention=False))  # the linears alone still work
    assert len(common.compressed_linears(model)) >= 8
    assert not any(isinstance(m, common.AttentionQuantizers) for m in model.modules())


def test_sinks_and_sparse_indices_are_refused_not_dropped():
    from common.attention import hf_compressed_attention
    q = torch.randn(1, 4, 3, 8)
    module = nn.Module()
    module.sinks = nn.Parameter(torch.zeros(4))  # gpt-oss keeps them on the module
    with pytest.raises(NotImplementedError, match=r"sinks \(module attribute\)"):
        hf_compressed_attention(module, q, q, q, None)
    plain = nn.Module()
    for kw in ("sinks", "s_aux", "indices", "block_indices"):
        with pytest.raises(NotImplementedError, match=f"'{kw}'"):
            hf_compressed_attention(plain, q, q, q, None, **{kw: torch.zeros(1, dtype=torch.int32)})
    assert hf_compressed_attention(plain, q, q, q, None, indices=None)[0].shape == (1, 3, 4, 8)  # None: no effect


def test_output_embeddings_stay_full_precision_unless_asked():
    model, _, n_backbone, _ = _build("whisper")
    common.prepare(model, common.Recipe(keep_output_embeddings=False, quantize_attention=False))
    assert len(common.compressed_linears(model)) == n_backbone + 1 and "proj_out" in common.compressed_linears(model)
    with pytest.raises(common.RecipeError, match="keep_output_embeddings"):
        common.Recipe(keep_output_embeddings="yes")


def _describe(capsys, *argv):
    from common.describe import main
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_describe_prints_what_prepare_will_do_without_the_weights(tmp_path, capsys):
    model, _, _, _ = _build("gpt2")
    model.save_pretrained(tmp_path / "gpt2")
    for f in (tmp_path / "gpt2").glob("*.safetensors"):
        f.unlink()  # only config.json is read
    rc, out, _ = _describe(capsys, "--hf", str(tmp_path / "gpt2"), "--json")
    plan = json.loads(out)
    assert rc == 0 and plan["summary"]["compressed_linears"] == 8 and plan["summary"]["error"] is None
    assert plan["keep"] == {"lm_head": "skip: matches 'lm_head'"}
    assert plan["compress"]["transformer.h.0.attn.c_attn"] == [96, 32]  # [out, in] of the Conv1D's [32, 96]
    assert plan["summary"]["value_bits_per_weight"] == 2.0 and len(plan["attention"]) == 2  # the paper's count
    assert 2.6 < plan["summary"]["bits_per_backbone_weight"] < 2.8  # the file's: codes, index and scales
    prepared = common.prepare(_build("gpt2")[0], common.Recipe())  # the same layers as prepare compresses
    assert set(common.compressed_linears(prepared)) == set(plan["compress"])
    rc, out, _ = _describe(capsys, "--timm", "vit_tiny_patch16_224", "sparsity=null")
    assert rc == 0 and "blocks.*.attn.qkv" in out and "x12" in out
    assert "4.0003 bits each in the exported file (codes, index, scales), 7.9994x vs fp32; values alone 4 bits, 8x" \
        in out


def test_describe_names_what_it_cannot_cover_and_bad_input(tmp_path, capsys):
    import transformers as T
    T.DebertaV2ForSequenceClassification(T.DebertaV2Config(**SMALL)).save_pretrained(tmp_path / "deberta")
    rc, out, _ = _describe(capsys, "--hf", str(tmp_path / "deberta"))
    assert rc == 1 and "prepare would fail" in out and "deberta.encoder.layer.*.attention.self" in out
    rc, out, _ = _describe(capsys, "--hf", str(tmp_path / "deberta"), "quantize_attention=false")
    assert rc == 0 and "quantized attention (0 modules)" in out
    rc, _, err = _describe(capsys, "--hf", str(tmp_path / "deberta"), "sparsity=3:2")
    assert rc == 2 and "'sparsity'" in err
    rc, _, err = _describe(capsys, "--hf", str(tmp_path / "missing"))
    assert rc == 2 and "cannot build" in err and "missing" in err


@pytest.mark.parametrize("name", ["beit", "eva02"])
def test_timm_qv_bias_attention_runs_its_compressed_qkv(name, eager_quantizers):
    """With its attention left as timm's (quantize_attention: false), BEiT / EVA compute F.linear(x, qkv.weight,
    q/v bias) themselves; prepare makes them add the bias after qkv, so the compressed qkv runs (its input quantizer
    sees data) and, with compression off, nothing changes."""
    model, x, _, _ = _build(name)
    model.eval()
    assert model.blocks[0].attn.q_bias is not None and not model.blocks[0].attn.qkv_bias_separate
    ref = model.forward_features(x)
    off = common.prepare(copy.deepcopy(model), common.Recipe(w_bits=32, a_bits=32, sparsity=None,
                                                             quantize_attention=False))
    assert off.blocks[0].attn.qkv_bias_separate
    torch.testing.assert_close(off.forward_features(x), ref, atol=1e-5, rtol=1e-5)
    if name == "eva02":  # its SwiGLU's fc2 takes 85 inputs: no 2:4 groups, so it stays whole, with a warning
        with pytest.warns(UserWarning, match=r"2 linears stay full precision.*blocks\.0\.mlp\.fc2"):
            on = common.prepare(copy.deepcopy(model), common.Recipe(quantize_attention=False))
        assert type(on.blocks[0].mlp.fc2) is nn.Linear
    else:
        on = common.prepare(copy.deepcopy(model), common.Recipe(quantize_attention=False))
    assert "blocks.0.attn.qkv" in common.compressed_linears(on)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="calibrate")
        common.calibrate(on, [x])


@pytest.mark.parametrize("name", ARCHS)
def test_bf16_autocast_training_step(name, device, eager_quantizers):
    """Mixed precision (Trainer's bf16=true) through each architecture's compressed attention and linears: finite
    loss and gradients, and every attention quantizer's clip gets one."""
    model, batch, _, _ = _build(name)
    common.prepare(model, common.Recipe()).to(device)
    batch = to_device(batch, device)
    common.calibrate(model, [batch])
    model.train()
    with torch.autocast(device.type, dtype=torch.bfloat16):
        out = _run(model, batch)
    loss = out.float().pow(2).mean()
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
    attn = [m for m in model.modules() if isinstance(m, common.AttentionQuantizers)]
    assert attn and all(a.q.hi.grad is not None and a.p.hi.grad is not None for a in attn)


def test_linear_subclasses_are_listed_not_swapped():
    """nn.MultiheadAttention multiplies its out_proj's weight itself: swapping that NonDynamicallyQuantizableLinear
    would be bypassed, so it is kept, and said so; a plain nn.Linear beside it is compressed."""
    model = nn.ModuleDict({"mha": nn.MultiheadAttention(16, 2), "fc": nn.Linear(16, 16)})
    plan = common.prepare_plan(model, common.Recipe(quantize_attention=False))
    assert list(plan.compress) == ["fc"]
    assert plan.keep == {"mha.out_proj": "NonDynamicallyQuantizableLinear, a subclass of nn.Linear: not swapped"}
    with pytest.raises(ValueError, match=r"mha \(torch\.nn\.modules\.activation\.MultiheadAttention\)"):
        common.prepare(model, common.Recipe())  # torch's own attention is not covered: named, not skipped


# What prepare would do to full-size models from their default configs (built on the meta device: no weights, a
# few seconds for all): accepted, or refused with the attention classes it names ("" = no attention it knows of).
HF_PLANS = {"accepted": ["bert", "roberta", "xlm-roberta", "distilbert", "albert", "electra", "mobilebert", "layoutlm",
                         "modernbert", "gpt2", "gpt_neox", "opt", "llama", "mistral", "mixtral", "qwen2", "qwen3",
                         "phi", "phi3", "gemma", "gemma2", "gemma3_text", "t5", "mt5", "bart", "mbart", "pegasus",
                         "marian", "whisper", "wav2vec2", "hubert", "wav2vec2-conformer", "sew", "data2vec-audio",
                         "vit", "deit", "swin", "dinov2", "vit_mae", "clip_vision_model", "siglip_vision_model",
                         "beit", "segformer", "yolos"],
            "refused": {"mpnet": "MPNetSelfAttention", "deberta": "DisentangledSelfAttention",
                        "deberta-v2": "DisentangledSelfAttention",
                        "longformer": "LongformerSelfAttention", "big_bird": "BigBirdBlockSparseAttention",
                        "convbert": "ConvBertSelfAttention", "gptj": "GPTJAttention", "bloom": "BloomAttention",
                        "falcon": "FalconAttention", "wavlm": "WavLMAttention", "swinv2": "Swinv2SelfAttention",
                        "mobilevit": "MobileViTSelfAttention", "xlnet": "", "convnext": ""}}
TIMM_PLANS = {"accepted": ["vit_base_patch16_224", "vit_base_patch16_siglip_224", "vit_base_patch16_clip_224",
                           "vit_small_patch14_dinov2", "vit_base_patch16_reg4_gap_256", "deit3_base_patch16_224",
                           "deit_base_distilled_patch16_224", "swin_base_patch4_window7_224", "beitv2_base_patch16_224",
                           "eva02_base_patch14_224", "flexivit_small", "vit_base_patch16_rope_224"],
              "refused": {"cait_s24_224": "ClassAttn TalkingHeadAttn", "swinv2_tiny_window8_256": "WindowAttention",
                          "crossvit_small_240": "CrossAttention",
                          "maxvit_tiny_tf_224": "AttentionCl", "convit_base": "GPSA MHSA", "convnext_tiny": "",
                          "xcit_tiny_12_p16_224": "ClassAttn XCA"}}  # XCA, GPSA, MHSA: found by their q/k/v


def _meta_plan(source, name):
    from common.describe import build_on_meta
    if source == "hf":
        import transformers
        with torch.device("meta"):
            model = transformers.AutoModel.from_config(transformers.AutoConfig.for_model(name))
    else:
        model = build_on_meta(timm_name=name)
    return common.prepare_plan(model, common.Recipe())


@pytest.mark.parametrize("source,plans", [("hf", HF_PLANS), ("timm", TIMM_PLANS)])
def test_which_full_size_models_prepare_accepts(source, plans):
    for name in plans["accepted"]:
        plan = _meta_plan(source, name)
        assert plan.error() is None and plan.attention and len(plan.compress) >= 4, name  # ALBERT shares 1 layer
    for name, cls in plans["refused"].items():
        plan = _meta_plan(source, name)
        assert plan.error() is not None, name
        assert {c.rsplit(".", 1)[1] for _, c in plan.unsupported} == set(cls.split()), name


def test_hf_attention_without_readable_source_falls_back_to_projection_names(monkeypatch):
    import inspect
    from common import attention
    model, _, _, _ = _build("llama")
    attn = model.model.layers[0].self_attn
    assert attention.is_hf_attention(attn)
    attention._calls_attention_interface.cache_clear()

    def no_source(obj):
        raise OSError("could not get source code")
    monkeypatch.setattr(inspect, "getsource", no_source)
    try:
        assert attention.is_hf_attention(attn)  # q_proj / k_proj / v_proj
        assert not attention.is_hf_attention(model.model.layers[0].mlp)
    finally:
        attention._calls_attention_interface.cache_clear()


def test_compression_trainer_on_a_causal_lm(tmp_path, eager_quantizers):
    """The HF Trainer path on a model unlike the paper's: GPT-2 (Conv1D, causal LM) fine-tuned a few steps with
    CompressionTrainer's distillation and the scheduled-dropout callback; padding left out of the KD term."""
    from torch.utils.data import Dataset
    from transformers import TrainingArguments
    from common.hf import CompressionTrainer, ScheduledDropoutCallback

    class Tokens(Dataset):
        def __init__(self):
            self.rows = [_text(b=1) for _ in range(8)]

        def __len__(self):
            return len(self.rows)

        def __getitem__(self, i):
            r = {k: v[0] for k, v in self.rows[i].items()}
            return {**r, "labels": r["input_ids"].masked_fill(r["attention_mask"] == 0, -100)}

    model, _, _, _ = _build("gpt2")
    teacher = copy.deepcopy(model)
    common.prepare(model, common.Recipe())
    common.calibrate(model, [_text()])
    masks = {n: m.mask.clone() for n, m in common.compressed_linears(model).items()}
    clip = model.transformer.h[0].attn.attn_quant.q.hi
    clip0 = clip.detach().clone()
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=2, learning_rate=1e-3,
                             report_to="none", save_strategy="no", use_cpu=True, logging_steps=1)
    trainer = CompressionTrainer(model=model, args=args, train_dataset=Tokens(),
                                 distiller=common.DistillationLoss(teacher, lam=0.5, temperature=2.0),
                                 kd_mask_fn=lambda m, inputs, out: inputs["attention_mask"].bool(),
                                 callbacks=[ScheduledDropoutCallback("linear")])
    result = trainer.train()
    assert result.global_step == 4 and math.isfinite(result.training_loss)
    for n, m in common.compressed_linears(model).items():
        assert torch.equal(m.mask, masks[n]) and m.weight[~m.mask].eq(0).all()
    assert not torch.equal(clip.detach(), clip0)  # the attention's clips trained


# Task heads that transformers names otherwise than the paper's models (tiny configs, random init): the default skip
# keeps them full precision. {name: (builder, heads)}; every other compressed linear lies in a numbered layer (stack
# entry `.N.`), but for the few input projections listed in BODY_EXTRA.
_E = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
_IMG = dict(image_size=32, patch_size=8, **_E)
_AUDIO = dict(conv_dim=(16, 16), conv_kernel=(10, 4), conv_stride=(5, 4), num_conv_pos_embeddings=16,
              num_conv_pos_embedding_groups=4, classifier_proj_size=16, **_E)


def _head_models():
    import transformers as T
    detr = dict(use_timm_backbone=False, use_pretrained_backbone=False, d_model=32, encoder_layers=1, decoder_layers=1,
                encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                num_queries=5, backbone_config=T.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                                              out_features=["stage2"]))
    seg = dict(num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[16, 32], patch_sizes=[7, 3],
               strides=[4, 2], num_attention_heads=[1, 2], mlp_ratios=[2, 2], decoder_hidden_size=32)
    levit = dict(image_size=32, hidden_sizes=[16, 32, 48], num_attention_heads=[1, 2, 3], depths=[1, 1, 1],
                 key_dim=[8, 8, 8])
    mae = dict(decoder_hidden_size=32, decoder_num_hidden_layers=1, decoder_num_attention_heads=4,
               decoder_intermediate_size=64)
    return {
        "deit_teacher": (lambda: T.DeiTForImageClassificationWithTeacher(T.DeiTConfig(num_labels=3, **_IMG)),
                         {"cls_classifier", "distillation_classifier"}),
        "levit_teacher": (lambda: T.LevitForImageClassificationWithTeacher(T.LevitConfig(num_labels=3, **levit)),
                          {"classifier.linear", "classifier_distill.linear"}),
        "yolos": (lambda: T.YolosForObjectDetection(T.YolosConfig(num_detection_tokens=5,
                                                                  **{**_IMG, "image_size": [32, 32]})),
                  {f"{h}.layers.{i}" for h in ("class_labels_classifier", "bbox_predictor") for i in range(3)}),
        "detr": (lambda: T.DetrForObjectDetection(T.DetrConfig(**detr)),
                 {"class_labels_classifier"} | {f"bbox_predictor.layers.{i}" for i in range(3)}),
        "segformer": (lambda: T.SegformerForSemanticSegmentation(T.SegformerConfig(num_labels=3, **seg)),
                      {"decode_head.linear_projections.0.proj", "decode_head.linear_projections.1.proj"}),
        "clip": (lambda: T.CLIPModel(T.CLIPConfig(text_config=dict(vocab_size=V, **_E), vision_config=_IMG,
                                                  projection_dim=16)), {"visual_projection", "text_projection"}),
        "vit_mae": (lambda: T.ViTMAEForPreTraining(T.ViTMAEConfig(**mae, **_IMG)), {"decoder.decoder_pred"}),
        "wav2vec2_seqcls": (lambda: T.Wav2Vec2ForSequenceClassification(T.Wav2Vec2Config(**_AUDIO)),
                            {"projector", "classifier"}),
        "hubert_seqcls": (lambda: T.HubertForSequenceClassification(T.HubertConfig(**_AUDIO)),
                          {"projector", "classifier"}),
        "electra_pretraining": (lambda: T.ElectraForPreTraining(T.ElectraConfig(vocab_size=V, embedding_size=16, **_E)),
                                {"discriminator_predictions.dense", "discriminator_predictions.dense_prediction"}),
        "albert_mlm": (lambda: T.AlbertForMaskedLM(T.AlbertConfig(vocab_size=V, embedding_size=16, **_E)),
                       {"predictions.dense"}),
    }


HEAD_MODELS = ["deit_teacher", "levit_teacher", "yolos", "detr", "segformer", "clip", "vit_mae", "wav2vec2_seqcls",
               "hubert_seqcls", "electra_pretraining", "albert_mlm"]
# input projections of a backbone, outside its numbered layers, that are compressed (choice: not heads)
BODY_EXTRA = {"decoder.decoder_embed", "electra.embeddings_project", "albert.encoder.embedding_hidden_mapping_in"}


@pytest.mark.parametrize("name", HEAD_MODELS)
def test_task_heads_by_transformers_names_stay_full_precision(name):
    build, heads = _head_models()[name]
    plan = common.prepare_plan(build(), common.Recipe())
    assert plan.compress and not heads & set(plan.compress), sorted(heads & set(plan.compress))
    assert all(plan.keep.get(h, "").startswith("skip: matches") for h in heads), {h: plan.keep.get(h) for h in heads}
    assert [n for n in plan.compress if not re.search(r"\.\d+\.", n) and n not in BODY_EXTRA] == []


def test_vit_mae_decoder_attention_is_switched_and_quantized(eager_quantizers):
    """ViT-MAE's decoder is a plain module holding a deep copy of the config, which set_attn_implementation does not
    reach: its attention is switched through that copy, so every quantizer sees data and gets gradients."""
    build, _ = _head_models()["vit_mae"]
    model = common.prepare(build(), common.Recipe())
    assert model.decoder.config._attn_implementation == "compressed"
    x = torch.randn(2, 3, 32, 32)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="calibrate")  # every quantizer must see data
        common.calibrate(model, [x])
    model.train()
    model(x).loss.backward()
    attn = [m for m in model.modules() if isinstance(m, common.AttentionQuantizers)]
    assert len(attn) == 3 and all(a.q.hi.grad is not None and a.p.hi.grad is not None for a in attn)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model, before, impl):
    return (getattr(model, "compression_recipe", None) is None and not common.compressed_linears(model)
            and before.keys() == model.state_dict().keys()
            and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
            and model.config._attn_implementation == impl)


def test_a_refused_prepare_leaves_the_model_as_it_was():
    """Masks that do not fit (a GPT-2 checkpoint of another width) are found by the plan, before any Conv1D is
    swapped; an attention switch that fails is undone."""
    model, _, _, _ = _build("gpt2")
    before, impl = _state(model), model.config._attn_implementation
    masks = {n: torch.ones(o // 2, i // 2, dtype=torch.bool)
             for n, (o, i) in common.prepare_plan(model, common.Recipe()).compress.items()}
    assert "transformer.h.0.attn.c_attn: mask (48, 16), layer 96x32" in common.prepare_plan(
        model, common.Recipe(), masks).error()
    with pytest.raises(ValueError, match=r"transformer\.h\.0\.attn\.c_attn: mask \(48, 16\), layer 96x32"):
        common.prepare(model, common.Recipe(), masks)
    assert _unchanged(model, before, impl)

    import importlib
    prepare_module = importlib.import_module("common.prepare")  # common.prepare is also the function

    def half_switch(m):  # switches the config, then fails
        m.set_attn_implementation("eager")
        raise RuntimeError("switch failed")
    model.set_attn_implementation("sdpa")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(prepare_module, "use_hf_compressed_attention", half_switch)
        with pytest.raises(RuntimeError, match="switch failed"):
            common.prepare(model, common.Recipe())
    assert _unchanged(model, before, "sdpa")
