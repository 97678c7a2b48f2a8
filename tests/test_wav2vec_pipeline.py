"""Smoke tests of the real wav2vec_librispeech entry points on a tiny Wav2Vec2ForCTC (built from a config) and a
tiny LibriSpeech-layout tree of synthetic tones, in one process and in two (torchrun, accelerate launch); plus
padding invariance of the compressed model."""
import json

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file, save_file

import common
from common import check_nm, compressed_linears
from common.config import ConfigError
from common.runs import RunError
from launchers import run_launched, two_processes
from run_checks import assert_close_weights, assert_same_weights
from tiny_models import tiny_wav2vec2_ctc
from wav2vec_librispeech import eval as w2v_eval
from wav2vec_librispeech import train as w2v_train

CFG = "wav2vec_librispeech/configs/mini/{}.yaml"
WORDS = ["HE", "WAS", "ONE", "DAY", "IT", "IS", "SO", "NO", "WE", "GO"]
METRIC_KEYS = ("wer_test_clean", "wer_test_other", "wer_dev_clean", "cer_test_clean", "cer_test_other")


def write_tree(root, split, n, rng, spk0):
    """n utterances of 0.15-0.4 s tone sequences in the LibriSpeech layout (2 speakers, 1 chapter each)."""
    for s in range(2):
        spk, chap = str(spk0 + s), "10"
        d = root / "LibriSpeech" / split / spk / chap
        d.mkdir(parents=True)
        lines = []
        for i in range(n // 2):
            words = [WORDS[j] for j in rng.integers(0, len(WORDS), rng.integers(1, 3))]
            sec = rng.uniform(0.15, 0.4)
            t = np.arange(int(sec * 16000)) / 16000
            x = 0.3 * np.sin(2 * np.pi * (200 + 100 * len(words[0])) * t) + 0.01 * rng.standard_normal(t.size)
            uid = f"{spk}-{chap}-{i:04d}"
            sf.write(d / f"{uid}.flac", x.astype(np.float32), 16000)
            lines.append(f"{uid} {' '.join(words)}\n")
        (d / f"{spk}-{chap}.trans.txt").write_text("".join(lines))


@pytest.fixture(autouse=True)
def _no_runs_dir_env(monkeypatch):
    """RUNS_DIR in the environment overrides runs_dir=...: never let a leaked one send test runs to the real runs/."""
    monkeypatch.delenv("RUNS_DIR", raising=False)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("w2v")
    model_dir = root / "tiny_w2v"
    cfg = tiny_wav2vec2_ctc().config
    cfg.conv_kernel, cfg.conv_stride = (10, 8), (8, 8)  # 64 samples (4 ms) per frame: fewer frames, faster steps
    cfg.save_pretrained(model_dir)
    rng = np.random.default_rng(0)
    data = root / "data"
    for k, (split, n) in enumerate([("train-clean-100", 16), ("dev-clean", 4), ("test-clean", 4),
                                    ("test-other", 4)]):
        write_tree(data, split, n, rng, 100 * (k + 1))
    common_args = [f"model_name_or_path={model_dir}", "from_config=true", f"runs_dir={root / 'runs'}",
                   f"data.librispeech_root={data}", "data.generate_mini=null", "data.max_train_seconds=0.38",
                   "train.max_steps=3", "train.per_device_train_batch_size=4", "train.per_device_eval_batch_size=4",
                   "global_batch_size=4", "train.logging_steps=1"]
    return root, common_args


def run(stage, args, *extra):
    return w2v_train.main(["--config", CFG.format(stage), *args, *extra])


def test_stage_chain_saved_model_and_eval(env, capsys):
    root, args = env
    out = {st: run(st, args, *([] if st == "fp" else ["compression.calib_batches=2"]))
           for st in ("fp", "sparse", "qat4")}
    # KD stages: the teacher replays the student's frozen conv feature encoder (both hold the fp run's weights)
    assert capsys.readouterr().out.count("the KD teacher reuses the student's output") == 2
    runs = root / "runs" / "mini" / "wav2vec_librispeech"
    for stage, m in out.items():
        saved = json.loads((runs / stage / "metrics.json").read_text())
        assert saved == m
        for key in METRIC_KEYS + ("cer_dev_clean", "stage", "scale", "w_bits", "a_bits", "sparsity",
                                  "compression_ratio", "main_metric", "mini_scale_note", "train_dropped_too_long"):
            assert key in saved, key
        assert all(saved[k] >= 0.0 for k in METRIC_KEYS)  # percent; insertions can take WER/CER over 100
        assert saved["main_metric"] == "wer_test_clean" and saved["higher_is_better"] is False
        assert saved["train_steps"] == 3 and saved["train_utterances"] + saved["train_dropped_too_long"] == 16
        rows = [json.loads(x) for x in (runs / stage / "predictions_test_clean.jsonl").read_text().splitlines()]
        assert len(rows) == 4 and set(rows[0]) == {"id", "reference", "hypothesis"}
        for f in ("config.yaml", "config.json", "log_history.json", "vocab.json", "predictions_dev_clean.jsonl",
                  "predictions_test_other.jsonl") + (("weight_sample.npz",) if stage != "fp" else ()):
            assert (runs / stage / f).exists(), (stage, f)
    assert out["qat4"]["compression_ratio"] == 16.0 and out["sparse"]["compression_ratio"] == 2.0
    assert out["fp"]["compression_ratio"] == 1.0

    state = load_file(str(runs / "qat4" / "model.safetensors"))
    sparse_state = load_file(str(runs / "sparse" / "model.safetensors"))
    masks = {k: v for k, v in state.items() if k.endswith(".mask")}
    assert len(masks) == 12  # 2 layers x (q, k, v, out, ffn in, ffn out); conv encoder / projection / lm_head FP
    for k, m in masks.items():
        assert torch.equal(m, sparse_state[k])  # qat4 kept the sparse stage's masks
        assert check_nm(state[k[:-5] + ".weight"])
    clips = [k for k in state if k.endswith((".lo", ".hi"))]
    assert any(k.endswith("attn_quant.q.hi") for k in clips) and any(k.endswith("input_quant.lo") for k in clips)
    assert not any("feature_extractor" in k or "lm_head" in k or "feature_projection" in k for k in clips)

    _, model, _ = w2v_eval.load_run(runs / "qat4")
    for lin in compressed_linears(model).values():
        w = lin.effective_weight()
        assert w.unique().numel() <= 16 and check_nm(w) and w[~lin.mask].eq(0).all()

    before = (runs / "qat4" / "weight_sample.npz").read_bytes()
    again = w2v_eval.main([str(runs / "qat4")])
    for k in METRIC_KEYS:
        assert again[k] == out["qat4"][k], k
    assert (runs / "qat4" / "weight_sample.npz").read_bytes() == before


def test_compressed_logits_do_not_depend_on_padding():
    """W4A4 + 2:4 + quantized attention, calibrated, eval mode: an utterance's logits on its valid frames are the
    same alone and padded in a batch (even with garbage in the padded samples).

    In float64. In float32 it is not bit-exact on CPU, by up to ~1e-6, from full-precision kernels, not from the
    padding logic: oneDNN picks a different conv kernel for batch 1 and batch 2 in the conv feature encoder, and
    GELU's SIMD body vs scalar tail depends on the sequence length; a value on a quantizer's rounding edge then
    moves a whole code, on some CPUs and not others. In float64 that noise is ~1e-16, far from any edge, so the
    check is tight and the same on every machine; a control shows that real leakage (no attention mask) is far
    above it."""
    torch.manual_seed(0)
    model = common.prepare(tiny_wav2vec2_ctc(), common.Recipe())
    g = torch.Generator().manual_seed(1)
    common.calibrate(model, [dict(input_values=torch.randn(4, 6000, generator=g),
                                  attention_mask=torch.ones(4, 6000, dtype=torch.long))])
    model.eval().double()
    assert model.config._attn_implementation == "compressed"
    for la, lb in ((1990, 4799), (3001, 3500)):
        a, b = (torch.randn(n, generator=g, dtype=torch.float64) for n in (la, lb))
        n = int(model._get_feat_extract_output_lengths(torch.tensor(la)))
        with torch.no_grad():
            alone = model(input_values=a[None], attention_mask=torch.ones(1, la, dtype=torch.long)).logits[0]
            am = torch.ones(2, lb, dtype=torch.long)
            am[0, la:] = 0
            for fill in (torch.zeros(lb - la, dtype=torch.float64), torch.randn(lb - la, generator=g,
                                                                               dtype=torch.float64)):
                x = torch.stack([torch.cat([a, fill]), b])
                padded = model(input_values=x, attention_mask=am).logits[0, :n]
                assert alone.dtype == torch.float64 and alone.shape == padded.shape
                torch.testing.assert_close(padded, alone, rtol=0, atol=1e-12)
                assert torch.equal(padded.argmax(-1), alone.argmax(-1))
            leaky = model(input_values=x, attention_mask=torch.ones(2, lb, dtype=torch.long)).logits[0, :n]
            assert (leaky - alone).abs().max() > 1e-3


def _fp_run(env):
    """The module's fp run (made here if test_stage_chain_saved_model_and_eval did not run)."""
    root, args = env
    fp = root / "runs" / "mini" / "wav2vec_librispeech" / "fp"
    if not (fp / "model.safetensors").exists():
        run("fp", args)
    return fp


def test_resume_is_bit_identical(env, monkeypatch):
    root, args = env
    fp = _fp_run(env)
    # 15 training utterances / batch 4 = 4 steps per epoch: the cut is mid-epoch (skipped batches, restored RNG)
    # and the resumed run crosses an epoch boundary (the length-grouped order is reshuffled from seed + epoch)
    base = args + ["init_from=" + str(fp), "kd.teacher=" + str(fp), "train.max_steps=6", "train.save_strategy=steps",
                   "train.save_steps=3", "compression.sparsity=2:4", "compression.calib_batches=2",
                   "data.max_eval_samples=1"]
    run("qat4_dense", base, f"output_dir={root / 'full'}")
    run("qat4_dense", base, f"output_dir={root / 'cut'}", "interrupt_at_step=3")
    assert not (root / "cut" / "model.safetensors").exists() and (root / "cut" / "checkpoint-3").exists()
    from wav2vec_librispeech.trainer_ctc import CTCTrainer
    calls = []
    step = CTCTrainer.training_step
    monkeypatch.setattr(CTCTrainer, "training_step", lambda self, *a, **k: calls.append(1) or step(self, *a, **k))
    run("qat4_dense", base, f"output_dir={root / 'cut'}", "resume=true")
    assert len(calls) == 3  # really resumed: only steps 4-6 ran
    a = assert_same_weights(root / "full", root / "cut")
    assert any(k.endswith(".mask") for k in a) and any(k.endswith(".hi") for k in a)


def _qat4_args(env, out, per_device):
    """qat4 from the fp run, with no random streams (dropout, SpecAugment), since the ranks' own cannot match one
    process's; the fp checkpoint holds SpecAugment's embedding, which this model then lacks (tolerated)."""
    _, args = env
    fp = _fp_run(env)
    over = [a for a in args if not a.startswith("train.per_device_train_batch_size")]
    return [*over, f"init_from={fp}", f"kd.teacher={fp}", "compression.calib_batches=2", "train.optim=sgd",
            "dropout.p=0.0", "model.mask_time_prob=0.0", f"train.per_device_train_batch_size={per_device}",
            f"output_dir={out}"]


def test_specaugment_may_change_between_stages(env):
    """A stage may turn SpecAugment on against an init checkpoint trained without it: its embedding
    (masked_spec_embed, which exists only while masking is on) starts from its initialisation; other mismatches
    are still refused."""
    root, args = env
    fp = root / "fp_no_specaugment"
    run("fp", args, "model.mask_time_prob=0.0", f"output_dir={fp}")
    assert not any("masked_spec_embed" in k for k in load_file(str(fp / "model.safetensors")))
    run("sparse", args, f"init_from={fp}", f"kd.teacher={fp}", f"output_dir={root / 'sparse_with_specaugment'}")
    assert "wav2vec2.masked_spec_embed" in load_file(str(root / "sparse_with_specaugment" / "model.safetensors"))
    state = load_file(str(fp / "model.safetensors"))
    state["wav2vec2.extra"] = torch.zeros(1)
    bad = root / "fp_extra_key"
    bad.mkdir()
    save_file(state, str(bad / "model.safetensors"))
    with pytest.raises(RunError, match=r"fp_extra_key: checkpoint does not match the model.*wav2vec2\.extra"):
        run("sparse", args, f"init_from={bad}", f"kd.teacher={fp}", f"output_dir={root / 'never'}")


@pytest.mark.parametrize("launch", ["torchrun", "accelerate"])
def test_two_processes(env, launch):
    """The qat4 stage with KD on 2 CPU processes (gloo; the main process makes the run dir and vocab first) trains
    on the same global batches as 1 process with twice the per-device batch (the length-grouped order and the
    calibration depend on the global batch alone), so it ends with the same weights (float tolerance; SGD: Adam's
    first steps are sign-like)."""
    root, _ = env
    one = root / "qat4_one_process"
    if not (one / "model.safetensors").exists():
        run("qat4", _qat4_args(env, one, 4), "overwrite_output_dir=true")
    out = root / f"two_{launch}"
    cmd = two_processes(launch) + ["wav2vec_librispeech.train", "--config", CFG.format("qat4"),
                                   *_qat4_args(env, out, 2), "train.ddp_backend=gloo"]
    run_launched(cmd)
    m = json.loads((out / "metrics.json").read_text())
    assert m["global_batch_size"] == 4 and m["train_steps"] == 3 and m["compression_ratio"] == 16.0
    assert m["hardware"].startswith("2 processes on ")
    a = load_file(str(out / "model.safetensors"))
    assert sum(k.endswith(".mask") for k in a) == 12
    assert_close_weights(a, load_file(str(one / "model.safetensors")))


@pytest.mark.parametrize("kd", [True, False])
def test_accumulation_gives_the_update_of_the_whole_batch(env, kd):
    """Global batch 4 as 2 accumulated micro-batches of 2 = one batch of 4 (SGD without clipping, so that a scaled
    gradient shows):
    the CTC loss is a per-micro-batch mean on both paths (with KD, and the Trainer's own without it), though the
    Trainer, seeing the model take **kwargs, would take it as already normalised over the accumulated batch."""
    root, _ = env
    extra = ["train.max_grad_norm=0"] + ([] if kd else ["kd.enabled=false"])
    runs = {}
    for per_device in (4, 2):
        out = root / f"accum_{kd}_{per_device}"
        runs[per_device] = run("qat4", _qat4_args(env, out, per_device), *extra, "overwrite_output_dir=true")
        assert runs[per_device]["global_batch_size"] == 4 and runs[per_device]["train_steps"] == 3
    assert_close_weights(*(load_file(str(root / f"accum_{kd}_{n}" / "model.safetensors")) for n in (4, 2)))
    logged = [[r["loss"] for r in json.loads((root / f"accum_{kd}_{n}" / "log_history.json").read_text())
               if "loss" in r] for n in (4, 2)]
    assert logged[0] and logged[1] == pytest.approx(logged[0], rel=1e-4)


def test_bad_inputs_fail_clearly(env, tmp_path):
    root, args = env
    with pytest.raises(ConfigError, match="learnin_rate"):
        run("fp", args, "train.learnin_rate=1", f"output_dir={tmp_path / 'a'}")
    with pytest.raises(ConfigError, match="mask_tme_prob"):
        run("fp", args, "model.mask_tme_prob=0.1", f"output_dir={tmp_path / 'a2'}")
    with pytest.raises(RunError, match="init_from"):
        run("sparse", args, f"init_from={tmp_path / 'nope'}", f"output_dir={tmp_path / 'b'}")
    with pytest.raises(RunError, match="kd.teacher"):
        run("sparse", args, "init_from=null", f"kd.teacher={tmp_path / 'nope'}", f"output_dir={tmp_path / 'b2'}")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("user data")
    with pytest.raises(RunError, match="overwrite_output_dir"):
        run("fp", args, f"output_dir={busy}")
    assert (busy / "keep.txt").read_text() == "user data"
    with pytest.raises(ConfigError, match="global_batch_size 32 != per-device batch 4 x accumulation 1"):
        run("fp", args, "global_batch_size=32", "train.gradient_accumulation_steps=1", f"output_dir={tmp_path / 'c'}")
    with pytest.raises(ValueError, match="dev-other"):
        run("fp", args, "data.eval_splits=[test-other,dev-other]", f"output_dir={tmp_path / 'd'}")
    with pytest.raises(RunError, match="config.yaml"):
        w2v_eval.main([str(tmp_path / "nothing")])
    # FSDP: refused before anything is made, with the upstream reason and the way out (DDP)
    with pytest.raises(ConfigError, match="train.fsdp is not supported for wav2vec2.*use DDP"):
        run("qat4", args, "train.fsdp=true", f"output_dir={tmp_path / 'e'}")
    assert not (tmp_path / "e").exists()


def test_mini_corpus_is_synthesized_once(tmp_path):
    from wav2vec_librispeech.librispeech import read_librispeech
    d = {"generate_mini": {"seed": 0, "n_train": 4, "n_eval": 2}, "librispeech_root": str(tmp_path / "speech")}
    w2v_train.ensure_mini_data(d)
    params = tmp_path / "speech" / "params.json"
    assert params.exists() and "SYNTHETIC" in (tmp_path / "speech" / "README.txt").read_text()
    assert len(read_librispeech(d["librispeech_root"], "train-clean-100")) == 4
    assert len(read_librispeech(d["librispeech_root"], "test-other")) == 2
    stamp = params.stat().st_mtime_ns
    w2v_train.ensure_mini_data(d)  # same parameters: nothing is rebuilt
    assert params.stat().st_mtime_ns == stamp


def test_evaluate_only_fp_saves_a_usable_checkpoint(env):
    """Paper-scale fp: num_train_epochs 0 evaluates the (already fine-tuned) model and saves it as the FP run."""
    root, args = env
    out = run("fp", args, "train.max_steps=-1", "train.num_train_epochs=0", f"output_dir={root / 'fp0'}")
    assert out["train_steps"] == 0 and all(k in out for k in METRIC_KEYS)
    assert (root / "fp0" / "model.safetensors").exists() and (root / "fp0" / "predictions_test_other.jsonl").exists()
    _, model, processor = w2v_eval.load_run(root / "fp0")
    assert processor.tokenizer.pad_token_id == 0 and model.config.vocab_size == 32


def test_pretrained_only_checkpoint_gets_a_new_ctc_head(env):
    """A pre-trained-only checkpoint (like facebook/wav2vec2-large-lv60: Wav2Vec2ForPreTraining, no CTC head) loads
    with its encoder weights and a new 32-entry CTC head, and the fp stage fine-tunes it (from_config=false)."""
    from transformers import Wav2Vec2Config, Wav2Vec2ForPreTraining
    root, args = env
    ckpt = root / "pretrained_only"
    cfg = Wav2Vec2Config.from_pretrained(root / "tiny_w2v")  # the env fixture's tiny architecture
    torch.manual_seed(0)
    Wav2Vec2ForPreTraining(cfg).save_pretrained(ckpt)
    saved = load_file(ckpt / "model.safetensors")
    out_dir = root / "fp_from_pretrained_only"
    over = [a for a in args if not a.startswith(("model_name_or_path", "from_config"))]
    out = run("fp", over, f"model_name_or_path={ckpt}", "from_config=false", "freeze_feature_encoder=true",
              f"output_dir={out_dir}")
    assert out["train_steps"] == 3 and all(k in out for k in METRIC_KEYS)
    _, model, _ = w2v_eval.load_run(out_dir)
    assert model.lm_head.weight.shape[0] == 32
    key = "wav2vec2.feature_extractor.conv_layers.0.conv.weight"  # frozen (paper recipe): loaded, not trained
    assert torch.equal(model.state_dict()[key], saved[key])
