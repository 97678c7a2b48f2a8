"""common.stage on models outside the paper's three: run dirs written by save_pretrained (tied weights left out) and
staged starts from a prepared GPT-2, whose Conv1D weights the prepared checkpoint holds transposed."""
import pytest
import torch
import yaml

import common
from common.runs import RunError, conv1d_as_unprepared
from common.stage import build_distiller, build_stage_model
from tiny_models import tiny_bert_qa

V = 100


def _gpt2():
    import transformers as T
    return T.GPT2LMHeadModel(T.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=V))


def _t5():
    import transformers as T
    return T.T5ForConditionalGeneration(T.T5Config(d_model=32, d_ff=64, num_layers=2, num_heads=4, d_kv=8,
                                                   vocab_size=V))


def _batch(name):
    b = dict(input_ids=torch.randint(3, V, (2, 12)))
    if name == "t5":
        b["decoder_input_ids"] = torch.randint(3, V, (2, 5))
    return b


def _hf_run(tmp_path, name):
    """A user's run dir: save_pretrained of a prepared, calibrated model, plus config.yaml with its recipe."""
    model = common.prepare(_gpt2() if name == "gpt2" else _t5(), common.Recipe())
    batch = _batch(name)
    common.calibrate(model, [batch])
    run = tmp_path / name
    model.save_pretrained(run)
    (run / "config.yaml").write_text(yaml.safe_dump({"compression": common.Recipe().to_dict()}))
    return run, model.eval(), batch


@pytest.mark.parametrize("name", ["gpt2", "t5"])
def test_hf_run_dir_of_a_tied_model_loads_tied(name, tmp_path, eager_quantizers):
    from safetensors import safe_open
    from common.export import load_hf_run, main
    run, model, batch = _hf_run(tmp_path, name)
    with safe_open(str(run / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()  # what made the strict load fail
    back = load_hf_run(run)
    assert back.get_output_embeddings().weight is back.get_input_embeddings().weight  # tied, not just equal
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, back(**batch).logits)
    rep = main([str(run), str(tmp_path / "c.safetensors"), "--dtype", "fp32", "--verify"])
    assert rep["verify"]["bit_exact"]


def test_hf_run_dir_missing_a_real_key_names_the_file(tmp_path, eager_quantizers):
    from safetensors.torch import load_file, save_file
    from common.export import load_hf_run
    run, _, _ = _hf_run(tmp_path, "gpt2")
    f = run / "model.safetensors"
    state = load_file(str(f))
    del state["transformer.h.0.ln_1.weight"]
    save_file(state, str(f), metadata={"format": "pt"})
    with pytest.raises(RunError, match=r"model\.safetensors: .*missing \['transformer\.h\.0\.ln_1\.weight'\]"):
        load_hf_run(run)


def test_a_damaged_run_config_is_named(tmp_path, eager_quantizers):
    """As the evaluation of the run and as the run a stage starts from (init_from)."""
    from common.export import load_hf_run
    run, _, _ = _hf_run(tmp_path, "gpt2")
    (run / "config.yaml").write_text("compression: [unclosed\n")
    with pytest.raises(RunError, match=f"{run / 'config.yaml'}: not valid YAML"):
        load_hf_run(run)
    with pytest.raises(RunError, match=f"{run / 'config.yaml'}: not valid YAML"):
        build_stage_model({"init_from": str(run), "compression": common.Recipe().to_dict(), "config_file": "s.yaml",
                           "kd": {"enabled": False}}, _gpt2, None, do_calibrate=False)


# stage 1 recipes: 2:4 masks, and weight-only 4-bit (no mask, no input quantizer: only the recipe in the run's
# config.yaml says the square attn.c_proj was transposed)
STAGE1 = {"sparse": common.Recipe(w_bits=32, a_bits=32, quantize_attention=False),
          "w4": common.Recipe(a_bits=32, sparsity=None, quantize_attention=False)}


@pytest.mark.parametrize("stage1", list(STAGE1))
def test_later_stage_starts_from_a_prepared_conv1d_model(stage1, tmp_path, eager_quantizers):
    fp = _gpt2()
    fp.save_pretrained(tmp_path / "fp")  # unprepared, lm_head left out (tied)
    s1 = common.prepare(_gpt2(), STAGE1[stage1])
    s1.save_pretrained(tmp_path / "s1")
    (tmp_path / "s1" / "config.yaml").write_text(yaml.safe_dump({"compression": STAGE1[stage1].to_dict()}))
    cfg = {"init_from": str(tmp_path / "s1"), "compression": common.Recipe().to_dict(), "config_file": "s2.yaml",
           "kd": {"enabled": True, "teacher": str(tmp_path / "fp")}}
    s2, _ = build_stage_model(cfg, _gpt2, None, do_calibrate=False)
    before, after = common.compressed_linears(s1), common.compressed_linears(s2)
    assert before.keys() == after.keys() and "transformer.h.0.attn.c_proj" in after
    for n, lin in before.items():  # the masks carried over, or made from stage 1's [out, in] weights
        mask = lin.mask if lin.mask is not None else common.nm_mask(lin.weight, 2, 4)
        assert torch.equal(after[n].mask, mask) and torch.equal(after[n].weight, lin.weight * mask), n
    assert s2.lm_head.weight is s2.transformer.wte.weight
    # the unprepared fp run still starts a stage (fp -> sparse), and serves as the teacher
    s1b, _ = build_stage_model({**cfg, "init_from": str(tmp_path / "fp")}, _gpt2, None, do_calibrate=False)
    w = fp.transformer.h[0].attn.c_proj.weight.t()
    assert torch.equal(s1b.transformer.h[0].attn.c_proj.weight, w * common.nm_mask(w, 2, 4))
    teacher = build_distiller(cfg, _gpt2).teacher
    assert all(torch.equal(a, b) for a, b in zip(teacher.state_dict().values(), fp.state_dict().values()))


def test_nn_linear_checkpoints_load_as_before():
    """Models without Conv1D (the repository's pipelines) get their checkpoint itself, untouched."""
    state = common.prepare(tiny_bert_qa(), common.Recipe(w_bits=32, a_bits=32)).state_dict()
    assert conv1d_as_unprepared(tiny_bert_qa(), state, common.Recipe(w_bits=32, a_bits=32)) is state
