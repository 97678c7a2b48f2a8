import pytest
import torch
import torch.nn.functional as F
from torch import nn

from common.attention import attention_core
from common.dropout import ScheduledDropout
from common.fast_dropout import FastDropout, fast_dropout, use_fast_dropout
from tiny_models import bert_batch, tiny_bert_qa, tiny_vit, tiny_wav2vec2_ctc, wav_batch


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_fast_dropout_keeps_one_minus_p_and_scales_kept_values_exactly(p):
    torch.manual_seed(0)
    x = torch.rand(1000, 513) + 0.5  # no zeros of its own; an odd size, not a multiple of the 4 lanes per word
    y = fast_dropout(x, p)
    kept = y != 0
    thr = round(p * 65536)
    scale = 65536 / (65536 - thr)
    assert kept.float().mean().item() == pytest.approx(1 - p, abs=0.005)  # 513k draws: ~7 standard errors
    assert torch.equal(y[kept], x[kept] * torch.tensor(scale, dtype=x.dtype))
    assert y.mean().item() == pytest.approx(x.mean().item(), rel=0.01)  # unbiased, as F.dropout


def test_fast_dropout_is_seeded_by_torch_and_differs_between_calls():
    x = torch.ones(64, 64)
    torch.manual_seed(1)
    a, b = fast_dropout(x, 0.3), fast_dropout(x, 0.3)
    torch.manual_seed(1)
    assert torch.equal(a, fast_dropout(x, 0.3))
    assert not torch.equal(a, b)


def test_fast_dropout_gradient_is_the_same_mask():
    torch.manual_seed(0)
    x = torch.randn(8, 33, requires_grad=True)
    y = fast_dropout(x, 0.25)
    y.sum().backward()
    assert torch.equal(x.grad, (y != 0).float() * (65536 / (65536 - 16384)))


def test_fast_dropout_saves_only_a_bool_mask():
    x = torch.randn(8, 33, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fast_dropout(x, 0.25)
    assert [(t.dtype, t.shape) for t in saved] == [(torch.bool, x.shape)]  # F.dropout on CPU: a float mask


@pytest.mark.parametrize("p,training", [(0.0, True), (0.3, False), (1.0, True)])
def test_fast_dropout_falls_back_to_f_dropout(p, training):
    x = torch.randn(5, 7)
    assert torch.equal(fast_dropout(x, p, training), F.dropout(x, p, training))


def test_attention_core_drops_probabilities_with_fast_dropout():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 4) for _ in range(3))
    torch.manual_seed(7)
    out, probs = attention_core(q, k, v, None, 0.5, 0.2, True, None)
    torch.manual_seed(7)
    want = fast_dropout(torch.matmul(q * 0.5, k.transpose(-2, -1)).softmax(-1), 0.2)
    assert torch.equal(probs, want)
    assert torch.equal(out, torch.matmul(want, v))
    # no dropout and nothing to quantize: SDPA's fused kernel, the same attention up to rounding
    out0, probs0 = attention_core(q, k, v, None, 0.5, 0.2, False, None)
    assert probs0 is None
    torch.testing.assert_close(out0, torch.matmul((q * 0.5 @ k.transpose(-2, -1)).softmax(-1), v))


@pytest.mark.parametrize("make,batch,n_dropout", [
    (tiny_bert_qa, lambda: bert_batch(), 2 * 3 + 1),          # per layer: attention, self-output, output; embeddings
    (tiny_wav2vec2_ctc, lambda: wav_batch(), 2 * 3 + 3),      # per layer: hidden, FF in/out; projection, encoder, final
    (lambda: tiny_vit(proj_drop_rate=0.1, attn_drop_rate=0.1), lambda: {"x": torch.randn(2, 3, 32, 32)}, None),
])
def test_use_fast_dropout_keeps_eval_outputs_and_the_dropout_schedule(make, batch, n_dropout):
    torch.manual_seed(0)
    model = make().eval()
    b = batch()
    with torch.no_grad():
        before = model(**b)
    n = use_fast_dropout(model)
    if n_dropout is not None:
        assert n == n_dropout
    assert not any(type(m) is nn.Dropout for m in model.modules())
    assert any(isinstance(m, FastDropout) for m in model.modules())
    if hasattr(model, "config"):  # transformers: the explicit attention path, whose dropout is fast_dropout
        assert model.config._attn_implementation == "compressed"
    with torch.no_grad():
        after = model(**b)
    for a, c in zip(before.values() if isinstance(before, dict) else [before],
                    after.values() if isinstance(after, dict) else [after]):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)
    sched = ScheduledDropout(model, 10, "linear", end_p=0.0)
    sched.step(10)
    assert all(p == 0.0 for p in sched.current())
    # back at the configured p, training draws its masks from torch's seed
    model.train()
    out = lambda: model(**b)
    sched.step(0)
    torch.manual_seed(3)
    x1 = out()
    torch.manual_seed(4)
    x2 = out()
    get = lambda o: o.logits if hasattr(o, "logits") else o.start_logits if hasattr(o, "start_logits") else o
    assert not torch.equal(get(x1), get(x2))
    torch.manual_seed(3)
    assert torch.equal(get(x1), get(out()))
