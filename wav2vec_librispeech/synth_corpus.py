"""Synthesize a mini-scale, SYNTHETIC speech corpus with eSpeak NG, in the LibriSpeech layout.

Stand-in for LibriSpeech (which cannot be downloaded here): short sentences drawn from a fixed
100-word vocabulary, spoken by eSpeak NG (the ``espeakng-loader`` wheel ships the library and its
voice data) through ctypes, resampled 22,050 -> 16,000 Hz, written as 16 kHz mono FLAC:

    ROOT/LibriSpeech/<split>/<speaker>/<chapter>/<speaker>-<chapter>-<utt:04d>.flac
    ROOT/LibriSpeech/<split>/<speaker>/<chapter>/<speaker>-<chapter>.trans.txt
    ROOT/params.json   ROOT/README.txt

A "speaker" is one (voice, rate, pitch) condition.  Splits (choices, mirroring LibriSpeech's roles):
  * train-clean-100: 5 English voices x 3 rates x 3 pitches, minus the cells held out below.
  * dev-clean / test-clean: held-out sentences (word sequences never in train) spoken in grid cells
    held out from train -- every voice, rate and pitch value was heard in train, not that combination
    (LibriSpeech's eval speakers are likewise disjoint from train).
  * test-other: held-out sentences AND harder conditions: voices not in train, rates and pitches
    outside the train range.  No added noise (choice: keep "other" a speaker shift only).

Deterministic: the same parameters give the same transcripts, conditions and ids.  Audio is
bit-identical only across fresh processes with the same eSpeak build (checked): eSpeak keeps
waveform-generator state (pitch phase) across calls and espeak_Initialize does not reset it, so a
second build in the same process differs by a few samples per utterance (inaudible).

    python -m wav2vec_librispeech.synth_corpus --out_dir ROOT [--seed 0 --n_train 1500 --n_eval 150] [--force]
"""
import argparse
import ctypes
import json
import os
import shutil
import time
from math import gcd

import numpy as np
import soundfile as sf
from scipy.signal import resample_poly

FORMAT_VERSION = 2  # bump when the on-disk format or generator changes so old trees are rebuilt
TARGET_SR = 16000
README = ("SYNTHETIC mini-scale speech corpus made with eSpeak NG (wav2vec_librispeech/synth_corpus.py), "
          "NOT LibriSpeech; only the directory layout and transcript format follow LibriSpeech. "
          "100-word vocabulary, sentences of 2-5 words; a speaker is a (voice, rate, pitch) condition. "
          "See params.json.\n")

# 100 common English words, upper case, no apostrophes.  Homophones of each other (to/two, there/their,
# see/sea, no/know, ...) are left out on purpose: with random word order nothing could tell them apart.
WORDS = """
THE AND OF TO IN IS YOU THAT IT HE WAS FOR ON ARE WITH THEY BE AT ONE HAVE THIS FROM BY WORD
BUT WHAT SOME WE CAN OUT OTHER WERE ALL THERE WHEN UP USE HOW SAID EACH SHE WHICH DO TIME IF
WILL WAY ABOUT MANY THEN THEM LIKE SO THESE HER LONG MAKE SEE HIM HAS LOOK MORE DAY COULD
GO COME DID NUMBER SOUND NO MOST PEOPLE MY OVER WATER CALL FIRST WHO MAY DOWN SIDE BEEN NOW FIND
HEAD STAND PAGE SHOULD COUNTRY ANSWER SCHOOL STUDY LEARN PLANT FOOD EARTH LIGHT CITY TREE NIGHT
""".split()
assert len(WORDS) == 100 and len(set(WORDS)) == 100

SPLITS = ("train-clean-100", "dev-clean", "test-clean", "test-other")
TRAIN_VOICES = ("en-us", "en-us+f2", "en+m3", "en-gb-scotland", "en-gb-x-rp+f4")
TRAIN_RATES = (155, 175, 195)   # words per minute (eSpeak default 175)
TRAIN_PITCHES = (35, 50, 65)    # 0-100 (eSpeak default 50)
OTHER_VOICES = ("en-029+m2", "en-us-nyc+f3", "en-gb-x-gbclan+m7")
OTHER_RATES = (130, 230)        # outside the train range on both sides
OTHER_PITCHES = (15, 85)
CHAPTER_SIZE = 25               # utterances per chapter, so speakers have several chapters like LibriSpeech

# eSpeak NG API constants (speak_lib.h)
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_DONT_EXIT = 0x8000   # return an error instead of calling exit() when data is missing
_POS_CHARACTER = 1
_ENDPAUSE = 0x1000               # without it the last partial buffer of each utterance is cut off
_RATE, _PITCH = 1, 3
_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


