"""Reader tests on tiny LibriSpeech-layout trees of sine waves (mini-scale, synthetic), plus one eSpeak run."""
import io
import json
import os

import numpy as np
import pytest
import soundfile as sf

from common.runs import DataError
from wav2vec_librispeech.librispeech import (export_rows, filter_by_duration, length_grouped_batches,
                                             load_audio, read_librispeech)


def _sine(seconds, sr=16000, hz=440.0):
    t = np.arange(int(seconds * sr)) / sr
    return (0.3 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def _make_tree(root, split="dev-clean"):
    """2 speakers x 1 chapter; utterance lengths 0.5, 1.0, 2.0 s.  Returns the chapter dirs."""
    spec = {("84", "121123"): [("0000", "HELLO WORLD", 0.5), ("0001", "GOOD DAY", 1.0)],
            ("174", "50561"): [("0000", "IT IS", 2.0)]}
    dirs = {}
    for (spk, chap), utts in spec.items():
        d = root / "LibriSpeech" / split / spk / chap
        d.mkdir(parents=True)
        for n, _, sec in utts:
            sf.write(d / f"{spk}-{chap}-{n}.flac", _sine(sec), 16000)
        (d / f"{spk}-{chap}.trans.txt").write_text(
            "".join(f"{spk}-{chap}-{n} {text}\n" for n, text, _ in utts))
        dirs[spk] = d
    return dirs


def test_reads_pairs_from_any_root_form(tmp_path):
    _make_tree(tmp_path)
    for root in (tmp_path, tmp_path / "LibriSpeech", tmp_path / "LibriSpeech" / "dev-clean"):
        utts = read_librispeech(root, "dev-clean")
        assert [(u.id, u.text, u.num_samples, u.sample_rate) for u in utts] == [
            ("174-50561-0000", "IT IS", 32000, 16000),
            ("84-121123-0000", "HELLO WORLD", 8000, 16000),
            ("84-121123-0001", "GOOD DAY", 16000, 16000)]
        assert all(os.path.basename(u.path) == u.id + ".flac" for u in utts)


def test_max_seconds_drops_and_logs(tmp_path, caplog):
    _make_tree(tmp_path)
    utts = read_librispeech(tmp_path, "dev-clean", max_seconds=1.5)
    assert [u.id for u in utts] == ["84-121123-0000", "84-121123-0001"]
    assert "dropped 1 of 3" in caplog.text
    assert filter_by_duration(read_librispeech(tmp_path, "dev-clean"), 0.75)[1] == 2


def test_missing_split_folder(tmp_path):
    _make_tree(tmp_path)
    with pytest.raises(ValueError, match="test-other"):
        read_librispeech(tmp_path, "test-other")


def test_missing_flac_names_transcript_and_file(tmp_path):
    d = _make_tree(tmp_path)["84"]
    os.remove(d / "84-121123-0001.flac")
    with pytest.raises(ValueError, match=r"84-121123\.trans\.txt:2: .*84-121123-0001\.flac"):
        read_librispeech(tmp_path, "dev-clean")


def test_flac_without_transcript_line(tmp_path):
    d = _make_tree(tmp_path)["84"]
    sf.write(d / "84-121123-0002.flac", _sine(0.2), 16000)
    with pytest.raises(ValueError, match=r"84-121123-0002\.flac has no transcript"):
        read_librispeech(tmp_path, "dev-clean")


@pytest.mark.parametrize("bad", ["84-121123-0001", "84-999-0001 GOOD DAY", "HELLO WORLD"])
def test_malformed_transcript_line(tmp_path, bad):
    d = _make_tree(tmp_path)["84"]
    (d / "84-121123.trans.txt").write_text(f"84-121123-0000 HELLO WORLD\n{bad}\n")
    with pytest.raises(DataError, match=r"84-121123\.trans\.txt:2: malformed"):  # a RunError: one line (cli)
        read_librispeech(tmp_path, "dev-clean")


def test_unreadable_audio(tmp_path):
    d = _make_tree(tmp_path)["174"]
    (d / "174-50561-0000.flac").write_bytes(b"not a flac file at all")
    with pytest.raises(ValueError, match=r"unreadable audio file .*174-50561-0000\.flac"):
        read_librispeech(tmp_path, "dev-clean")
    with pytest.raises(ValueError, match=r"174-50561-0000\.flac"):
        load_audio(d / "174-50561-0000.flac")


def test_load_audio_resamples_8k_and_downmixes_stereo(tmp_path):
    sf.write(tmp_path / "a.flac", _sine(1.25, sr=8000), 8000)
    x = load_audio(tmp_path / "a.flac")
    assert x.dtype == np.float32 and x.shape == (20000,)
    stereo = np.stack([_sine(0.5), np.zeros(8000, np.float32)], axis=1)
    sf.write(tmp_path / "s.flac", stereo, 16000)
    y = load_audio(tmp_path / "s.flac")
    assert y.shape == (8000,) and np.allclose(y, stereo.mean(1), atol=1e-4)  # 16-bit FLAC rounding


def test_export_rows_roundtrip(tmp_path):
    # Same row shape as the HF dataset with Audio(decode=False); lets load_hf_librispeech's writer be tested offline.
    buf = io.BytesIO()
    sf.write(buf, _sine(0.3), 16000, format="FLAC")
    rows = [{"id": "19-198-0001", "text": "NORTHANGER ABBEY", "speaker_id": 19, "chapter_id": 198,
             "audio": {"bytes": buf.getvalue(), "path": "19-198-0001.flac"}}]
    export_rows(rows, tmp_path, "test-clean")
    (u,) = read_librispeech(tmp_path, "test-clean")
    assert (u.id, u.text, u.num_samples) == ("19-198-0001", "NORTHANGER ABBEY", 4800)


def test_length_grouped_batches():
    lengths = [5, 1, 9, 3, 7, 2, 8, 4, 6, 10]
    b = length_grouped_batches(lengths, batch_size=3, seed=0, mega_batch_mult=100)
    assert sorted(i for batch in b for i in batch) == list(range(10))
    assert b == length_grouped_batches(lengths, batch_size=3, seed=0, mega_batch_mult=100)
    # One mega-batch: batches are contiguous runs of the length-sorted order.
    assert sorted(sorted(lengths[i] for i in batch) for batch in b) == [[1], [2, 3, 4], [5, 6, 7], [8, 9, 10]]
    # the partial batch last, in every seed: cut into windows of 3, the index stream keeps each window one group
    for seed in range(5):
        b = length_grouped_batches(lengths, batch_size=3, seed=seed, mega_batch_mult=100)
        assert [len(x) for x in b] == [3, 3, 3, 1]


def test_training_order_depends_on_the_global_batch_alone():
    """CTCTrainer's length-grouped sampler groups whole global batches, so per-device batch x accumulation x
    processes = 8 gives one order however it is made up (the same global batches on 1 GPU or 8; a checkpoint
    resumes on another world size), and another global batch gives another order."""
    from types import SimpleNamespace
    from wav2vec_librispeech.trainer_ctc import CTCTrainer
    ds = SimpleNamespace(lengths=list(np.random.default_rng(0).integers(1, 100, 203)))

    def order(per_device, accum, world):
        args = SimpleNamespace(train_sampling_strategy="group_by_length", data_seed=None, seed=3, world_size=world,
                               per_device_train_batch_size=per_device, gradient_accumulation_steps=accum)
        return list(CTCTrainer._get_train_sampler(SimpleNamespace(args=args, train_dataset=ds)))

    one = order(8, 1, 1)
    assert sorted(one) == list(range(203))
    assert order(2, 4, 1) == order(4, 1, 2) == order(1, 1, 8) == one
    assert order(4, 1, 1) != one


def _espeak_available():
    try:
        from wav2vec_librispeech.synth_corpus import Espeak
        Espeak().close()
        return True
    except Exception:
        return False


@pytest.mark.skipif(not _espeak_available(), reason="eSpeak NG library failed to load")
def test_synth_corpus_roundtrip(tmp_path, capsys):
    from wav2vec_librispeech.synth_corpus import WORDS, synthesize_corpus

    s = synthesize_corpus(tmp_path, seed=0, n_train=6, n_eval=3)
    assert s["utterances"] == {"train-clean-100": 6, "dev-clean": 3, "test-clean": 3, "test-other": 3}
    assert "SYNTHETIC" in (tmp_path / "README.txt").read_text()
    assert json.loads((tmp_path / "params.json").read_text())["n_train"] == 6
    texts = {}
    for split, n in s["utterances"].items():
        utts = read_librispeech(tmp_path, split)
        assert len(utts) == n and all(u.sample_rate == 16000 and 0.3 < u.seconds < 10 for u in utts)
        assert all(2 <= len(u.text.split()) <= 5 and set(u.text.split()) <= set(WORDS) for u in utts)
        texts[split] = {u.text for u in utts}
        x = load_audio(utts[0].path)
        assert x.shape == (utts[0].num_samples,) and 0.3 < np.abs(x).max() <= 1.0
    for split in ("dev-clean", "test-clean", "test-other"):
        assert not texts[split] & texts["train-clean-100"]  # held-out sentences
    assert synthesize_corpus(tmp_path, seed=0, n_train=6, n_eval=3)["skipped"]


def test_synth_conditions_held_out():
    from wav2vec_librispeech.synth_corpus import TRAIN_PITCHES, TRAIN_RATES, TRAIN_VOICES, _conditions

    c = _conditions()
    train = set(c["train-clean-100"])
    assert len(train) == 35 and len(set(TRAIN_VOICES)) >= 3
    for split in ("dev-clean", "test-clean"):  # unseen combination of seen voice, rate and pitch
        assert not set(c[split]) & train
        assert {r for _, r, _ in c[split]} == set(TRAIN_RATES) and {p for *_, p in c[split]} == set(TRAIN_PITCHES)
    assert not set(c["dev-clean"]) & set(c["test-clean"])
    for v, r, p in c["test-other"]:  # harder: unseen voice, rate and pitch outside the train range
        assert v not in TRAIN_VOICES and not min(TRAIN_RATES) <= r <= max(TRAIN_RATES)
        assert not min(TRAIN_PITCHES) <= p <= max(TRAIN_PITCHES)


def test_the_mini_generator_never_deletes_a_users_corpus(tmp_path):
    """A real LibriSpeech tree under data.librispeech_root (no params.json of the generator) is refused and kept,
    by the pipeline before it starts the generator and by the generator itself."""
    from common.runs import RunError
    from common.runs import mark_generated
    from wav2vec_librispeech.synth_corpus import foreign_splits, synthesize_corpus
    from wav2vec_librispeech.train import ensure_mini_data
    mine = tmp_path / "LibriSpeech" / "dev-clean" / "84" / "121123" / "84-121123.trans.txt"
    mine.parent.mkdir(parents=True)
    mine.write_text("84-121123-0000 GO DO YOU HEAR\n")
    split = tmp_path / "LibriSpeech" / "dev-clean"
    with pytest.raises(RunError, match=f"{split}: not made by the mini generator.*set data.generate_mini=null"):
        ensure_mini_data({"generate_mini": {"seed": 0}, "librispeech_root": str(tmp_path)})
    with pytest.raises(FileExistsError, match=f"{split}: not made by this script"):
        synthesize_corpus(tmp_path, seed=0, n_train=2, n_eval=1)
    assert mine.read_text() == "84-121123-0000 GO DO YOU HEAR\n"
    mark_generated(tmp_path, "test")  # a build of the generator's own, interrupted before params.json: rebuilt
    assert foreign_splits(tmp_path) == []
