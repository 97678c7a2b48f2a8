"""Character vocabulary, greedy CTC decoding and WER/CER for the wav2vec2 CTC pipeline.

The vocabulary is the one of facebook/wav2vec2-base-960h / wav2vec2-large-960h (same ids, same order),
so a CTC head from those checkpoints would line up with it: <pad>=0 is the CTC blank.
"""
import json
import os

import jiwer
import numpy as np

# Id order copied from the HF 960h checkpoints (letters by English frequency), not alphabetical.
_VOCAB_ORDER = ["<pad>", "<s>", "</s>", "<unk>", "|",
                "E", "T", "A", "O", "N", "I", "H", "S", "R", "D", "L", "U", "M", "W", "C", "F", "G",
                "Y", "P", "B", "V", "K", "'", "X", "J", "Q", "Z"]
BLANK_ID = 0
WORD_DELIMITER = "|"


def build_vocab() -> dict:
    """{token: id}, 32 entries: <pad>(blank)=0, <s>=1, </s>=2, <unk>=3, '|'=4, letters and "'"."""
    return {t: i for i, t in enumerate(_VOCAB_ORDER)}


def make_tokenizer(out_dir):
    """Write ``out_dir/vocab.json`` and return a Wav2Vec2CTCTokenizer on it (pad_token_id == 0 == blank)."""
    from transformers import Wav2Vec2CTCTokenizer  # local import: transformers is slow to import

    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "vocab.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(build_vocab(), f)
    return Wav2Vec2CTCTokenizer(path, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                eos_token="</s>", word_delimiter_token=WORD_DELIMITER)


def _to_numpy(x):
    if hasattr(x, "detach"):  # torch tensor, without importing torch here
        x = x.detach().float().cpu() if x.is_floating_point() else x.detach().cpu()
        return x.numpy()
    return x


def greedy_ctc_decode(logits_or_ids, blank_id, id_to_char, word_delimiter=WORD_DELIMITER, lengths=None):
    """Best-path CTC decoding -> list of strings.

    ``logits_or_ids``: float logits (B, T, V) or (T, V), argmax'ed over the last axis; or integer ids
    (B, T), (T,), or a list of id lists of different lengths.  ``lengths`` (optional, per sequence) cuts
    off padded frames.  ``id_to_char``: dict id -> token or a list indexed by id.
    Steps: collapse repeats, drop blanks, drop special tokens "<...>" (choice: <unk>/<s>/</s> carry no
    characters in a transcript), map the word delimiter to a space, strip and collapse spaces.
    """
    x = _to_numpy(logits_or_ids)
    if isinstance(x, np.ndarray):
        if np.issubdtype(x.dtype, np.floating):
            x = x.argmax(-1)  # logits: the class axis is the last one
            if x.ndim == 1:
                x = x[None]
        elif x.ndim == 1:
            x = x[None]
        seqs = [list(map(int, row)) for row in x]
    else:
        seqs = [list(map(int, s)) for s in x]
    if lengths is not None:
        seqs = [s[:int(n)] for s, n in zip(seqs, _to_numpy(lengths))]
    out = []
    for seq in seqs:
        chars, prev = [], None
        for i in seq:
            # A repeat only collapses when not separated by a blank: "L <blank> L" stays "LL".
            if i != prev and i != blank_id:
                tok = id_to_char[i]
                if tok == word_delimiter:
                    chars.append(" ")
                elif not (tok.startswith("<") and tok.endswith(">")):
                    chars.append(tok)
            prev = i
        out.append(" ".join("".join(chars).split()))
    return out


def _check(refs, hyps):
    refs, hyps = list(refs), list(hyps)
    if len(refs) != len(hyps) or not refs:
        raise ValueError(f"need equally many refs and hyps (>0), got {len(refs)} and {len(hyps)}")
    return refs, hyps


def wer(refs, hyps) -> float:
    """Corpus-level word error rate as a fraction: total word edits / total reference words (jiwer)."""
    return float(jiwer.wer(*_check(refs, hyps)))


def cer(refs, hyps) -> float:
    """Corpus-level character error rate as a fraction (jiwer; spaces count as characters)."""
    return float(jiwer.cer(*_check(refs, hyps)))
