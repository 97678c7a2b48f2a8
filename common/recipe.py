"""The compression recipe: what `prepare` does to a model. Loadable from YAML, validated at load time."""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path


ALLOWED_BITS = (2, 3, 4, 5, 6, 7, 8, 32)  # 32 = that quantizer is off
WEIGHT_QUANTIZERS = ("sawb", "minmax")
ACT_QUANTIZERS = ("pact", "pact+", "minmax")

# Full precision by default (paper: only the transformer *backbone* is compressed). Our choice of what counts as
# backbone: embeddings, pooler, task heads (with their submodules, e.g. RoBERTa's classifier.dense), the wav2vec2
# conv feature encoder, its feature projection and positional conv embedding, and timm's patch embedding and heads
# (the attention-pooling head attn_pool too) stay full precision. Regexes matched against module names (see also
# keep_output_embeddings).
DEFAULT_SKIP = [
    r"(^|\.)embeddings(\.|$)",
    r"(^|\.)pooler(\.|$)",
    r"(^|\.)(qa_outputs|classifier|pre_classifier|classification_head|score|lm_head|cls|vocab_transform|"
    r"vocab_projector|head|head_dist|attn_pool|fc_norm|project_hid|project_q|quantizer)(\.|$)",
    # more task heads, by the names transformers gives them: DeiT/LeViT teacher heads (cls_classifier,
    # distillation_classifier, classifier_distill), YOLOS/DETR box heads (class_labels_classifier, bbox_predictor),
    # audio classification (projector), ELECTRA/ALBERT prediction heads (discriminator_predictions, predictions),
    # segmentation heads (decode_head, auxiliary_head), CLIP's projections, ViT-MAE's pixel head (decoder_pred)
    r"(^|\.)(\w+_classifier|classifier_\w+|bbox_predictor|projector|(\w+_)?predictions|decode_head|auxiliary_head|"
    r"visual_projection|text_projection|decoder_pred)(\.|$)",
    r"(^|\.)(feature_extractor|feature_projection|pos_conv_embed|patch_embed|masked_spec_embed)(\.|$)",
]


class RecipeError(ValueError):
    """A recipe (or recipe file) with an unknown key or an impossible value."""


