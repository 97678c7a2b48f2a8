import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import common
from common.dropout import ScheduledDropout
from tiny_models import tiny_wav2vec2_ctc


def test_kd_loss_equals_hand_computation():
    teacher = nn.Linear(3, 4)
    s = torch.tensor([[1.0, 2.0, 0.5, -1.0]], requires_grad=True)
    t = torch.tensor([[0.5, 2.5, 0.0, -0.5]])
    T, lam = 2.0, 0.25
    loss_fn = common.DistillationLoss(teacher, lam=lam, temperature=T)
    task = torch.tensor(1.5)
    got = loss_fn(task, s, t)
    ps = [math.exp(v / T) for v in s[0].tolist()]
    pt = [math.exp(v / T) for v in t[0].tolist()]
    ps = [p / sum(ps) for p in ps]
    pt = [p / sum(pt) for p in pt]
    kl = sum(b * math.log(b / a) for a, b in zip(ps, pt))
    assert got.item() == pytest.approx((1 - lam) * 1.5 + lam * T * T * kl, rel=1e-6)


def test_kd_masks_sequence_positions_and_averages_qa_logits():
    loss_fn = common.DistillationLoss(nn.Linear(1, 1), lam=1.0, temperature=1.0)
    s, t = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    t2 = t.clone()
    t2[0, 3:] = 100.0  # masked frames must not matter
    assert torch.equal(loss_fn(torch.tensor(0.0), s, t, mask), loss_fn(torch.tensor(0.0), s, t2, mask))
    # each sequence's mean over its valid frames, then the mean over sequences: a global batch cut into equal
    # micro-batches (accumulation, ranks) gives the same loss as one batch, whatever the frame counts
    s4, t4 = torch.randn(4, 6, 7), torch.randn(4, 6, 7)
    m4 = torch.tensor([[1] * 6, [1] * 5 + [0], [1, 1, 0, 0, 0, 0], [1] + [0] * 5], dtype=torch.bool)
    whole = common.kd_kl(s4, t4, 2.0, m4)
    halves = (common.kd_kl(s4[:2], t4[:2], 2.0, m4[:2]) + common.kd_kl(s4[2:], t4[2:], 2.0, m4[2:])) / 2
    torch.testing.assert_close(whole, halves)
    per_seq = [common.kd_kl(s4[i:i + 1, m4[i]], t4[i:i + 1, m4[i]], 2.0) for i in range(4)]
    torch.testing.assert_close(whole, sum(per_seq) / 4)
    none = torch.zeros(2, 6, dtype=torch.bool)  # no valid frame: 0, not NaN
    assert common.kd_kl(s4[:2], t4[:2], 2.0, none).item() == 0.0
    s_inf = s4.clone()
    s_inf[3, 1:] = float("-inf")  # what lies under the mask stays out, an infinity too
    torch.testing.assert_close(common.kd_kl(s_inf, t4, 2.0, m4), whole)

    class QA:
        def __init__(self, a, b):
            self.start_logits, self.end_logits = a, b
    a, b = torch.randn(3, 9), torch.randn(3, 9)
    both = loss_fn(torch.tensor(0.0), QA(a, b), QA(b, a))
    torch.testing.assert_close(both, (common.kd_kl(a, b, 1.0) + common.kd_kl(b, a, 1.0)) / 2)


def test_teacher_frozen_eval_no_grad():
    teacher, student = nn.Sequential(nn.Linear(4, 3), nn.Dropout(0.5)), nn.Linear(4, 3)
    kd = common.DistillationLoss(teacher).train()
    assert not teacher.training
    x = torch.randn(8, 4)
    out = student(x)
    loss = kd(F.cross_entropy(out, torch.zeros(8, dtype=torch.long)), out, kd.teacher_outputs(x))
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert student.weight.grad is not None
    assert torch.equal(kd.teacher_outputs(x), kd.teacher_outputs(x))  # eval mode: dropout off


@pytest.mark.parametrize("schedule,mid,end", [("constant", 0.2, 0.2), ("linear", 0.1, 0.0),
                                              ("cosine", 0.1, 0.0), ("step", 0.0, 0.0)])
def test_scheduled_dropout(schedule, mid, end):
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.2), nn.Dropout(0.1))
    sd = ScheduledDropout(model, total_steps=100, schedule=schedule, step_at=0.5)
    sd.step(0)
    assert sd.current() == [0.2, 0.1]
    sd.step(50)
    assert sd.current()[0] == pytest.approx(mid)
    sd.step(100)
    assert sd.current()[0] == pytest.approx(end)


