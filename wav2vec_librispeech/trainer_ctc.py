"""Trainer for wav2vec2 CTC: KD from common (masked to valid frames), length-grouped training batches that are
deterministic per epoch, and an evaluation that decodes greedily (no language model) and scores WER/CER."""
from __future__ import annotations

import time

import torch

from common.hf import CompressionTrainer, global_batch_of

from .ctc_text import BLANK_ID, build_vocab, cer, greedy_ctc_decode, wer
from .data import CTCCollator, LengthGroupedEpochSampler, kd_frame_mask


def argmax_ids(logits, labels):
    """preprocess_logits_for_metrics: keep the best-path ids, not [B, T, V] float logits (memory)."""
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    return logits.argmax(-1)


def own_length_sampler(args, ds) -> bool:
    """Whether CTCTrainer trains on its own LengthGroupedEpochSampler (deterministic, seeded) rather than HF's."""
    return args.train_sampling_strategy == "group_by_length" and hasattr(ds, "lengths")


class CTCTrainer(CompressionTrainer):
    def __init__(self, *args, eval_sets: dict | None = None, **kwargs):
        kwargs.setdefault("kd_mask_fn", kd_frame_mask)
        kwargs.setdefault("preprocess_logits_for_metrics", argmax_ids)
        super().__init__(*args, **kwargs)
        # Wav2Vec2ForCTC's forward takes **kwargs but its CTC loss ignores num_items_in_batch (a per-batch mean): the
        # Trainer must divide it by the accumulation steps and not multiply it by the world size, which it does for
        # losses it takes as normalised over the accumulated global batch (gradients GA x world size too large)
        self.model_accepts_loss_kwargs = False
        self.eval_sets = dict(eval_sets or {})
        self.id_to_char = {i: t for t, i in build_vocab().items()}
        self.last_predictions: dict[str, list[dict]] = {}

    # -- sampling ------------------------------------------------------------------------------------------------
    def _get_train_sampler(self, train_dataset=None):
        ds = train_dataset if train_dataset is not None else self.train_dataset
        if own_length_sampler(self.args, ds):
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            # groups of one global batch, cut into per-device batches in order and dealt to the ranks in turn:
            # global batch k is then positions [kG, (k+1)G) of an order that depends on G alone, the same for any
            # number of processes (and a checkpoint resumes on another one); choice
            return LengthGroupedEpochSampler(ds.lengths, global_batch_of(self.args), seed)
        return super()._get_train_sampler(train_dataset)

    def order_has_own_generator(self) -> bool:  # our length-grouped sampler is seeded itself
        return super().order_has_own_generator() or own_length_sampler(self.args, self.train_dataset)

    def _get_eval_sampler(self, eval_dataset):
        # predictions must come back in dataset order (ids, references): never length-grouped here
        if self.args.world_size <= 1:
            return torch.utils.data.SequentialSampler(eval_dataset)
        return None  # accelerate shards sequentially; gather_for_metrics restores the order

    # -- evaluation ----------------------------------------------------------------------------------------------
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        ds = eval_dataset if eval_dataset is not None else self.eval_dataset
        compute_metrics, self.compute_metrics = self.compute_metrics, None
        collator, self.data_collator = self.data_collator, CTCCollator(with_labels=False)  # no loss, no teacher
        t0 = time.time()
        try:
            out = self.evaluation_loop(self.get_eval_dataloader(ds), description="Evaluation",
                                       prediction_loss_only=False, ignore_keys=ignore_keys,
                                       metric_key_prefix=metric_key_prefix)
        finally:
            self.compute_metrics, self.data_collator = compute_metrics, collator
        ids = out.predictions[: len(ds)]
        model = self.accelerator.unwrap_model(self.model)
        frames = model._get_feat_extract_output_lengths(torch.tensor(ds.lengths, dtype=torch.long))
        hyps = greedy_ctc_decode(torch.as_tensor(ids), BLANK_ID, self.id_to_char, lengths=frames)
        refs = ds.texts
        self.last_predictions[metric_key_prefix] = [
            {"id": i, "reference": r, "hypothesis": h} for i, r, h in zip(ds.ids, refs, hyps)]
        p = metric_key_prefix
        metrics = {f"{p}_wer": 100.0 * wer(refs, hyps), f"{p}_cer": 100.0 * cer(refs, hyps), f"{p}_samples": len(ds)}
        metrics[f"{p}_runtime"] = round(time.time() - t0, 3)
        if self.args.should_log:
            self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics
