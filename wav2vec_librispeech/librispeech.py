"""Read LibriSpeech-layout corpora (the real one or our SYNTHETIC mini corpus) into Utterance records.

Layout (as distributed by OpenSLR, and as written by ``synth_corpus.py``):

    ROOT/LibriSpeech/<split>/<speaker>/<chapter>/<speaker>-<chapter>-<utt>.flac
    ROOT/LibriSpeech/<split>/<speaker>/<chapter>/<speaker>-<chapter>.trans.txt   ("<utt id> TRANSCRIPT")

Sources: ``read_librispeech`` (the folder tree) and ``load_hf_librispeech`` (the Hugging Face copy,
exported once into the same tree so everything downstream is identical; needs the hub, so not run here).
Batching choice: ``length_grouped_batches`` below, so a plain PyTorch loop gets the same padding savings
as HF Trainer's ``group_by_length`` without depending on Trainer.
"""
import logging
import os
import re
from dataclasses import dataclass
from math import gcd

import numpy as np
import soundfile as sf
from scipy.signal import resample_poly

from common.runs import DataError

log = logging.getLogger(__name__)
_UTT_ID = re.compile(r"^(\d+)-(\d+)-(\d+)$")


@dataclass(frozen=True)
class Utterance:
    """One utterance.  ``num_samples``/``sample_rate`` are as stored in the file (before any resampling)."""
    id: str
    path: str
    text: str
    num_samples: int
    sample_rate: int

    @property
    def seconds(self) -> float:
        return self.num_samples / self.sample_rate


def find_split_dir(root, split) -> str:
    """Accept ROOT, ROOT/LibriSpeech, or the split folder itself."""
    root = os.path.abspath(root)
    candidates = [os.path.join(root, "LibriSpeech", split), os.path.join(root, split)]
    if os.path.basename(root.rstrip(os.sep)) == split:
        candidates.insert(0, root)
    for c in candidates:
        if os.path.isdir(c):
            return c
    raise DataError(f"split folder {split!r} not found; tried: {', '.join(candidates)}")


def _audio_info(path):
    try:
        info = sf.info(path)
    except Exception as e:  # soundfile raises LibsndfileError / RuntimeError depending on version
        raise DataError(f"unreadable audio file {path}: {e}") from e
    if info.frames <= 0:
        raise DataError(f"empty audio file {path}")
    return info.frames, info.samplerate