@dataclass
class Recipe:
    w_bits: int = 4
    a_bits: int = 4
    w_quantizer: str = "sawb"
    per_channel: bool = False
    a_quantizer: str = "pact"
    zero_preserving: bool = True
    quantize_attention: bool = True
    # Bits of the softmax output (the P in P·V). None = a_bits. IBM's library keeps it at >= 8 bits; the paper's
    # "4-bit backbone" suggests 4, so the default follows a_bits and this stays a knob (choice).
    attn_prob_bits: int | None = None
    # Quantizer of the softmax output. None = a_quantizer: with PACT, a clip calibrated at calib_percentile and then
    # learned, which may cut the largest probabilities (choice, as for every activation). "minmax": the observed
    # range, not learned; with attn_prob_bits: 8 it is IBM's library default for this operand.
    attn_prob_quantizer: str | None = None
    sparsity: str | None = "2:4"
    skip: list[str] = field(default_factory=lambda: list(DEFAULT_SKIP))
    # the module a Hugging Face model returns from get_output_embeddings() (its LM / CTC head, whatever its name)
    # stays full precision like the heads `skip` names (choice)
    keep_output_embeddings: bool = True
    calib_batches: int = 32
    calib_percentile: float = 99.9

    def __post_init__(self):
        self.validate()

    # -- validation ------------------------------------------------------------------------------------------
    def validate(self, source: str = "recipe") -> None:
        def bad(key, msg):
            raise RecipeError(f"{source}: '{key}': {msg}")

        for key in ("w_bits", "a_bits"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v not in ALLOWED_BITS:
                bad(key, f"unsupported bit width {v!r}; allowed: {ALLOWED_BITS} (32 = off)")
        if self.attn_prob_bits is not None and self.attn_prob_bits not in ALLOWED_BITS:
            bad("attn_prob_bits", f"unsupported bit width {self.attn_prob_bits!r}; allowed: {ALLOWED_BITS}")
        if self.w_quantizer not in WEIGHT_QUANTIZERS:
            bad("w_quantizer", f"unknown weight quantizer {self.w_quantizer!r}; allowed: {WEIGHT_QUANTIZERS}")
        if self.a_quantizer not in ACT_QUANTIZERS:
            bad("a_quantizer", f"unknown activation quantizer {self.a_quantizer!r}; allowed: {ACT_QUANTIZERS}")
        if self.attn_prob_quantizer is not None and self.attn_prob_quantizer not in ACT_QUANTIZERS:
            bad("attn_prob_quantizer", f"unknown activation quantizer {self.attn_prob_quantizer!r}; allowed: "
                                       f"{ACT_QUANTIZERS} or null (= a_quantizer)")
        for key in ("per_channel", "zero_preserving", "quantize_attention", "keep_output_embeddings"):
            if not isinstance(getattr(self, key), bool):
                bad(key, f"must be true/false, got {getattr(self, key)!r}")
        if self.sparsity is not None:
            try:
                self.nm
            except ValueError as e:
                bad("sparsity", str(e))
        if not isinstance(self.skip, list) or not all(isinstance(p, str) for p in self.skip):
            bad("skip", "must be a list of regular expressions")
        for p in self.skip:
            try:
                re.compile(p)
            except re.error as e:
                bad("skip", f"invalid regular expression {p!r}: {e}")
        if not isinstance(self.calib_batches, int) or self.calib_batches < 0:
            bad("calib_batches", f"must be an integer >= 0, got {self.calib_batches!r}")
        if not (50.0 <= float(self.calib_percentile) <= 100.0):
            bad("calib_percentile", f"must be in [50, 100], got {self.calib_percentile!r}")

    # -- derived ---------------------------------------------------------------------------------------------
    @property
    def nm(self) -> tuple[int, int] | None:
        """(N, M) of the N:M sparsity, or None."""
        if self.sparsity in (None, "none", "dense"):
            return None
        if isinstance(self.sparsity, int) and not isinstance(self.sparsity, bool):
            raise ValueError(f"got the number {self.sparsity}: YAML reads an unquoted N:M such as 2:4 as a base-60 "
                             f"number; quote it: sparsity: '2:4'")
        m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(self.sparsity))
        if not m:
            raise ValueError(f"expected 'N:M' (e.g. '2:4') or null, got {self.sparsity!r}")
        n, mm = int(m.group(1)), int(m.group(2))
        if not (1 <= n < mm):
            raise ValueError(f"impossible N:M sparsity {self.sparsity!r}: need 1 <= N < M")
        return n, mm

    @property
    def quantize_weights(self) -> bool:
        return self.w_bits < 32

    @property
    def quantize_acts(self) -> bool:
        return self.a_bits < 32

    @property
    def compresses(self) -> bool:
        return self.quantize_weights or self.quantize_acts or self.nm is not None

    def skip_match(self, module_name: str) -> re.Match | None:
        """The first `skip` pattern's match in the module name, or None."""
        return next((m for p in self.skip if (m := re.search(p, module_name))), None)

    def skips(self, module_name: str) -> bool:
        return self.skip_match(module_name) is not None

    # -- (de)serialisation -----------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None, source: str = "recipe") -> "Recipe":
        d = dict(d or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise RecipeError(f"{source}: unknown key(s) {unknown}; known keys: {sorted(known)}")
        try:
            r = cls.__new__(cls)
            for f in dataclasses.fields(cls):
                if f.name in d:
                    setattr(r, f.name, d[f.name])
                elif f.default is not dataclasses.MISSING:
                    setattr(r, f.name, f.default)
                else:
                    setattr(r, f.name, f.default_factory())
            r.validate(source)
        except RecipeError:
            raise
        return r

    @classmethod
    def from_yaml(cls, path: str | Path) -> "Recipe":
        from .config import read_yaml_mapping
        return cls.from_dict(read_yaml_mapping(path, RecipeError, "recipe file"), source=str(path))

    @classmethod
    def none(cls) -> "Recipe":
        """Full precision, dense: `prepare` with it changes nothing."""
        return cls(w_bits=32, a_bits=32, sparsity=None, quantize_attention=False)
