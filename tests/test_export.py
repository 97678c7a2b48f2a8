"""common.export: real compressed checkpoints (format in common/README.md) — bit packing, bit-exact round trips on tiny BERT,
Wav2Vec2 and ViT, the size report against the real file, clear errors on bad files, the run-dir CLI."""
import inspect
import itertools
import json
import math
import os
import struct

import numpy as np
import pytest
import torch
from torch import nn

import common
from common import packing
from common.export import (CompressedFormatError, detect_pipeline, export_model, load_compressed, main,
                           read_compressed, timm_spec, to_semi_structured)
from tiny_models import bert_batch, tiny_bert_qa, tiny_vit, tiny_wav2vec2_ctc, wav_batch

VIT_ARGS = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=10)
CASES = {
    "bert": (tiny_bert_qa, bert_batch, None),
    "wav2vec2": (tiny_wav2vec2_ctc, wav_batch, None),
    "vit": (tiny_vit, lambda: torch.randn(2, 3, 32, 32), timm_spec("vit_tiny_patch16_224", **VIT_ARGS)),
}


def _run(model, batch):
    with torch.no_grad():
        out = model(**batch) if isinstance(batch, dict) else model(batch)
    return common.logits_of(out)


def _converted(name, recipe=None):
    build, batch_fn, spec = CASES[name]
    model = common.prepare(build(), recipe or common.Recipe())
    batch = batch_fn()
    common.calibrate(model, [batch])
    common.convert(model)
    if spec:
        model.export_spec = spec
    return model, batch


def _header(path):
    data = open(path, "rb").read()
    n = struct.unpack("<Q", data[:8])[0]
    return data, n, json.loads(data[8:8 + n])


# -- packing ----------------------------------------------------------------------------------------------------
def test_nibbles_round_trip_every_code_pair():
    pairs = np.array(list(itertools.product(range(-8, 8), repeat=2)), dtype=np.int8).reshape(-1)
    packed = packing.pack_nibbles(pairs)
    assert packed.dtype == np.uint8 and packed.size == 256 and sorted(packed.tolist()) == list(range(256))
    assert np.array_equal(packing.unpack_nibbles(packed, pairs.size), pairs)
    assert packing.pack_nibbles([1, -1]).tolist() == [0xF1]  # first code in the low nibble, two's complement
    assert packing.pack_nibbles([-7, 7, 3]).tolist() == [0x79, 0x03]  # odd count: zero-padded high nibble
    assert packing.unpack_nibbles(packing.pack_nibbles([-7, 7, 3]), 3).tolist() == [-7, 7, 3]
    with pytest.raises(ValueError, match="4-bit range"):
        packing.pack_nibbles([8])


def test_combo3_round_trips_all_216_triples():
    triples = np.array(list(itertools.product(range(6), repeat=3)), dtype=np.uint8)
    packed = packing.pack_combo3(triples.reshape(-1))
    assert packed.size == 216 and sorted(packed.tolist()) == list(range(216))
    assert packed.tolist() == [int(a) + 6 * int(b) + 36 * int(c) for a, b, c in triples]
    assert np.array_equal(packing.unpack_combo3(packed, triples.size), triples.reshape(-1))
    # through masks: every pattern triple -> [12] bool mask -> index -> mask
    masks = np.stack([packing.patterns_to_mask(t) for t in triples])
    assert masks.shape == (216, 12) and (masks.reshape(216, 3, 4).sum(-1) == 2).all()
    for m in masks[::7]:
        idx = packing.pack_index(m.reshape(1, 12), "combo3")
        assert idx.size == 1 and np.array_equal(packing.unpack_index(idx, "combo3", 12), m)
    assert packing.pack_combo3([5]).tolist() == [5] and packing.unpack_combo3([5], 1).tolist() == [5]
    with pytest.raises(packing.PackingError, match="216"):
        packing.unpack_combo3(np.array([216], np.uint8), 3)
    assert [tuple(np.flatnonzero(packing.patterns_to_mask([p]))) for p in range(6)] == list(packing.PATTERNS_2_4)