def test_scheduled_dropout_reaches_functional_attention_dropout():
    model = tiny_wav2vec2_ctc()
    attn = model.wav2vec2.encoder.layers[0].attention
    attn.dropout = 0.1
    ScheduledDropout(model, 10, "linear").step(10)
    assert attn.dropout == 0.0
    assert all(m.p == 0.0 for m in model.modules() if isinstance(m, nn.Dropout))


def _missed_before():
    """Models whose dropout rates live in float attributes other than `dropout` (HF ViT's attention_dropout, Llama's
    attention_dropout, BART's activation_dropout)."""
    import transformers as T
    S = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    return {
        "vit_hf": lambda: T.ViTForImageClassification(T.ViTConfig(image_size=32, patch_size=8, hidden_dropout_prob=0.1,
                                                                  attention_probs_dropout_prob=0.1, **S)),
        "llama": lambda: T.LlamaForCausalLM(T.LlamaConfig(vocab_size=100, attention_dropout=0.1, **S)),
        "bart": lambda: T.BartForConditionalGeneration(T.BartConfig(
            d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4,
            encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=100, dropout=0.1, attention_dropout=0.1,
            activation_dropout=0.1)),
    }


@pytest.mark.parametrize("name", ["vit_hf", "llama", "bart"])
def test_scheduled_dropout_reaches_every_dropout_rate(name):
    model = _missed_before()[name]()
    sd = ScheduledDropout(model, 10, "linear")
    assert 0.1 in sd.current()
    sd.step(10)
    left = {f"{n}.{a}": v for n, m in model.named_modules() for a, v in vars(m).items()
            if "drop" in a and isinstance(v, float) and v > 0 and a != "layerdrop"}
    left.update({f"{n}.p": m.p for n, m in model.named_modules() if isinstance(m, nn.Dropout) and m.p > 0})
    assert left == {}


def test_the_pipelines_models_schedule_the_same_sites_as_before():
    """The paper's three pipelines (HF BERT QA, HF Wav2Vec2 CTC, timm ViT; plain, and prepared with CPU fast dropout
    as they train) schedule what the first rule did: every dropout module's p and float `dropout` attributes."""
    from tiny_models import tiny_bert_qa, tiny_vit

    def first_rule(model):
        return [(m, "p") if isinstance(m, nn.modules.dropout._DropoutNd) else (m, "dropout") for m in model.modules()
                if isinstance(m, nn.modules.dropout._DropoutNd) or isinstance(getattr(m, "dropout", None), float)]
    for build in (tiny_bert_qa, tiny_wav2vec2_ctc, tiny_vit):
        for prepared in (False, True):
            model = build()
            if prepared:
                common.prepare(model, common.Recipe())
                common.use_fast_dropout(model)
            sd = ScheduledDropout(model, 10)
            assert sd.sites == first_rule(model) and len(sd.sites) >= 7, build.__name__
            assert sd.start == [getattr(m, a) for m, a in first_rule(model)]


def _student_and_teacher():
    torch.manual_seed(0)
    teacher = tiny_wav2vec2_ctc()
    student = tiny_wav2vec2_ctc()
    student.load_state_dict(teacher.state_dict())
    student.freeze_feature_encoder()
    common.prepare(student, common.Recipe(sparsity=None, w_bits=32, a_bits=32))
    return student.train(), common.DistillationLoss(teacher)


def test_teacher_reuses_the_students_frozen_feature_encoder_bit_for_bit():
    from tiny_models import wav_batch
    student, kd = _student_and_teacher()
    batch, other = wav_batch(), wav_batch()
    want, want_other = kd.teacher_outputs(**batch).logits, kd.teacher_outputs(**other).logits
    assert kd.share_frozen(student, "wav2vec2.feature_extractor")
    assert not any("feature_extractor" in k for k in kd.teacher.state_dict())  # the teacher holds no copy
    runs = []
    student.wav2vec2.feature_extractor.register_forward_hook(lambda *a: runs.append(1))
    student(**batch)
    assert torch.equal(kd.teacher_outputs(**batch).logits, want)  # replayed: the encoder ran once, for the student
    assert len(runs) == 1
    assert torch.equal(kd.teacher_outputs(**other).logits, want_other)  # another input: the student's copy runs
    assert len(runs) == 2


def test_teacher_keeps_its_feature_encoder_when_not_identical_or_trained():
    student, kd = _student_and_teacher()
    student.wav2vec2.feature_extractor.conv_layers[0].conv.weight.requires_grad_(True)  # trained: not frozen
    assert not kd.share_frozen(student, "wav2vec2.feature_extractor")
    student, kd = _student_and_teacher()
    with torch.no_grad():
        student.wav2vec2.feature_extractor.conv_layers[0].conv.weight[0, 0, 0] += 1e-6  # other weights
    assert not kd.share_frozen(student, "wav2vec2.feature_extractor")
    assert any("feature_extractor" in k for k in kd.teacher.state_dict())
