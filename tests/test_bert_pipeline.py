"""Smoke tests of the real bert_squad entry points on a tiny BERT and a small generated mini-SQuAD."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from bert_squad import eval as bert_eval
from bert_squad import make_mini_squad
from bert_squad import train as bert_train
from bert_squad.squad_data import minilm_path
from common import check_nm, compressed_linears
from common.config import ConfigError
from common.runs import RunError
from run_checks import assert_same_weights, with_scalar_clips

CFG = "bert_squad/configs/mini/{}.yaml"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from transformers import AutoTokenizer, BertConfig
    root = tmp_path_factory.mktemp("bert")
    model_dir = root / "tiny_bert"
    BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
               max_position_embeddings=128).save_pretrained(model_dir)
    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(model_dir)
    data = root / "data"
    make_mini_squad.main(["--out_dir", str(data), "--n_train", "48", "--n_dev", "16"])
    common = [f"model_name_or_path={model_dir}", "from_config=true", f"runs_dir={root / 'runs'}",
              f"data.train_file={data / 'train.json'}", f"data.validation_file={data / 'dev.json'}",
              "data.generate_mini=null", "train.max_steps=3", "train.per_device_train_batch_size=4",
              "global_batch_size=4", "train.logging_steps=1"]
    return root, common


def run(stage, common, *extra):
    return bert_train.main(["--config", CFG.format(stage), *common, *extra])


def test_stage_chain_and_saved_model(env):
    root, common = env
    out = {}
    for stage in ("fp", "sparse", "qat4"):
        out[stage] = run(stage, common, *([] if stage == "fp" else ["compression.calib_batches=2"]))
    runs = root / "runs" / "mini" / "bert_squad"
    for stage, m in out.items():
        saved = json.loads((runs / stage / "metrics.json").read_text())
        assert saved == m
        for key in ("exact_match", "f1", "stage", "scale", "w_bits", "a_bits", "sparsity", "compression_ratio",
                    "bits_per_backbone_weight", "main_metric", "mini_scale_note"):
            assert key in saved, key
        assert 0.0 <= saved["f1"] <= 100.0 and saved["scale"] == "mini" and saved["train_steps"] == 3
        preds = json.loads((runs / stage / "predictions.json").read_text())
        assert len(preds) == 16
        assert (runs / stage / "config.yaml").exists() and (runs / stage / "log_history.json").exists()
    assert out["qat4"]["compression_ratio"] == 16.0 and out["sparse"]["compression_ratio"] == 2.0

    state = load_file(str(runs / "qat4" / "model.safetensors"))
    sparse_state = load_file(str(runs / "sparse" / "model.safetensors"))
    masks = {k: v for k, v in state.items() if k.endswith(".mask")}
    assert len(masks) == 12  # 2 layers x (q, k, v, attn out, ffn in, ffn out)
    for k, m in masks.items():
        assert torch.equal(m, sparse_state[k])  # qat4 kept the sparse stage's masks
        assert check_nm(state[k[:-5] + ".weight"])
    assert any(k.endswith("attn_quant.q.hi") for k in state) and any(k.endswith("input_quant.lo") for k in state)

    _, model, _ = bert_eval.load_run(runs / "qat4")
    for lin in compressed_linears(model).values():
        w = lin.effective_weight()
        assert w.unique().numel() <= 16 and check_nm(w) and w[~lin.mask].eq(0).all()

    kept = {f: (runs / "qat4" / f).read_bytes() for f in ("log_history.json", "weight_sample.npz")}
    again = bert_eval.main([str(runs / "qat4")])
    assert again["f1"] == out["qat4"]["f1"] and again["exact_match"] == out["qat4"]["exact_match"]
    # a re-evaluation keeps the training run's record: its curve, its weight sample, when and how it trained
    assert kept == {f: (runs / "qat4" / f).read_bytes() for f in kept}
    saved = json.loads((runs / "qat4" / "metrics.json").read_text())
    for k in ("date", "train_steps", "train_runtime_s", "effective_train_batch_size"):
        assert saved[k] == out["qat4"][k], k
    assert saved["eval_date"] >= saved["date"]


@pytest.mark.parametrize("optim", [[], ["train.optim=sgd", "train.optim_args=momentum=0.9"]], ids=["adamw", "sgd"])
def test_resume_is_bit_identical(env, optim, capsys):
    """Interrupted at step 2 and resumed = uninterrupted, from a checkpoint written while the clips were 0-dim
    (earlier versions): the model loads them, and the optimizer state is reshaped to them (SGD's momentum; the
    Trainer's fused AdamW steps over 0-dim moments as it is)."""
    root, common = env
    fp = root / "runs" / "mini" / "bert_squad" / "fp"
    if not (fp / "model.safetensors").exists():
        run("fp", common)
    base = common + ["init_from=" + str(fp), "kd.teacher=" + str(fp), "train.max_steps=4",
                     "train.save_strategy=steps", "train.save_steps=2", "compression.sparsity=2:4",
                     "compression.calib_batches=2", *optim]
    name = "sgd" if optim else "adamw"
    run("qat4_dense", base, f"output_dir={root / ('full_' + name)}")
    run("qat4_dense", base, f"output_dir={root / ('cut_' + name)}", "interrupt_at_step=2")
    cut = root / ("cut_" + name)
    assert not (cut / "model.safetensors").exists() and (cut / "checkpoint-2").exists()
    ckpt = cut / "checkpoint-2"  # as written while the clips were 0-dim
    model, opt = with_scalar_clips(load_file(str(ckpt / "model.safetensors")), torch.load(ckpt / "optimizer.pt"))
    save_file(model, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    torch.save(opt, ckpt / "optimizer.pt")
    capsys.readouterr()
    run("qat4_dense", base, f"output_dir={cut}", "resume=true")
    assert f"resuming from {cut / 'checkpoint-2'}" in capsys.readouterr().out  # not started again from step 0
    assert_same_weights(root / ("full_" + name), cut)


def test_bad_inputs_fail_clearly(env, tmp_path):
    root, common = env
    with pytest.raises(ConfigError, match="learnin_rate"):
        run("fp", common, "train.learnin_rate=1", f"output_dir={tmp_path / 'a'}")
    with pytest.raises(ConfigError, match="'compression' is null"):
        run("fp", common, "compression.w_bits=8", f"output_dir={tmp_path / 'd'}")
    with pytest.raises(RunError, match="init_from"):
        run("sparse", common, f"init_from={tmp_path / 'nope'}", f"output_dir={tmp_path / 'b'}")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("user data")
    with pytest.raises(RunError, match="overwrite_output_dir"):
        run("fp", common, f"output_dir={busy}")
    assert (busy / "keep.txt").read_text() == "user data"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"version": "1.1", "data": [{"title": "t", "paragraphs": [
        {"context": "Paris is big.", "qas": [{"id": "q1", "question": "What?",
                                             "answers": [{"text": "London", "answer_start": 0}]}]}]}]}))
    with pytest.raises(ValueError, match="bad.json"):
        run("fp", common, f"data.train_file={bad}", f"output_dir={tmp_path / 'c'}")