def test_combo5_and_bitmask_round_trip():
    quint = np.array(list(itertools.product(range(6), repeat=5)), dtype=np.uint8).reshape(-1)
    for n in (quint.size, quint.size - 2, 1):
        packed = packing.pack_combo5(quint[:n])
        assert packed.size == packing.combo5_nbytes(n) == (13 * -(-n // 5) + 7) // 8
        assert np.array_equal(packing.unpack_combo5(packed, n), quint[:n])
    bad = packing.pack_combo5([5] * 5)  # 7775 = 0b1111001011111
    bad[0] |= 0xFF
    bad[1] |= 0x1F  # field 8191 >= 7776
    with pytest.raises(packing.PackingError, match="7776"):
        packing.unpack_combo5(bad, 5)
    m = np.random.default_rng(0).random(37) > 0.5
    assert np.array_equal(packing.unpack_index(packing.pack_index(m, "bitmask"), "bitmask", 37), m)
    with pytest.raises(ValueError, match="not exactly 2"):
        packing.mask_to_patterns(np.array([True, True, True, False]))


# -- round trips ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CASES))
def test_round_trip_is_bit_exact(name, tmp_path):
    model, batch = _converted(name)
    ref = _run(model, batch)
    f = tmp_path / f"{name}.safetensors"
    rep = export_model(model, f, extra_meta={"note": "test"}, dtype=torch.float32)
    plan = common.prepare_plan(CASES[name][0](), common.Recipe()).summary()  # the export's default index, combo5
    for k in ("backbone_bytes", "bits_per_backbone_weight", "backbone_ratio_vs_fp32"):
        assert plan[k] == rep[k], k
    assert plan["value_bits_per_weight"] == 2.0 and plan["value_ratio_vs_fp32"] == 16.0  # the paper's 16x: values
    loaded = load_compressed(f)  # architecture rebuilt from the stored config / timm args
    assert loaded is not model and type(loaded) is type(model)
    for a, b in zip(ref, _run(loaded, batch)):
        assert torch.equal(a, b)
    # the report is the file: parts sum to its size, the header part is the real header
    data, n, header = _header(f)
    assert rep["file_bytes"] == os.path.getsize(f) == sum(rep["parts_bytes"].values())
    assert rep["parts_bytes"]["metadata"] == 8 + n
    assert rep["sparse_linears"] == rep["backbone_linears"] >= 8 and rep["dense_linears"] == 0
    n_w = rep["backbone_weights"]
    assert rep["parts_bytes"]["codes"] == n_w // 4  # 2 kept values of every 4, two 4-bit codes per byte
    # never past the entropy limit of 2:4 at 4 bits: 2 bits of codes + log2(6)/4 bits of index per weight
    limit_bits = 2 + math.log2(6) / 4
    assert 10.6 < rep["backbone_ratio_vs_fp32"] <= 32 / limit_bits and rep["bits_per_backbone_weight"] >= limit_bits
    for k in ("backbone_ratio_vs_fp32", "model_ratio_vs_fp32", "model_ratio_vs_fp16", "bits_per_backbone_weight",
              "file_bytes"):
        assert rep[k] is not None
    _, meta = read_compressed(f)
    assert meta["extra"] == {"note": "test"} and meta["recipe"] == common.Recipe().to_dict()
    lin = next(iter(common.compressed_linears(model)))
    assert header[f"{lin}.codes"]["dtype"] == "U8" and header[f"{lin}.index"]["dtype"] == "U8"


def test_fp16_storage_is_close_and_backbone_exact(tmp_path):
    model, batch = _converted("bert")
    f = tmp_path / "b16.safetensors"
    rep = export_model(model, f)  # default: non-backbone tensors in float16
    assert rep["dtype"] == "float16"
    loaded = load_compressed(f, model=tiny_bert_qa())  # into a given (plain) architecture
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for k, v in a.items():
        if k.endswith((".weight_codes", ".weight_step", ".mask", ".lo", ".hi", ".signed")):
            assert torch.equal(v, b[k]), k  # 4-bit codes, scales, masks and clips are always exact
        elif v.is_floating_point():
            assert torch.equal(v.half().float(), b[k]), k
    for x, y in zip(_run(model, batch), _run(loaded, batch)):
        torch.testing.assert_close(x, y, atol=0.05, rtol=0.05)
    f32 = tmp_path / "b32.safetensors"
    assert export_model(model, f32, dtype="fp32")["file_bytes"] > rep["file_bytes"]


@pytest.mark.parametrize("variant", ["dense_w4", "plain_grid", "per_channel_combo5", "sparse_fp", "w8", "combo3",
                                     "bitmask_1_4"])
def test_recipe_variants_round_trip(variant, tmp_path):
    recipe, kw = {
        "combo3": (common.Recipe(), {"index": "combo3"}),
        "bitmask_1_4": (common.Recipe(sparsity="1:4"), {}),
        "dense_w4": (common.Recipe(sparsity=None), {}),
        "plain_grid": (common.Recipe(zero_preserving=False), {}),
        "per_channel_combo5": (common.Recipe(per_channel=True), {"index": "combo5"}),
        "sparse_fp": (common.Recipe(w_bits=32, a_bits=32, quantize_attention=False), {}),
        "w8": (common.Recipe(w_bits=8, a_bits=8), {}),
    }[variant]
    model, batch = _converted("vit", recipe)
    f = tmp_path / "v.safetensors"
    if variant == "plain_grid":  # pruned weights are +-step/2 there, not 0: stored as dense codes, with a warning
        with pytest.warns(UserWarning, match="plain grid"):
            rep = export_model(model, f, dtype=torch.float32, **kw)
        assert rep["dense_linears"] == rep["backbone_linears"] and rep["notes"]
    elif variant == "bitmask_1_4":
        with pytest.warns(UserWarning, match="not 2:4; index stored as a bitmask"):
            rep = export_model(model, f, dtype=torch.float32, **kw)
    else:
        rep = export_model(model, f, dtype=torch.float32, **kw)
    # the plan says beforehand, from the shapes alone, what the file stores for the backbone
    plan = common.prepare_plan(tiny_vit(), recipe).summary(index=kw.get("index", "combo5"), float_bytes=4)
    assert [plan[k] for k in ("backbone_bytes", "bits_per_backbone_weight", "backbone_ratio_vs_fp32")] == [
        rep[k] for k in ("backbone_bytes", "bits_per_backbone_weight", "backbone_ratio_vs_fp32")]
    for a, b in zip(_run(model, batch), _run(load_compressed(f), batch)):
        assert torch.equal(a, b)
    assert rep["file_bytes"] == os.path.getsize(f)
    n_w = rep["backbone_weights"]
    _, _, header = _header(f)
    has_index = any(k.endswith(".index") for k in header)
    if variant == "dense_w4":
        assert not has_index and rep["parts_bytes"]["codes"] == n_w // 2 and rep["parts_bytes"]["index"] == 0
    elif variant == "plain_grid":
        assert rep["parts_bytes"]["codes"] == n_w // 2 and has_index  # the mask is kept for the state
    elif variant == "per_channel_combo5":
        lin = next(iter(common.compressed_linears(model).values()))
        assert rep["parts_bytes"]["scales"] == 4 * sum(
            m.out_features for m in common.compressed_linears(model).values()) and lin.weight_step.dim() == 2
    elif variant == "sparse_fp":
        assert rep["parts_bytes"]["codes"] == 4 * n_w // 2 and rep["parts_bytes"]["clips"] == 0
    elif variant == "w8":
        assert rep["parts_bytes"]["codes"] == n_w // 2  # int8 codes, one per byte, kept half only


def test_tied_weights_stored_once_and_bf16(tmp_path):
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.body, self.head = nn.Embedding(16, 8), nn.Linear(8, 8), nn.Linear(8, 16, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, i):
            return self.head(self.body(self.emb(i)))

    model = common.prepare(Tied(), common.Recipe(quantize_attention=False, skip=["head", "emb"]))
    i = torch.randint(0, 16, (3, 5))
    common.calibrate(model, [i])
    f = tmp_path / "t.safetensors"
    export_model(model, f, dtype=torch.float32)
    tensors, meta = read_compressed(f)
    assert "head.weight" not in tensors and meta["storage"]["aliases"] == {"head.weight": "emb.weight"}
    loaded = load_compressed(f, model=Tied())
    assert torch.equal(common.convert(model)(i), loaded(i))
    # bf16 storage of a sparse, unquantized backbone (the 2:4 'sparse' stage): kept values in bf16
    model, batch = _converted("vit", common.Recipe(w_bits=32, a_bits=32, quantize_attention=False))
    rep = export_model(model, f, dtype="bf16")
    assert rep["parts_bytes"]["codes"] == 2 * rep["backbone_weights"] // 2
    for a, b in zip(_run(model, batch), _run(load_compressed(f), batch)):
        torch.testing.assert_close(a, b, atol=0.02, rtol=0.02)


def test_bert_base_shaped_layer_ratios(tmp_path):
    """One 768x3072 linear (BERT-base FFN): 2 bits of codes + 2/3 (combo3) or 0.65 (combo5) bits of index."""
    out = {}
    for index in ("combo3", "combo5"):
        model = nn.Sequential(nn.Linear(768, 3072))
        common.prepare(model, common.Recipe(quantize_attention=False, skip=[]))
        common.calibrate(model, [torch.randn(8, 768)])
        out[index] = export_model(model, tmp_path / f"{index}.safetensors", dtype=torch.float32, index=index)
    n = 768 * 3072
    c3, c5 = out["combo3"], out["combo5"]
    assert c3["parts_bytes"]["codes"] == n // 4 and c3["parts_bytes"]["index"] == n // 12
    assert c3["backbone_ratio_vs_fp32"] == round(4 * n / (n // 4 + n // 12 + 4), 4) == 11.9999
    assert c5["parts_bytes"]["index"] == packing.combo5_nbytes(n // 4)
    assert c5["backbone_ratio_vs_fp32"] >= 12.0 and c5["bits_per_backbone_weight"] == 2.65
    assert inspect.signature(export_model).parameters["index"].default == "combo5"  # the default meets >= 12x
    assert c3["bits_breakdown"]["index"] == 0.6667
    assert c3["file_bytes"] == os.path.getsize(tmp_path / "combo3.safetensors")


# -- errors -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bert_file(tmp_path_factory):
    torch.manual_seed(0)
    model, batch = _converted("bert")
    f = tmp_path_factory.mktemp("exp") / "bert.safetensors"
    export_model(model, f, dtype=torch.float32)
    return f


def _rewrite_meta(src, dst, **changes):
    data, n, header = _header(src)
    header["__metadata__"].update(changes)
    hb = json.dumps(header).encode()
    hb += b" " * (-len(hb) % 8)
    dst.write_bytes(struct.pack("<Q", len(hb)) + hb + data[8 + n:])


def test_bad_files_fail_clearly(bert_file, tmp_path):
    data = bert_file.read_bytes()
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(data[:-100] + bytes([data[-100] ^ 0x5A]) + data[-99:])
    with pytest.raises(CompressedFormatError, match=r"corrupt\.safetensors: checksum mismatch.*corrupted"):
        load_compressed(corrupt)
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CompressedFormatError, match=r"trunc\.safetensors: truncated"):
        load_compressed(trunc)
    trunc.write_bytes(data[:100])
    with pytest.raises(CompressedFormatError, match=r"trunc\.safetensors: truncated"):
        read_compressed(trunc)
    v2 = tmp_path / "v2.safetensors"
    _rewrite_meta(bert_file, v2, format_version="2")
    with pytest.raises(CompressedFormatError, match=r"v2\.safetensors: format version '2' is not supported"):
        load_compressed(v2)
    _rewrite_meta(bert_file, v2, layers="[{")
    with pytest.raises(CompressedFormatError, match=r"v2\.safetensors: metadata 'layers' is not valid JSON"):
        load_compressed(v2)
    from safetensors.torch import save_file
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(3)}, str(plain))
    with pytest.raises(CompressedFormatError, match=r"plain\.safetensors: not a compressed checkpoint"):
        load_compressed(plain)
    with pytest.raises(CompressedFormatError, match="nope.safetensors: file not found"):
        load_compressed(tmp_path / "nope.safetensors")


def test_model_that_does_not_match(bert_file):
    from transformers import BertConfig, BertForQuestionAnswering
    wider = BertForQuestionAnswering(BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2,
                                                num_attention_heads=4, intermediate_size=128,
                                                max_position_embeddings=64))
    with pytest.raises(CompressedFormatError, match=r"bert\.safetensors: the model does not match.*intermediate"):
        load_compressed(bert_file, model=wider)
    with pytest.raises(CompressedFormatError, match=r"bert\.safetensors: the model does not match"):
        load_compressed(bert_file, model=tiny_vit())
    other_recipe = common.prepare(tiny_bert_qa(), common.Recipe(per_channel=True))
    with pytest.raises(CompressedFormatError, match="per-channel"):
        load_compressed(bert_file, model=other_recipe)
    deeper = BertForQuestionAnswering(BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=3,
                                                 num_attention_heads=4, intermediate_size=64,
                                                 max_position_embeddings=64))
    with pytest.raises(CompressedFormatError, match=r"only in the model \['bert\.encoder\.layer\.2"):
        load_compressed(bert_file, model=deeper)


