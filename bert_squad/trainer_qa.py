"""Trainer for SQuAD: evaluation runs the n-best span post-processing and the official v1.1 metric, as the
Hugging Face question-answering example's QuestionAnsweringTrainer does; training adds KD via common."""
from __future__ import annotations

from common.hf import CompressionTrainer

from .utils_qa import postprocess_qa_predictions, squad_metrics


class QuestionAnsweringTrainer(CompressionTrainer):
    def __init__(self, *args, eval_examples=None, references=None, n_best_size=20, max_answer_length=30, **kwargs):
        super().__init__(*args, **kwargs)
        self.eval_examples = eval_examples
        self.references = references
        self.n_best_size, self.max_answer_length = n_best_size, max_answer_length
        self.last_predictions: dict[str, str] = {}

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        features = eval_dataset if eval_dataset is not None else self.eval_dataset
        loop_ds = features.remove_columns([c for c in ("example_id", "offset_mapping") if c in features.column_names])
        compute_metrics, self.compute_metrics = self.compute_metrics, None  # metrics need the post-processing
        try:
            out = self.evaluation_loop(self.get_eval_dataloader(loop_ds), description="Evaluation",
                                       prediction_loss_only=False, ignore_keys=ignore_keys,
                                       metric_key_prefix=metric_key_prefix)
        finally:
            self.compute_metrics = compute_metrics
        start, end = out.predictions[:2]
        self.last_predictions = postprocess_qa_predictions(self.eval_examples, features, start, end,
                                                           self.n_best_size, self.max_answer_length)
        metrics = {f"{metric_key_prefix}_{k}": v for k, v in
                   squad_metrics(self.last_predictions, self.references).items()}
        if self.args.should_log:
            self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics
