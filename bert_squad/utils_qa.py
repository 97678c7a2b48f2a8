"""SQuAD feature preparation, answer post-processing and the official v1.1 metric.

Follows the logic of Hugging Face examples/pytorch/question-answering (run_qa.py, utils_qa.py):
long contexts are split into windows of `max_seq_length` tokens overlapping by `doc_stride`,
each window is one *feature*; predictions are mapped back to character spans through the
tokenizer's offset mapping and the best span over all features of an example wins.
Needs a fast (Rust) tokenizer for offsets and sequence ids.
"""

import collections
import re
import string
from collections import Counter

import numpy as np


def _tokenize(examples, tokenizer, max_seq_length, doc_stride, pad_to_max_length):
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("a fast tokenizer is required (offset mapping / sequence ids)")
    pad_on_right = tokenizer.padding_side == "right"
    # some SQuAD questions start with long runs of spaces that would eat the token budget
    questions = [q.lstrip() for q in examples["question"]]
    contexts = examples["context"]
    enc = tokenizer(
        questions if pad_on_right else contexts,
        contexts if pad_on_right else questions,
        truncation="only_second" if pad_on_right else "only_first",
        max_length=min(max_seq_length, tokenizer.model_max_length),
        stride=doc_stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
        padding="max_length" if pad_to_max_length else False,
    )
    return enc, (1 if pad_on_right else 0)


def prepare_train_features(examples, tokenizer, max_seq_length=384, doc_stride=128, pad_to_max_length=True):
    """Batched `datasets.map` function: examples -> training features with start/end_positions.

    Use with `remove_columns=<example columns>` since one example may give several features.
    A window that does not contain the whole (first) answer is labelled with the [CLS] index.
    """
    enc, ctx = _tokenize(examples, tokenizer, max_seq_length, doc_stride, pad_to_max_length)
    sample_map = enc.pop("overflow_to_sample_mapping")
    offsets_all = enc.pop("offset_mapping")
    enc["start_positions"], enc["end_positions"] = [], []
    for i, offsets in enumerate(offsets_all):
        ids = enc["input_ids"][i]
        cls = ids.index(tokenizer.cls_token_id) if tokenizer.cls_token_id in ids else 0
        seq = enc.sequence_ids(i)
        answers = examples["answers"][sample_map[i]]
        start, end = cls, cls
        if len(answers["answer_start"]) > 0:
            s_char = answers["answer_start"][0]
            e_char = s_char + len(answers["text"][0])
            c_first = seq.index(ctx)
            c_last = len(seq) - 1 - seq[::-1].index(ctx)
            if offsets[c_first][0] <= s_char and offsets[c_last][1] >= e_char:
                # scan only context tokens: HF's loop can walk into [SEP] when the answer ends the window
                start = c_first
                while start <= c_last and offsets[start][0] <= s_char:
                    start += 1
                start -= 1
                end = c_last
                while end >= c_first and offsets[end][1] >= e_char:
                    end -= 1
                end += 1
        enc["start_positions"].append(start)
        enc["end_positions"].append(end)
    return enc


def prepare_validation_features(examples, tokenizer, max_seq_length=384, doc_stride=128, pad_to_max_length=True):
    """Batched `datasets.map` function: examples -> eval features with example_id and offset_mapping.

    offset_mapping is None for tokens outside the context (question, special tokens, padding),
    so post-processing can never pick them. Drop both columns before feeding the model.
    """
    enc, ctx = _tokenize(examples, tokenizer, max_seq_length, doc_stride, pad_to_max_length)
    sample_map = enc.pop("overflow_to_sample_mapping")
    enc["example_id"] = []
    for i in range(len(enc["input_ids"])):
        seq = enc.sequence_ids(i)
        enc["example_id"].append(examples["id"][sample_map[i]])
        enc["offset_mapping"][i] = [o if seq[k] == ctx else None for k, o in enumerate(enc["offset_mapping"][i])]
    return enc


def postprocess_qa_predictions(examples, features, start_logits, end_logits, n_best_size=20, max_answer_length=30):
    """Best answer text per example id from per-feature start/end logits.

    `start_logits`/`end_logits`: one row per feature, in the order of `features` (2-D array, or a
    list of 1-D arrays when batches were padded to different lengths). Considers the top
    `n_best_size` start and end tokens of every feature, skips spans outside the context, with
    end < start, or longer than `max_answer_length` tokens, and ranks by start + end logit.
    An example with no valid span gets "" (scores 0 under the v1.1 metric).
    """
    feature_ids = list(features["example_id"])
    feature_offsets = list(features["offset_mapping"])
    if len(start_logits) != len(feature_ids) or len(end_logits) != len(feature_ids):
        raise ValueError(f"got {len(start_logits)}/{len(end_logits)} logit rows for {len(feature_ids)} features")
    by_example = collections.defaultdict(list)
    for f_idx, ex_id in enumerate(feature_ids):
        by_example[ex_id].append(f_idx)

    predictions = {}
    for ex_id, context in zip(examples["id"], examples["context"]):
        best_score, best_text = None, ""
        for f_idx in by_example.get(ex_id, []):
            offsets = feature_offsets[f_idx]
            n = len(offsets)  # logits may carry extra padding columns
            s_logits = np.asarray(start_logits[f_idx], dtype=np.float64)[:n]
            e_logits = np.asarray(end_logits[f_idx], dtype=np.float64)[:n]
            starts = np.argsort(s_logits)[::-1][:n_best_size]
            ends = np.argsort(e_logits)[::-1][:n_best_size]
            for s in starts:
                if offsets[s] is None:
                    continue
                for e in ends:
                    if offsets[e] is None or e < s or e - s + 1 > max_answer_length:
                        continue
                    score = s_logits[s] + e_logits[e]
                    if best_score is None or score > best_score:
                        best_score, best_text = score, context[offsets[s][0]:offsets[e][1]]
        predictions[ex_id] = best_text
    return predictions


# ---------------------------------------------------------------- official SQuAD v1.1 metric

_PUNCT = set(string.punctuation)

def normalize_answer(s):
    """Lower-case, drop punctuation and the articles a/an/the, collapse whitespace (official v1.1)."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def exact_match_score(prediction, ground_truth):
    """1.0 if the normalized strings are equal, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(ground_truth))


def f1_score(prediction, ground_truth):
    """Token-level F1 of normalized bags of words (0.0 when nothing overlaps, as in v1.1)."""
    pred, gold = normalize_answer(prediction).split(), normalize_answer(ground_truth).split()
    num_same = sum((Counter(pred) & Counter(gold)).values())
    if num_same == 0:
        return 0.0
    precision, recall = num_same / len(pred), num_same / len(gold)
    return 2 * precision * recall / (precision + recall)


def squad_metrics(predictions, references):
    """{"exact_match", "f1"} in percent: max over gold answers, mean over all reference questions.

    `predictions`: {id: text}; `references`: {id: [gold texts]}. A question without a prediction
    scores 0, as in the official script; predictions for unknown ids are ignored.
    """
    if not references:
        raise ValueError("no reference questions")
    em = f1 = 0.0
    for qid, golds in references.items():
        if not golds:
            raise ValueError(f"question id={qid}: no gold answers")
        if qid not in predictions:
            continue
        pred = predictions[qid]
        em += max(exact_match_score(pred, g) for g in golds)
        f1 += max(f1_score(pred, g) for g in golds)
    return {"exact_match": 100.0 * em / len(references), "f1": 100.0 * f1 / len(references)}