def test_conv1d_model_that_does_not_match_names_the_layer(tmp_path):
    """GPT-2's Conv1D layers are checked against the file's shapes as nn.Linear layers are."""
    from transformers import GPT2Config, GPT2LMHeadModel
    gpt2 = lambda width: GPT2LMHeadModel(GPT2Config(n_embd=width, n_layer=2, n_head=4, vocab_size=100))  # noqa: E731
    model = common.prepare(gpt2(32), common.Recipe())
    common.calibrate(model, [torch.randint(0, 100, (2, 8))])
    export_model(model, tmp_path / "g.safetensors")
    with pytest.raises(CompressedFormatError, match=r"layer transformer\.h\.0\.attn\.c_attn is 96x32 in the file, "
                                                     r"192x64 in the model"):
        load_compressed(tmp_path / "g.safetensors", model=gpt2(64))


def test_cli_help_names_the_default_index(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "5 groups per 13 bits (combo5, default" in out and "3 groups per byte (default)" not in out
    assert "five groups per 13 bits, or three per byte with --index combo3" in out


def test_unprepared_model_and_unrebuildable_spec(tmp_path):
    with pytest.raises(ValueError, match="not prepared"):
        export_model(tiny_vit(), tmp_path / "x.safetensors")
    model, batch = _converted("vit")
    del model.export_spec  # timm records no constructor arguments: the file cannot rebuild it alone
    f = tmp_path / "v.safetensors"
    export_model(model, f, dtype=torch.float32)
    with pytest.raises(CompressedFormatError, match="pass model="):
        load_compressed(f)
    for a, b in zip(_run(model, batch), _run(load_compressed(f, model=tiny_vit()), batch)):
        assert torch.equal(a, b)
    prepared = common.prepare(tiny_vit(), common.Recipe())  # a prepared (not converted) model exports too
    common.calibrate(prepared, [batch])
    export_model(prepared, f, dtype=torch.float32)
    assert not getattr(prepared, "compression_converted", False)  # converted on a copy


# -- run dirs and CLI -------------------------------------------------------------------------------------------
def test_detect_pipeline(tmp_path):
    a = tmp_path / "a"
    a.mkdir()
    (a / "metrics.json").write_text(json.dumps({"pipeline": "vit_imagenet"}))
    assert detect_pipeline(a) == ("vit_imagenet", "metrics.json 'pipeline'")
    b = tmp_path / "runs" / "mini" / "bert_squad" / "qat4"
    b.mkdir(parents=True)
    (b / "config.yaml").write_text("stage: qat4\n")
    assert detect_pipeline(b) == ("bert_squad", "run dir path")
    c = tmp_path / "c"
    c.mkdir()
    (c / "config.json").write_text("{}")
    assert detect_pipeline(c)[0] == "hf"
    d = tmp_path / "d"
    d.mkdir()
    with pytest.raises(CompressedFormatError, match="cannot tell which pipeline"):
        detect_pipeline(d)


def test_cli_exports_a_bert_squad_run(tmp_path, capsys):
    import yaml
    from safetensors.torch import save_file
    from transformers import AutoTokenizer
    try:
        from bert_squad.squad_data import minilm_path
        tok = AutoTokenizer.from_pretrained(minilm_path())
    except (ImportError, FileNotFoundError, OSError) as e:
        pytest.skip(f"no offline tokenizer for bert_squad.eval.load_run: {e}")
    run = tmp_path / "runs" / "mini" / "bert_squad" / "qat4"
    run.mkdir(parents=True)
    model = tiny_bert_qa()
    model.config.architectures = ["BertForQuestionAnswering"]
    model.config.save_pretrained(run)
    tok.save_pretrained(run)
    recipe = common.Recipe(calib_batches=1)
    common.prepare(model, recipe)
    common.calibrate(model, [bert_batch()])
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(run / "model.safetensors"))
    (run / "config.yaml").write_text(yaml.safe_dump({"stage": "qat4", "compression": recipe.to_dict()}))
    out = tmp_path / "qat4.compressed.safetensors"
    rep = main([str(run), str(out), "--dtype", "fp32", "--verify", "--report"])
    assert rep["pipeline"] == "bert_squad" and rep["pipeline_found_by"] == "run dir path"
    assert rep["verify"] == {"bit_exact": True, "max_abs_diff": 0.0}
    saved = json.loads((run / "compression.json").read_text())
    assert saved["file_bytes"] == os.path.getsize(out) and saved["model_ratio_vs_fp32"] > 1
    assert json.loads(capsys.readouterr().out)["file_bytes"] == saved["file_bytes"]
    batch = bert_batch()
    common.convert(model)
    for a, b in zip(_run(model, batch), _run(load_compressed(out), batch)):
        assert torch.equal(a, b)
    with pytest.raises(CompressedFormatError, match="exists; pass --overwrite"):  # the file is the user's
        main([str(run), str(out)])
    assert main([str(run), str(out), "--overwrite", "--dtype", "fp32"])["file_bytes"] == saved["file_bytes"]
    with pytest.raises(CompressedFormatError, match="no such run dir"):
        main([str(tmp_path / "nope"), str(tmp_path / "x.safetensors")])


@pytest.mark.parametrize("pipeline", ["vit_imagenet", "wav2vec_librispeech"])
def test_other_pipeline_loaders(pipeline, tmp_path):
    """Fake run dirs in the layout the pipelines write (config.yaml + model.safetensors [+ HF files])."""
    import yaml
    from safetensors.torch import save_file
    run = tmp_path / "runs" / "mini" / pipeline / "qat4"
    run.mkdir(parents=True)
    recipe = common.Recipe(calib_batches=1)
    cfg = {"stage": "qat4", "compression": recipe.to_dict()}
    if pipeline == "vit_imagenet":
        model, batch = tiny_vit(), torch.randn(2, 3, 32, 32)
        cfg["model"] = {"name": "vit_tiny_patch16_224", "pretrained": False, **VIT_ARGS}
    else:
        pytest.importorskip("wav2vec_librispeech.eval")
        from wav2vec_librispeech.train import make_processor
        model, batch = tiny_wav2vec2_ctc(), wav_batch()
        model.config.architectures = ["Wav2Vec2ForCTC"]
        model.config.save_pretrained(run)
        make_processor(run, 16000).save_pretrained(run)
    common.prepare(model, recipe)
    common.calibrate(model, [batch])
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(run / "model.safetensors"))
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "c.safetensors"
    rep = main([str(run), str(out), "--dtype", "fp32"])
    assert rep["pipeline"] == pipeline and json.loads((run / "compression.json").read_text())["file_bytes"] == \
        os.path.getsize(out)
    common.convert(model)
    for a, b in zip(_run(model, batch), _run(load_compressed(out), batch)):  # rebuilt from the file alone
        assert torch.equal(a, b)


