"""common.config.split_global_batch: the per-device batch and accumulation that keep a stage's global batch on any
number of processes (the paper's 12 / 32 / 512), and clear errors where it cannot be kept."""
import re
from pathlib import Path

import pytest

from common.config import ConfigError, load_config, split_global_batch


@pytest.mark.parametrize("glob, per_device, world, expected", [
    (12, 12, 1, (12, 1)), (12, 12, 4, (3, 1)), (12, 12, 6, (2, 1)), (12, 3, 2, (3, 2)),  # BERT
    (32, 8, 1, (8, 4)), (32, 8, 2, (8, 2)), (32, 8, 4, (8, 1)), (32, 8, 8, (4, 1)), (32, 8, 32, (1, 1)),  # wav2vec2
    (512, 64, 1, (64, 8)), (512, 64, 8, (64, 1)), (512, 64, 16, (32, 1)), (512, 64, 128, (4, 1)),  # ViT
])
def test_accumulation_is_derived(glob, per_device, world, expected):
    per, accum = split_global_batch(glob, per_device, None, world, "cfg.yaml: global_batch_size")
    assert (per, accum) == expected and per * accum * world == glob


def test_given_accumulation_is_checked():
    assert split_global_batch(32, 8, 4, 1, "x") == (8, 4)
    with pytest.raises(ConfigError, match=r"cfg.yaml: global_batch_size 32 != per-device batch 8 x accumulation 4 "
                                          r"x 2 processes"):
        split_global_batch(32, 8, 4, 2, "cfg.yaml: global_batch_size")


def test_what_cannot_be_kept_is_refused_with_the_way_out():
    with pytest.raises(ConfigError, match=r"global_batch_size 12 does not split over 8 processes; run "
                                          r"\[1, 2, 3, 4, 6, 12\] processes"):
        split_global_batch(12, 12, None, 8, "cfg.yaml: global_batch_size")
    with pytest.raises(ConfigError, match="512 over 1 processes is 512 per process, not a multiple of the "
                                          "per-device batch 48"):
        split_global_batch(512, 48, None, 1, "cfg.yaml: train.global_batch_size")
    with pytest.raises(ConfigError, match="must be positive"):
        split_global_batch(32, 0, None, 1, "x")


def test_overrides_merge_in_order_and_refuse_a_key_under_a_null():
    """A whole-section override merges with dotted ones, in either order (as _merge merges it into the file's
    section); a dotted key under a section an earlier override set to null is an error, not a TypeError."""
    from common.config import parse_overrides
    want = {"compression": {"w_bits": 8, "calib_batches": 4}}
    assert parse_overrides(["compression={w_bits: 8}", "compression.calib_batches=4"]) == want
    assert parse_overrides(["compression.calib_batches=4", "compression={w_bits: 8}"]) == want
    assert parse_overrides(["compression.w_bits=4", "compression={w_bits: 8}"]) == {"compression": {"w_bits": 8}}
    assert parse_overrides(["compression=null", "compression={w_bits: 8}"]) == {"compression": {"w_bits": 8}}
    with pytest.raises(ConfigError, match="an earlier override sets 'compression' to None, so "
                                          "'compression.w_bits=...' has nothing to change"):
        parse_overrides(["compression=null", "compression.w_bits=8"])


@pytest.mark.parametrize("override,message", [
    ("train.seed=abc", "'train.seed' must be a number (the base config has 42), got 'abc'"),
    ("kd.lambda=[1]", "'kd.lambda' must be a number (the base config has 0.5), got [1]"),
    ("train.max_steps=[3]", "'train.max_steps' must be a number"),
    ("kd.enabled=maybe", "'kd.enabled' must be true or false, got 'maybe'")])
def test_a_value_of_the_wrong_type_is_named(override, message):
    """Where the base config holds a number or a boolean, another type stops the loading (reproduce checks every
    stage up front with it) instead of failing inside the optimizer hours later, or never ('false' is true)."""
    from reproduce import resolved
    with pytest.raises(ConfigError, match=re.escape(f"command line: {message}")):
        resolved("bert_squad", "mini", "qat4", [override])
    cfg = resolved("bert_squad", "mini", "qat4", ["train.seed=7", "kd.lambda=1", "train.max_steps=null",
                                                  "kd.enabled=false", "train.learning_rate=1e-4"])
    assert (cfg["train"]["seed"], cfg["kd"]["lambda"], cfg["kd"]["enabled"]) == (7, 1, False)
    # what the consumers take besides: ViT's amp as a string, false as "no clipping" / "no flip" (0)
    vit = resolved("vit_imagenet", "mini", "qat4", ["train.amp=bf16", "train.clip_grad_norm=false",
                                                     "data.augment.hflip=false"])
    assert (vit["train"]["amp"], vit["train"]["clip_grad_norm"]) == ("bf16", False)


def test_a_number_yaml_reads_as_text_is_named_with_the_fix(tmp_path):
    cfg = tmp_path / "mine.yaml"
    cfg.write_text(f"_base_: {Path(__file__).parents[1] / 'bert_squad/configs/mini/qat4.yaml'}\n"
                   "train: {learning_rate: 1e-4}\n")
    with pytest.raises(ConfigError, match=re.escape(f"{cfg}: 'train.learning_rate' must be a number (the base "
                                                    "config has 0.0003), got '1e-4' (YAML 1.1 reads")):
        load_config(cfg)
