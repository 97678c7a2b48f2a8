import pytest

from common import Recipe, RecipeError


def test_defaults_are_the_paper_recipe():
    r = Recipe()
    assert (r.w_bits, r.a_bits, r.sparsity, r.nm, r.zero_preserving) == (4, 4, "2:4", (2, 4), True)
    assert r.skips("bert.embeddings.word_embeddings") and r.skips("qa_outputs")
    assert r.skips("wav2vec2.feature_projection.projection") and r.skips("head")
    assert not r.skips("bert.encoder.layer.0.attention.self.query") and not r.skips("blocks.0.mlp.fc1")


@pytest.mark.parametrize("text,key", [
    ("w_bits: 4\nsparsty: '2:4'\n", "sparsty"),
    ("sparsity: '3:2'\n", "sparsity"),
    ("sparsity: 'half'\n", "sparsity"),
    ("sparsity: 2:4\n", "quote it"),  # unquoted: YAML 1.1 base-60 number 124
    ("w_bits: 16\n", "w_bits"),
    ("a_bits: 1\n", "a_bits"),
    ("w_quantizer: lsq\n", "w_quantizer"),
    ("zero_preserving: maybe\n", "zero_preserving"),
    ("keep_output_embeddings: 2\n", "keep_output_embeddings"),
    ("- w_bits: 4\n", "expected a mapping"),
    ("w_bits: [4\n", "not valid YAML"),
])
def test_bad_yaml_fails_at_load_naming_the_key(tmp_path, text, key):
    f = tmp_path / "recipe.yaml"
    f.write_text(text)
    with pytest.raises(RecipeError) as e:
        Recipe.from_yaml(f)
    assert key in str(e.value) and str(f) in str(e.value)


def test_missing_recipe_file_is_named(tmp_path):
    with pytest.raises(RecipeError, match=f"{tmp_path / 'nope.yaml'}: recipe file not found"):
        Recipe.from_yaml(tmp_path / "nope.yaml")


def test_yaml_roundtrip(tmp_path):
    import yaml
    r = Recipe(w_bits=8, sparsity="1:4", per_channel=True)
    f = tmp_path / "r.yaml"
    f.write_text(yaml.safe_dump(r.to_dict()))
    assert Recipe.from_yaml(f) == r
    assert Recipe.from_yaml(f).nm == (1, 4)


def test_unquoted_no_strategy_from_yaml(tmp_path):
    """`train.eval_strategy=no` on the command line or unquoted in YAML reads as false: it still means "no"."""
    import yaml
    from common.hf import training_arguments
    train = yaml.safe_load("eval_strategy: no\nsave_strategy: no\nreport_to: none")
    assert train["eval_strategy"] is False
    args = training_arguments({"train": train, "config_file": "x.yaml"}, tmp_path)
    assert args.eval_strategy.value == "no" and args.save_strategy.value == "no"


def test_no_pinned_memory_without_an_accelerator_unless_asked(tmp_path, monkeypatch):
    """Pinned memory serves copies to an accelerator: off without one (the DataLoader warned on every loader),
    unless the config's `train` section sets it."""
    import torch
    from common.hf import training_arguments
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: False)
    cfg = {"train": {"report_to": "none"}, "config_file": "x.yaml"}
    assert training_arguments(cfg, tmp_path).dataloader_pin_memory is False
    own = {"train": {"report_to": "none", "dataloader_pin_memory": True}, "config_file": "x.yaml"}
    assert training_arguments(own, tmp_path).dataloader_pin_memory is True


def test_compression_trainer_keeps_the_data_order_when_it_reseeds_ranks(tmp_path):
    """data_seed is fixed to the seed (Accelerate would read the global initial seed, which the per-rank reseed
    changes, for any later loader); the per-rank reseed is off where the order comes from the global random state
    (HF's length-grouped sampler) or from a stream of the dataset's own."""
    import torch
    from common.hf import CompressionTrainer, training_arguments

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(2, 2)

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter([])

    def trainer(strategy, data=None):
        args = training_arguments({"train": {"report_to": "none", "seed": 7, "train_sampling_strategy": strategy,
                                             "max_steps": 1},
                                   "config_file": "x.yaml"}, tmp_path)
        assert args.data_seed is None
        return CompressionTrainer(model=Tiny(), args=args, train_dataset=data)
    t = trainer("random", [0, 1])
    assert t.args.data_seed == 7 and t.order_has_own_generator()
    assert trainer("batch_rebalance", [0, 1]).order_has_own_generator()
    assert not trainer("group_by_length", [0, 1]).order_has_own_generator()
    assert not trainer("random", Stream()).order_has_own_generator()
    # train() twice on one trainer: the second finds its optimizer wrapped by Accelerate
    data = [{"x": torch.ones(2), "labels": torch.tensor(0)}] * 4

    class Loss(Tiny):
        def forward(self, x, labels):
            return {"loss": torch.nn.functional.cross_entropy(self.lin(x), labels)}
    t = CompressionTrainer(model=Loss(), args=training_arguments(
        {"train": {"report_to": "none", "max_steps": 1, "per_device_train_batch_size": 2, "save_strategy": "no"},
         "config_file": "x.yaml"}, tmp_path), train_dataset=data)
    t.train()
    t.train()


@pytest.mark.parametrize("step_at,expected", [(None, 0.5), (0.25, 0.25)])
def test_dropout_step_at_reaches_the_hf_schedule(step_at, expected):
    """dropout.step_at (null: halfway) is passed to the HF pipelines' ScheduledDropout, as ViT's train.py does."""
    import torch
    from common.dropout import ScheduledDropout
    from common.hf import ScheduledDropoutCallback, stage_callbacks
    cb = stage_callbacks({"dropout": {"schedule": "step", "end_p": 0.0, "step_at": step_at}})[0]
    assert isinstance(cb, ScheduledDropoutCallback) and cb.kw["step_at"] == step_at and cb.kw["schedule"] == "step"
    assert ScheduledDropout(torch.nn.Dropout(0.1), 100, **cb.kw).step_at == expected


def test_resume_takes_up_the_last_checkpoint_and_says_so(tmp_path, capsys):
    from common.hf import resume_checkpoint
    assert resume_checkpoint({"stage": "qat4"}, tmp_path, "bert_squad") is None  # no resume asked: silent
    assert capsys.readouterr().out == ""
    cfg = {"stage": "qat4", "resume": True}
    assert resume_checkpoint(cfg, tmp_path, "bert_squad") is None
    assert "[bert_squad/qat4] resume=true but" in capsys.readouterr().out
    for name in ("checkpoint-2", "checkpoint-10", "checkpoint-x"):
        (tmp_path / name).mkdir()
    (tmp_path / "checkpoint-11").write_text("FIXTURE: a file, not a checkpoint\n")
    assert resume_checkpoint(cfg, tmp_path, "bert_squad") == str(tmp_path / "checkpoint-10")
    assert f"[bert_squad/qat4] resuming from {tmp_path / 'checkpoint-10'}" in capsys.readouterr().out