# -- GPU --------------------------------------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_semi_structured_needs_cuda():
    model, _ = _converted("vit")
    with pytest.raises(RuntimeError, match="CUDA"):
        to_semi_structured(model)


def test_which_layers_semi_structured_takes():
    """to_semi_structured's choice, which bench_gpu --smoke also uses: 2:4 layers on the zero-preserving grid; given
    a backend, also their device (and, on a GPU only, the backend's shape limits)."""
    from torch.sparse import SparseSemiStructuredTensorCUTLASS as cutlass
    from common.export import semi_structured_skip_reason as reason
    for recipe, want in [(common.Recipe(quantize_attention=False), None),
                         (common.Recipe(quantize_attention=False, sparsity=None), "not 2:4 sparse"),
                         (common.Recipe(quantize_attention=False, zero_preserving=False), "plain grid")]:
        layers = list(common.compressed_linears(common.convert(common.prepare(tiny_bert_qa(), recipe))).values())
        assert len(layers) == 12
        for m in layers:
            assert reason(m) is None if want is None else want in reason(m)
            if want is None:
                assert "not CUDA" in reason(m, cutlass, torch.float16)


def test_semi_structured_layer_logic_on_cpu(float_matmul):
    """The wrapper (input quantizer, reshape, dtype casts, bias) with a stand-in for the sparse tensor class: a
    float matmul, compared with the frozen layer's float matmul."""
    from common.export import SemiStructuredLinear

    class DenseStandIn:
        @staticmethod
        def from_dense(w):
            return w

    model, batch = _converted("vit")
    name, frozen = next(iter(common.compressed_linears(model).items()))
    x = torch.randn(2, 17, frozen.in_features)
    layer = SemiStructuredLinear(frozen, torch.float32, DenseStandIn)
    assert torch.equal(layer(x), frozen(x))
    half = SemiStructuredLinear(frozen, torch.bfloat16, DenseStandIn)
    y = half(x)
    assert y.dtype == torch.float32 and y.shape == (2, 17, frozen.out_features)
    torch.testing.assert_close(y, frozen(x), atol=0.05, rtol=0.05)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="2:4 semi-structured sparse matmuls need a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_semi_structured_matches_dense_on_gpu(dtype):
    from transformers import BertConfig, BertForQuestionAnswering
    model = BertForQuestionAnswering(BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2,
                                                num_attention_heads=4, intermediate_size=128,
                                                max_position_embeddings=64))
    common.prepare(model, common.Recipe())
    batch = bert_batch(b=4, seq=32)
    common.calibrate(model, [batch])
    common.convert(model).cuda()
    batch = {k: v.cuda() for k, v in batch.items()}
    ref = _run(model, batch)
    info = to_semi_structured(model, dtype=dtype)
    assert len(info["converted"]) == 12 and not info["skipped"], info
    assert all(isinstance(m.weight, torch.sparse.SparseSemiStructuredTensor)
               for m in model.modules() if type(m).__name__ == "SemiStructuredLinear")
    for a, b in zip(ref, _run(model, batch)):
        torch.testing.assert_close(b, a, atol=0.1, rtol=0.05)
