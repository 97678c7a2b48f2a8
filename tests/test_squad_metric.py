"""SQuAD v1.1 metric (hand-computed + torchmetrics cross-check) and span post-processing."""

import numpy as np
import pytest
from transformers import AutoTokenizer

from bert_squad.squad_data import minilm_path
from bert_squad.utils_qa import (exact_match_score, f1_score, normalize_answer, postprocess_qa_predictions,
                                 prepare_train_features, prepare_validation_features, squad_metrics)

# id -> (prediction, golds, expected EM, expected F1), all computed by hand
CASES = {
    "q1": ("The Eiffel Tower.", ["eiffel tower"], 1.0, 1.0),
    # pred tokens [cat, sat, on, mat], gold [cat, sat]: P = 2/4, R = 2/2, F1 = 2/3
    "q2": ("the cat sat on a mat", ["A cat sat"], 0.0, 2 / 3),
    # pred [4, 1952]; best gold wins: vs [march, 4, 1952] P = 1, R = 2/3 -> 0.8;
    # vs [1952] P = 1/2, R = 1 -> 2/3; vs [4, march] P = R = 1/2 -> 1/2
    "q3": ("4, 1952", ["March 4, 1952", "1952", "4 March"], 0.0, 0.8),
    "q4": ("Paris", ["Lyon"], 0.0, 0.0),
    # repeated tokens count once per occurrence: pred [new, new, york], gold [new, york] -> P = 2/3, R = 1, F1 = 0.8
    "q5": ("new new york", ["New York"], 0.0, 0.8),
}


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(minilm_path())


def test_normalize_answer():
    assert normalize_answer("  The  Cat's   hat! ") == "cats hat"
    assert normalize_answer("An apple, a pear; THE end.") == "apple pear end"
    assert normalize_answer("theatre") == "theatre"  # articles only as whole words


@pytest.mark.parametrize("qid", sorted(CASES))
def test_single_scores(qid):
    pred, golds, em, f1 = CASES[qid]
    assert max(exact_match_score(pred, g) for g in golds) == em
    assert max(f1_score(pred, g) for g in golds) == pytest.approx(f1)


def test_squad_metrics_hand_computed_and_torchmetrics():
    from torchmetrics.functional.text.squad import squad as tm_squad

    preds = {qid: c[0] for qid, c in CASES.items()}
    refs = {qid: c[1] for qid, c in CASES.items()}
    ours = squad_metrics(preds, refs)
    assert ours["exact_match"] == pytest.approx(100 * 1 / 5)
    assert ours["f1"] == pytest.approx(100 * (1 + 2 / 3 + 0.8 + 0 + 0.8) / 5)
    tm = tm_squad([{"id": q, "prediction_text": p} for q, p in preds.items()],
                  [{"id": q, "answers": {"text": g, "answer_start": [0] * len(g)}} for q, g in refs.items()])
    assert ours["exact_match"] == pytest.approx(float(tm["exact_match"]), abs=1e-4)
    assert ours["f1"] == pytest.approx(float(tm["f1"]), abs=1e-4)


def test_squad_metrics_missing_prediction_scores_zero():
    out = squad_metrics({"a": "x"}, {"a": ["x"], "b": ["y"]})
    assert out == {"exact_match": 50.0, "f1": 50.0}
    with pytest.raises(ValueError, match="id=b"):
        squad_metrics({"a": "x"}, {"a": ["x"], "b": []})


CONTEXT = "Kalo Venn was born in Paris in 1950. The mayor of Lyon is Ana Bell"  # no final period on purpose
QUESTION = "Where was Kalo Venn born?"


def _features(tokenizer, context=CONTEXT, max_len=128, stride=32):
    ex = {"id": ["e1"], "question": [QUESTION], "context": [context]}
    return ex, prepare_validation_features(ex, tokenizer, max_len, stride)


def _token(feats, context, word, f=0):
    """Index of the context token starting at `word` in feature f."""
    start = context.index(word)
    return next(i for i, o in enumerate(feats["offset_mapping"][f]) if o is not None and o[0] == start)


def test_postprocess_picks_span_and_respects_limits(tokenizer):
    ex, feats = _features(tokenizer)
    n = len(feats["input_ids"][0])
    assert n == 128 and feats["example_id"] == ["e1"]
    assert feats["offset_mapping"][0][0] is None  # [CLS] is outside the context
    paris, bell = _token(feats, CONTEXT, "Paris"), _token(feats, CONTEXT, "Bell")
    s, e = np.zeros((1, n)), np.zeros((1, n))
    s[0, paris], e[0, paris], e[0, bell] = 10, 5, 9
    s[0, 0] = e[0, 0] = 50  # [CLS]: highest logits, but outside the context
    s[0, 1] = e[0, 2] = 40  # question tokens: likewise
    s[0, n - 1] = e[0, n - 1] = 60  # padding
    assert postprocess_qa_predictions(ex, feats, s, e) == {"e1": "Paris in 1950. The mayor of Lyon is Ana Bell"}
    assert postprocess_qa_predictions(ex, feats, s, e, max_answer_length=3) == {"e1": "Paris"}
    # an end before the start is never valid
    s2, e2 = np.zeros((1, n)), np.zeros((1, n))
    s2[0, bell], e2[0, paris], e2[0, bell] = 10, 20, 1
    assert postprocess_qa_predictions(ex, feats, s2, e2) == {"e1": "Bell"}


def test_long_context_windows_and_train_labels(tokenizer):
    filler = " ".join(f"Town{i} has a river." for i in range(30))
    context = filler + " The mayor of Lyon is Ana Bell"
    ex, feats = _features(tokenizer, context, max_len=48, stride=16)
    n_feat = len(feats["input_ids"])
    assert n_feat > 3 and set(feats["example_id"]) == {"e1"}
    # logits favour "Ana Bell" in the last window only; ragged rows (no padding) are accepted
    s = [np.zeros(len(ids)) for ids in feats["input_ids"]]
    e = [np.zeros(len(ids)) for ids in feats["input_ids"]]
    last = n_feat - 1
    s[last][_token(feats, context, "Ana", last)] = 5
    e[last][_token(feats, context, "Bell", last)] = 5
    assert postprocess_qa_predictions(ex, feats, s, e) == {"e1": "Ana Bell"}

    # training labels: the answer is the last context token of the last window (the HF edge case)
    start = context.index("Ana Bell")
    ex["answers"] = [{"text": ["Ana Bell"], "answer_start": [start]}]
    tr = prepare_train_features(ex, tokenizer, 48, 16)
    assert "offset_mapping" not in tr and len(tr["input_ids"]) == n_feat
    labelled = [i for i in range(n_feat) if tr["start_positions"][i] != 0]
    assert labelled and labelled[-1] == last
    for i in range(n_feat):
        sp, ep = tr["start_positions"][i], tr["end_positions"][i]
        if i in labelled:
            assert tokenizer.decode(tr["input_ids"][i][sp:ep + 1]) == "ana bell"
        else:
            assert sp == ep == 0  # [CLS]: answer not inside this window
