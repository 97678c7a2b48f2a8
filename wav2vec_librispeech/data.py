"""Datasets, padding collator and length-grouped sampler for wav2vec2 CTC fine-tuning with HF Trainer.

* ``SpeechDataset``: LibriSpeech ``Utterance`` records -> {"input_values": float32 waveform normalised per
  utterance (zero mean, unit variance: Wav2Vec2FeatureExtractor's do_normalize), "labels": character ids}.
* ``CTCCollator``: pads waveforms with 0.0 (after normalisation, as the HF feature extractor does) and returns the
  sample-level ``attention_mask``; labels are padded with -100 directly (never with the blank id 0), so the CTC loss
  and the target lengths only see real characters.
* ``LengthGroupedEpochSampler``: HF Trainer's ``group_by_length`` idea (batches of similar duration, less padding),
  but deterministic in (seed, epoch) through ``set_epoch`` instead of drawing from the global RNG, so a resumed run
  sees exactly the batches of an uninterrupted one.
"""
from __future__ import annotations

import logging

import numpy as np
import torch

from .ctc_text import WORD_DELIMITER, build_vocab
from .librispeech import length_grouped_batches, load_audio

log = logging.getLogger(__name__)


def normalize(x: np.ndarray) -> np.ndarray:
    """Zero-mean unit-variance per utterance, the formula of Wav2Vec2FeatureExtractor.zero_mean_unit_var_norm."""
    x = x.astype(np.float32)
    return ((x - x.mean()) / np.sqrt(x.var() + 1e-7)).astype(np.float32)


def encode_text(text: str, vocab: dict | None = None) -> list[int]:
    """Transcript -> character ids of the 960h vocabulary; a space becomes the word delimiter '|'.
    Characters outside the vocabulary map to <unk> (LibriSpeech has none: A-Z, apostrophe, space)."""
    vocab = vocab or build_vocab()
    unk = vocab["<unk>"]
    words = text.upper().split()
    return [vocab.get(c, unk) for c in WORD_DELIMITER.join(words)]


class SpeechDataset(torch.utils.data.Dataset):
    """Utterances as model inputs. ``cache=True`` keeps the normalised waveforms in memory (mini scale)."""

    def __init__(self, utts, sampling_rate: int = 16000, cache: bool = False, normalize_audio: bool = True):
        self.utts = list(utts)
        self.sampling_rate = sampling_rate
        self.normalize_audio = normalize_audio
        self.vocab = build_vocab()
        self._cache: dict[int, np.ndarray] | None = {} if cache else None
        # sample counts at the model's rate (for length grouping and frame counts without decoding audio);
        # ceil(n * up / down) is the output length of scipy's resample_poly, used by load_audio when rates differ
        self.lengths = [u.num_samples if u.sample_rate == sampling_rate else
                        -(-u.num_samples * sampling_rate // u.sample_rate) for u in self.utts]

    def __len__(self):
        return len(self.utts)

    def audio(self, i: int) -> np.ndarray:
        if self._cache is not None and i in self._cache:
            return self._cache[i]
        x = load_audio(self.utts[i].path, self.sampling_rate)
        if self.normalize_audio:
            x = normalize(x)
        if self._cache is not None:
            self._cache[i] = x
        return x

    def __getitem__(self, i):
        return {"input_values": self.audio(i), "labels": encode_text(self.utts[i].text, self.vocab)}

    @property
    def ids(self):
        return [u.id for u in self.utts]

    @property
    def texts(self):
        return [u.text for u in self.utts]

    @property
    def seconds(self) -> float:
        return sum(self.lengths) / self.sampling_rate


class CTCCollator:
    """Pad a list of SpeechDataset items into a batch; ``with_labels=False`` for calibration batches."""

    def __init__(self, with_labels: bool = True, pad_to_multiple_of: int | None = None):
        self.with_labels = with_labels
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, items):
        n = max(len(it["input_values"]) for it in items)
        if self.pad_to_multiple_of:
            n = -(-n // self.pad_to_multiple_of) * self.pad_to_multiple_of
        x = torch.zeros(len(items), n, dtype=torch.float32)
        am = torch.zeros(len(items), n, dtype=torch.long)
        for b, it in enumerate(items):
            v = torch.as_tensor(it["input_values"], dtype=torch.float32)
            x[b, : len(v)] = v
            am[b, : len(v)] = 1
        batch = {"input_values": x, "attention_mask": am}
        if self.with_labels:
            m = max(len(it["labels"]) for it in items)
            y = torch.full((len(items), m), -100, dtype=torch.long)
            for b, it in enumerate(items):
                y[b, : len(it["labels"])] = torch.as_tensor(it["labels"], dtype=torch.long)
            batch["labels"] = y
        return batch


class LengthGroupedEpochSampler(torch.utils.data.Sampler):
    """Indices in batches of similar length (``length_grouped_batches``), reshuffled per epoch from seed + epoch."""

    def __init__(self, lengths, batch_size: int, seed: int = 0, mega_batch_mult: int = 50):
        self.lengths, self.batch_size, self.seed, self.mult = list(lengths), batch_size, seed, mega_batch_mult
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self):
        return len(self.lengths)

    def __iter__(self):
        batches = length_grouped_batches(self.lengths, self.batch_size, self.seed + 1000003 * self.epoch, self.mult)
        return iter([i for b in batches for i in b])


def frame_mask(model, attention_mask: torch.Tensor, n_frames: int) -> torch.Tensor:
    """[B, T] bool: the CTC frames computed from real (unpadded) samples only."""
    model = getattr(model, "module", model)  # DDP
    lengths = model._get_feat_extract_output_lengths(attention_mask.sum(-1))
    return torch.arange(n_frames, device=attention_mask.device)[None, :] < lengths[:, None]


def kd_frame_mask(model, inputs, outputs) -> torch.Tensor | None:
    """kd_mask_fn for common.hf.CompressionTrainer: distil only on valid frames (padding excluded)."""
    am = inputs.get("attention_mask")
    if am is None:
        return None
    return frame_mask(model, am, outputs.logits.shape[1])
