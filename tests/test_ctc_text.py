"""CTC vocabulary, greedy decoding and WER/CER on hand-made cases."""
import jiwer
import numpy as np
import pytest
import torch

from wav2vec_librispeech.ctc_text import BLANK_ID, build_vocab, cer, greedy_ctc_decode, make_tokenizer, wer

VOCAB = build_vocab()
ID2CHAR = {i: t for t, i in VOCAB.items()}


def _ids(frames):
    """'HH-EE-LL-LL-O|' -> ids, '-' = blank."""
    return [BLANK_ID if c == "-" else VOCAB[c] for c in frames]


def _logits(frames, rng):
    """One-hot-ish logits whose argmax spells ``frames``, with random noise below the peak."""
    ids = _ids(frames)
    x = rng.normal(0, 0.1, size=(len(ids), len(VOCAB))).astype(np.float32)
    x[np.arange(len(ids)), ids] = 5.0
    return x


def test_vocab_matches_hf_960h():
    assert len(VOCAB) == 32 and VOCAB["<pad>"] == 0 and VOCAB["|"] == 4 and VOCAB["E"] == 5
    assert VOCAB["'"] == 27 and VOCAB["Z"] == 31
    assert set(VOCAB) >= {chr(c) for c in range(ord("A"), ord("Z") + 1)}


def test_tokenizer(tmp_path):
    tok = make_tokenizer(tmp_path)
    assert (tmp_path / "vocab.json").is_file()
    assert tok.pad_token_id == BLANK_ID and tok.word_delimiter_token_id == 4
    ids = tok("HELLO WORLD").input_ids
    assert ids == _ids("HELLO|WORLD")
    assert tok.decode(ids, group_tokens=False) == "HELLO WORLD"  # labels: no CTC grouping


def test_greedy_collapses_repeats_and_blanks():
    rng = np.random.default_rng(0)
    frames = ["HH-EE-LL-LL-O||WW-O-RR-LLL-D", "--A|||B-B--|", "----", "HE'S||"]
    expect = ["HELLO WORLD", "A BB", "", "HE'S"]
    assert greedy_ctc_decode(_logits(frames[0], rng), BLANK_ID, ID2CHAR) == expect[:1]  # (T, V)
    # (B, T, V) batch padded with blanks, as a torch tensor
    T = max(map(len, frames))
    batch = np.stack([_logits(f + "-" * (T - len(f)), rng) for f in frames])
    assert greedy_ctc_decode(torch.from_numpy(batch), BLANK_ID, ID2CHAR) == expect
    # integer ids, ragged lists, and a list as id_to_char
    id_list = [ID2CHAR[i] for i in range(len(ID2CHAR))]
    assert greedy_ctc_decode([_ids(f) for f in frames], BLANK_ID, id_list) == expect


def test_greedy_lengths_and_specials():
    ids = np.array([_ids("AA-B|C") + [VOCAB["<unk>"], VOCAB["D"]] + _ids("EEEE")])
    assert greedy_ctc_decode(ids, BLANK_ID, ID2CHAR) == ["AB CDE"]  # <unk> dropped
    assert greedy_ctc_decode(ids, BLANK_ID, ID2CHAR, lengths=[4]) == ["AB"]
    assert greedy_ctc_decode(np.array(_ids("|A|B|")), BLANK_ID, ID2CHAR) == ["A B"]  # 1-D ids


def test_wer_cer_hand_computed_and_match_jiwer():
    refs = ["THE CAT SAT", "ON THE MAT", "HELLO"]
    hyps = ["THE CAT SAT", "ON A MAT MAT", ""]
    # words: 0 + (1 sub + 1 ins) + 1 del = 3 errors over 7 reference words
    assert wer(refs, hyps) == pytest.approx(3 / 7)
    assert wer(refs, hyps) == pytest.approx(jiwer.wer(refs, hyps))
    # chars (spaces count): ABCD->ABXD 1 sub, HELLO->HELO 1 del, AB->"AB C" 2 ins; 4 errors / 11 chars
    crefs, chyps = ["ABCD", "HELLO", "AB"], ["ABXD", "HELO", "AB C"]
    assert cer(crefs, chyps) == pytest.approx(4 / 11)
    assert cer(crefs, chyps) == pytest.approx(jiwer.cer(crefs, chyps))
    assert cer(refs, hyps) == pytest.approx(jiwer.cer(refs, hyps))
    assert wer(["A B"], ["A B"]) == 0.0 and cer(["AB"], ["XY"]) == 1.0
    with pytest.raises(ValueError):
        wer(["A"], [])