class Espeak:
    """Minimal ctypes wrapper: synchronous synthesis into int16 arrays at ``self.sample_rate`` (22,050 Hz)."""

    def __init__(self):
        import espeakng_loader  # imported here so reading corpora does not need it
        self._lib = lib = ctypes.CDLL(espeakng_loader.get_library_path())
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
        lib.espeak_Synth.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
                                     ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
        self.sample_rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0,
                                                 espeakng_loader.get_data_path().encode(),
                                                 _INITIALIZE_DONT_EXIT)
        if self.sample_rate <= 0:
            raise RuntimeError(f"espeak_Initialize failed ({self.sample_rate})")
        self._chunks = []
        self._cb = _CALLBACK(self._collect)  # keep a reference: the C side only holds a raw pointer
        lib.espeak_SetSynthCallback(self._cb)

    def _collect(self, wav, n, _events):
        if wav and n > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
        return 0  # 0 = continue synthesis

    def synth(self, text: str, voice: str, rate: int, pitch: int, seed: int = 0) -> np.ndarray:
        # Breathy variants (+f2, +f3) draw noise from a generator eSpeak seeds from the clock: reseed it.
        self._lib.espeak_ng_SetRandSeed(int(seed))
        if self._lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise ValueError(f"eSpeak voice not found: {voice!r}")
        self._lib.espeak_SetParameter(_RATE, int(rate), 0)
        self._lib.espeak_SetParameter(_PITCH, int(pitch), 0)
        self._chunks = []
        data = text.encode() + b"\0"
        err = self._lib.espeak_Synth(data, len(data), 0, _POS_CHARACTER, 0, _ENDPAUSE, None, None)
        if err != 0:
            raise RuntimeError(f"espeak_Synth failed ({err}) on {text!r}")
        return np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.int16)

    def close(self):
        self._lib.espeak_Terminate()


def _conditions():
    """(split -> list of (voice, rate, pitch)).  Each clean eval split takes one grid cell per voice."""
    grid = [(v, r, p) for v in TRAIN_VOICES for r in TRAIN_RATES for p in TRAIN_PITCHES]
    n_rp = len(TRAIN_RATES) * len(TRAIN_PITCHES)
    # Held-out cells: for voice i, cells on two different "diagonals" of the rate x pitch grid,
    # so each eval split still covers every rate and pitch value.
    dev = [grid[i * n_rp + (i * 4) % n_rp] for i in range(len(TRAIN_VOICES))]
    test = [grid[i * n_rp + (i * 4 + 2) % n_rp] for i in range(len(TRAIN_VOICES))]
    train = [c for c in grid if c not in dev and c not in test]
    other = [(v, r, p) for i, v in enumerate(OTHER_VOICES) for r, p in
             [(OTHER_RATES[i % 2], OTHER_PITCHES[0]), (OTHER_RATES[(i + 1) % 2], OTHER_PITCHES[1])]]
    return {"train-clean-100": train, "dev-clean": dev, "test-clean": test, "test-other": other}


def _sentences(rng, n, taken):
    """n new random word sequences of 2-5 words not in ``taken`` (updated in place)."""
    out = []
    while len(out) < n:
        words = []
        for _ in range(rng.integers(2, 6)):
            w = WORDS[rng.integers(len(WORDS))]
            while words and w == words[-1]:  # no immediate repeats ("THE THE"): unnatural for a TTS prompt
                w = WORDS[rng.integers(len(WORDS))]
            words.append(w)
        s = " ".join(words)
        if s not in taken:
            taken.add(s)
            out.append(s)
    return out


