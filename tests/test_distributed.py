"""2-process CPU (gloo) run of the real bert_squad entry point under torchrun: masks and clips identical on every
rank, and the same weights as a 1-process run with the same global batch (within float tolerance)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from transformers import AutoTokenizer, BertConfig
    from bert_squad import make_mini_squad
    from bert_squad.squad_data import minilm_path
    root = tmp_path_factory.mktemp("ddp")
    model_dir = root / "tiny_bert"
    BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
               max_position_embeddings=128, hidden_dropout_prob=0.0).save_pretrained(model_dir)
    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(model_dir)
    data = root / "data"
    make_mini_squad.main(["--out_dir", str(data), "--n_train", "48", "--n_dev", "8"])
    # an FP "checkpoint" to start the compressed stage from: the tiny model with fixed random weights
    from transformers import AutoConfig, AutoModelForQuestionAnswering
    torch.manual_seed(0)
    fp = root / "fp"
    m = AutoModelForQuestionAnswering.from_config(AutoConfig.from_pretrained(model_dir))
    m.save_pretrained(fp)
    common = [f"model_name_or_path={model_dir}", "from_config=true", f"data.train_file={data / 'train.json'}",
              f"data.validation_file={data / 'dev.json'}", "data.generate_mini=null", "train.max_steps=3",
              "train.logging_steps=1", f"init_from={fp}", "kd.enabled=false", "dropout.p=0.0",
              "compression.calib_batches=2", "train.learning_rate=1e-3",
              "train.warmup_steps=0", "train.dataloader_num_workers=0", "train.disable_tqdm=true",
              "train.train_sampling_strategy=sequential",  # the same samples form each global batch
              "train.optim=sgd",  # Adam's first steps are sign-like: float-order noise in tiny grads flips them
              # pad every feature to max_seq_length: with per-batch padding a rank's 2-sample batch and the 1-process
              # 4-sample batch get different lengths, and the QA head's start/end softmax spans the padded positions
              "data.pad_to_max_length=true"]
    return root, common


def _train(cmd_prefix, root, common, out, per_device, *extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = cmd_prefix + ["-m", "bert_squad.train", "--config", str(ROOT / "bert_squad/configs/mini/qat4.yaml"),
                        *common, f"output_dir={out}", f"train.per_device_train_batch_size={per_device}", *extra]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


def test_two_process_gloo_matches_one_process(setup):
    root, common = setup
    py = [sys.executable]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517"]
    log2 = _train(torchrun, root, common, root / "ddp2", 2, "train.ddp_backend=gloo")
    _train(py, root, common, root / "ddp1", 4)
    assert "effective batch 4 = 2 per device x 2 processes" in log2
    a = load_file(str(root / "ddp2" / "model.safetensors"))
    b = load_file(str(root / "ddp1" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        if k.endswith((".mask", ".signed")):
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    # every rank saw the same masks and clips: each rank dumps them in a DDP run (see train.py rank dump)
    dumps = sorted((root / "ddp2").glob("rank_state_*.pt"))
    assert len(dumps) == 2
    r0, r1 = (torch.load(d) for d in dumps)
    assert r0.keys() == r1.keys() and all(torch.equal(r0[k], r1[k]) for k in r0)