def _parse_transcripts(split_dir):
    """{utt id: (flac path, text)} from every <speaker>/<chapter>/*.trans.txt, validating each line."""
    found = {}
    for spk in sorted(os.listdir(split_dir)):
        spk_dir = os.path.join(split_dir, spk)
        if not os.path.isdir(spk_dir):
            continue
        for chap in sorted(os.listdir(spk_dir)):
            chap_dir = os.path.join(spk_dir, chap)
            if not os.path.isdir(chap_dir):
                continue
            trans = os.path.join(chap_dir, f"{spk}-{chap}.trans.txt")
            if not os.path.isfile(trans):
                # Only a problem if there is audio here that would go unlabelled (checked below).
                continue
            with open(trans, encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    line = line.strip()
                    if not line:
                        continue
                    parts = line.split(" ", 1)
                    m = _UTT_ID.match(parts[0])
                    if len(parts) != 2 or not parts[1].strip() or not m or (m[1], m[2]) != (spk, chap):
                        raise DataError(f"{trans}:{lineno}: malformed transcript line {line!r} "
                                        f"(expected '{spk}-{chap}-<n> TRANSCRIPT')")
                    uid = parts[0]
                    if uid in found:
                        raise DataError(f"{trans}:{lineno}: duplicate utterance id {uid}")
                    flac = os.path.join(chap_dir, uid + ".flac")
                    if not os.path.isfile(flac):
                        raise DataError(f"{trans}:{lineno}: no audio file {flac} for utterance {uid}")
                    found[uid] = (flac, " ".join(parts[1].split()))
    return found


def filter_by_duration(utts, max_seconds):
    """(kept, n_dropped): drop utterances longer than ``max_seconds`` (None keeps all)."""
    if max_seconds is None:
        return list(utts), 0
    kept = [u for u in utts if u.seconds <= max_seconds]
    return kept, len(utts) - len(kept)


def read_librispeech(root, split, max_seconds=None):
    """List of Utterance for ``split``, sorted by id.  Raises DataError (a ValueError) naming the offending file.

    Utterances longer than ``max_seconds`` are dropped and the count is logged at WARNING level
    (call ``filter_by_duration`` yourself if you need the number).
    """
    split_dir = find_split_dir(root, split)
    found = _parse_transcripts(split_dir)
    # Every flac must be labelled: a stray file usually means a truncated or mixed-up transcript.
    for dirpath, _, files in os.walk(split_dir):
        for name in sorted(files):
            if name.endswith(".flac") and name[:-5] not in found:
                raise DataError(f"audio file {os.path.join(dirpath, name)} has no transcript line")
    if not found:
        raise DataError(f"no transcripts (*.trans.txt) found under {split_dir}")
    utts = []
    for uid in sorted(found):
        path, text = found[uid]
        n, sr = _audio_info(path)
        utts.append(Utterance(uid, path, text, n, sr))
    kept, dropped = filter_by_duration(utts, max_seconds)
    if dropped:
        log.warning("%s: dropped %d of %d utterances longer than %.1f s", split, dropped, len(utts), max_seconds)
    return kept


def load_audio(path, target_sr=16000) -> np.ndarray:
    """Mono float32 waveform at ``target_sr`` (channels averaged; resample_poly only if the rate differs)."""
    try:
        x, sr = sf.read(path, dtype="float32", always_2d=True)
    except Exception as e:
        raise DataError(f"unreadable audio file {path}: {e}") from e
    x = x.mean(axis=1)
    if sr != target_sr:
        g = gcd(int(sr), int(target_sr))
        x = resample_poly(x, target_sr // g, sr // g)
    return np.ascontiguousarray(x, dtype=np.float32)


# Hugging Face copy: (config, split) per LibriSpeech folder name.  The hub repo is parquet-only, so it
# loads with datasets >= 4 (which dropped loading scripts); the old script name "librispeech_asr" no longer does.
HF_SPLITS = {"train-clean-100": ("clean", "train.100"), "train-clean-360": ("clean", "train.360"),
             "train-other-500": ("other", "train.500"), "dev-clean": ("clean", "validation"),
             "dev-other": ("other", "validation"), "test-clean": ("clean", "test"),
             "test-other": ("other", "test")}


def export_rows(rows, out_root, split):
    """Write HF-style rows (id, text, speaker_id, chapter_id, audio={'bytes' or 'path'}) as the original tree."""
    by_chapter = {}
    for r in rows:
        spk, chap = str(r["speaker_id"]), str(r["chapter_id"])
        cdir = os.path.join(out_root, "LibriSpeech", split, spk, chap)
        os.makedirs(cdir, exist_ok=True)
        dst = os.path.join(cdir, r["id"] + ".flac")
        audio = r["audio"]
        if audio.get("bytes") is not None:
            with open(dst, "wb") as f:
                f.write(audio["bytes"])
        else:
            with open(audio["path"], "rb") as src, open(dst, "wb") as f:
                f.write(src.read())
        by_chapter.setdefault((spk, chap, cdir), []).append(f"{r['id']} {r['text']}\n")
    for (spk, chap, cdir), lines in by_chapter.items():
        with open(os.path.join(cdir, f"{spk}-{chap}.trans.txt"), "w", encoding="utf-8") as f:
            f.writelines(sorted(lines))


def load_hf_librispeech(split, cache_dir=None, repo="openslr/librispeech_asr", max_seconds=None):
    """Real LibriSpeech from the Hugging Face hub (NOT runnable here: no network), as Utterance records.

    Audio is kept undecoded (datasets 5 decodes through torchcodec, which we do not install) and written
    once as the original tree under ``cache_dir`` (default ~/.cache/librispeech_export), then read back
    with ``read_librispeech`` -- one code path for both sources.
    """
    import datasets  # local import: only this path needs it

    config, hf_split = HF_SPLITS[split]
    out_root = cache_dir or os.path.expanduser("~/.cache/librispeech_export")
    done = os.path.join(out_root, f".{split}.done")
    if not os.path.isfile(done):
        ds = datasets.load_dataset(repo, config, split=hf_split, cache_dir=cache_dir)
        ds = ds.cast_column("audio", datasets.Audio(decode=False))
        export_rows(ds, out_root, split)
        open(done, "w").close()
    return read_librispeech(out_root, split, max_seconds=max_seconds)


def length_grouped_batches(lengths, batch_size, seed, mega_batch_mult=50):
    """Index batches of similar length (less padding), random order; same idea as HF LengthGroupedSampler.

    Shuffle, cut into mega-batches of ``batch_size * mega_batch_mult``, sort each by length (longest
    first), cut into batches, then shuffle the order of the full batches; the one partial batch (the last
    mega-batch's end) goes last, since a loader that cuts the index stream into batch_size windows (the sharded
    Trainer's) would otherwise cut every later window across two length groups.  Deterministic in ``seed``;
    every index once.
    """
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(lengths))
    mega = batch_size * mega_batch_mult
    batches = []
    for i in range(0, len(order), mega):
        chunk = sorted(order[i:i + mega].tolist(), key=lambda j: -lengths[j])
        batches += [chunk[k:k + batch_size] for k in range(0, len(chunk), batch_size)]
    full, partial = [b for b in batches if len(b) == batch_size], [b for b in batches if len(b) < batch_size]
    return [full[i] for i in rng.permutation(len(full))] + partial