def _postprocess(x_int16, in_sr, rng):
    """Trim eSpeak's silences, resample to 16 kHz, add random leading/trailing silence, gain, noise floor."""
    x = x_int16.astype(np.float32) / 32768.0
    loud = np.flatnonzero(np.abs(x) > 0.01 * (np.abs(x).max() + 1e-9))
    if loud.size:
        x = x[loud[0]:loud[-1] + 1]
    g = gcd(TARGET_SR, in_sr)
    x = resample_poly(x, TARGET_SR // g, in_sr // g).astype(np.float32)
    pad = rng.uniform(0.05, 0.30, size=2)
    x = np.concatenate([np.zeros(int(pad[0] * TARGET_SR), np.float32), x,
                        np.zeros(int(pad[1] * TARGET_SR), np.float32)])
    x *= rng.uniform(0.5, 1.0) / (np.abs(x).max() + 1e-9)  # peak level varies like recording levels
    # Faint noise floor (~ -70 dBFS): real recordings never contain runs of exact digital zeros.
    x += rng.normal(0.0, 3e-4, size=x.shape).astype(np.float32)
    return np.clip(x, -1.0, 1.0)


def _params(seed, n_train, n_eval):
    return {"format_version": FORMAT_VERSION, "source": "eSpeak NG (synthetic)", "seed": int(seed),
            "n_train": int(n_train), "n_eval": int(n_eval), "sample_rate": TARGET_SR}


def foreign_splits(out_dir) -> list[str]:
    """The LibriSpeech split dirs under out_dir that this script did not write (common.runs.foreign_outputs): a
    user's real corpus, which a rebuild would delete."""
    from common.runs import foreign_outputs
    return foreign_outputs(out_dir, [os.path.join(out_dir, "LibriSpeech", s) for s in SPLITS])


def synthesize_corpus(out_dir, seed=0, n_train=1500, n_eval=150, force=False, verbose=True):
    """Build the corpus under ``out_dir``; returns a summary dict (counts, hours, seconds, skipped)."""
    t0 = time.perf_counter()
    if n_train < 1 or n_eval < 1:
        raise ValueError(f"n_train and n_eval must be >= 1, got {n_train}, {n_eval}")
    params = _params(seed, n_train, n_eval)
    params_path = os.path.join(out_dir, "params.json")
    if os.path.isfile(params_path) and not force:
        with open(params_path) as f:
            old = json.load(f)
        if {k: old.get(k) for k in params} == params:
            summary = {**old["summary"], "skipped": True, "seconds": time.perf_counter() - t0}
            if verbose:
                print(f"corpus already at {out_dir} with the same parameters; skipped (use --force)")
            return summary
    if not force and (foreign := foreign_splits(out_dir)):
        raise FileExistsError(f"{', '.join(foreign)}: not made by this script; kept: pass --force to replace them")
    from common.runs import mark_generated
    mark_generated(out_dir, "wav2vec_librispeech/synth_corpus.py")
    # params.json is removed first and written last, so an interrupted run is never taken as complete.
    if os.path.exists(params_path):
        os.remove(params_path)
    ls_root = os.path.join(out_dir, "LibriSpeech")
    for split in SPLITS:
        shutil.rmtree(os.path.join(ls_root, split), ignore_errors=True)

    rng = np.random.default_rng(seed)
    conditions = _conditions()
    taken = set()
    counts = {s: n_train if s.startswith("train") else n_eval for s in SPLITS}
    texts = {s: _sentences(rng, counts[s], taken) for s in SPLITS}  # train drawn first: eval avoids it
    speaker_base = {"train-clean-100": 1000, "dev-clean": 2000, "test-clean": 3000, "test-other": 4000}
    espeak = Espeak()
    summary = {"utterances": {}, "hours": {}, "speakers": {}}
    try:
        for split in SPLITS:
            conds = conditions[split]
            per_speaker = {}  # speaker -> list of (text, cond); utterances are dealt round-robin
            for i, text in enumerate(texts[split]):
                k = i % len(conds)
                per_speaker.setdefault(speaker_base[split] + k, []).append((text, conds[k]))
            total = 0
            for spk, items in per_speaker.items():
                for c0 in range(0, len(items), CHAPTER_SIZE):
                    chapter = 100 + c0 // CHAPTER_SIZE
                    cdir = os.path.join(ls_root, split, str(spk), str(chapter))
                    os.makedirs(cdir)
                    lines = []
                    for j, (text, (voice, rate, pitch)) in enumerate(items[c0:c0 + CHAPTER_SIZE]):
                        uid = f"{spk}-{chapter}-{j:04d}"
                        wav = espeak.synth(text, voice, rate, pitch, seed=int(rng.integers(2**31)))
                        x = _postprocess(wav, espeak.sample_rate, rng)
                        sf.write(os.path.join(cdir, uid + ".flac"), x, TARGET_SR, subtype="PCM_16")
                        lines.append(f"{uid} {text}\n")
                        total += len(x)
                    with open(os.path.join(cdir, f"{spk}-{chapter}.trans.txt"), "w") as f:
                        f.writelines(lines)
            summary["utterances"][split] = len(texts[split])
            summary["hours"][split] = round(total / TARGET_SR / 3600, 4)
            summary["speakers"][split] = {str(speaker_base[split] + k): {"voice": v, "rate": r, "pitch": p}
                                          for k, (v, r, p) in enumerate(conds) if k < counts[split]}
    finally:
        espeak.close()

    with open(os.path.join(out_dir, "README.txt"), "w") as f:
        f.write(README)
    summary["build_seconds"] = round(time.perf_counter() - t0, 2)
    with open(params_path, "w") as f:
        json.dump({**params, "summary": summary}, f, indent=1)
    summary = {**summary, "skipped": False, "seconds": time.perf_counter() - t0}
    if verbose:
        for split in SPLITS:
            print(f"{split}: {summary['utterances'][split]} utterances, "
                  f"{summary['hours'][split] * 60:.1f} min audio, {len(summary['speakers'][split])} speakers")
        print(f"wrote {out_dir} in {summary['seconds']:.1f} s (SYNTHETIC eSpeak NG corpus)")
    return summary


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out_dir", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n_train", type=int, default=1500)
    ap.add_argument("--n_eval", type=int, default=150, help="utterances in each of dev-clean, test-clean, test-other")
    ap.add_argument("--force", action="store_true", help="rebuild even if params.json matches")
    args = ap.parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    synthesize_corpus(args.out_dir, args.seed, args.n_train, args.n_eval, args.force)


if __name__ == "__main__":
    main()
