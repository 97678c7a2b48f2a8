"""What `common.prepare` would do to a model, printed before anything is trained: which linears it compresses, at how
many bits per weight `common.export` will store them (codes, 2:4 index and scales; also the paper's values-only
count, 16x for W4 + 2:4), which stay full precision and why, which attention modules get quantizers, and what it
cannot cover (prepare would refuse: exit status 1 then). Only the architecture is built, on the meta device: no
weights are read.

    python -m common.describe --hf bert-base-uncased          # a hub name or a local dir with config.json
    python -m common.describe --timm vit_base_patch16_224 --recipe my_recipe.yaml sparsity=null
    python -m common.describe --hf path/to/model --json       # the plan as JSON
"""
from __future__ import annotations

import argparse
import json
import sys

import torch
from torch import nn

from .config import ConfigError, parse_overrides
from .plan import prepare_plan
from .recipe import Recipe, RecipeError


def build_on_meta(hf: str | None = None, timm_name: str | None = None) -> nn.Module:
    """The architecture alone, on the meta device: an HF config (hub name or local dir; its `architectures` entry,
    else AutoModel) or a timm model name. No weights are read or allocated."""
    with torch.device("meta"):
        if hf is not None:
            import transformers
            config = transformers.AutoConfig.from_pretrained(hf)
            arch = (getattr(config, "architectures", None) or [None])[0]
            cls = getattr(transformers, arch, None) if arch else None
            return cls(config) if cls is not None else transformers.AutoModel.from_config(config)
        import timm
        return timm.create_model(timm_name, pretrained=False)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m common.describe", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--hf", help="Hugging Face model: hub name or local directory with config.json")
    src.add_argument("--timm", help="timm model name (e.g. vit_base_patch16_224)")
    ap.add_argument("--recipe", help="recipe YAML (common.Recipe fields); default: the paper's W4A4 + 2:4")
    ap.add_argument("--json", action="store_true", help="print the plan as JSON")
    ap.add_argument("overrides", nargs="*", help="recipe field=value, e.g. sparsity=null quantize_attention=false")
    args = ap.parse_args(argv)
    try:
        base = Recipe.from_yaml(args.recipe).to_dict() if args.recipe else Recipe().to_dict()
        base.update(parse_overrides(args.overrides))
        source = f"{args.recipe} with the command line's overrides" if args.recipe else "command line"
        recipe = Recipe.from_dict(base, source=source)
    except (RecipeError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        model = build_on_meta(args.hf, args.timm)
    except Exception as e:  # noqa: BLE001 -- unreachable hub, missing dir, unknown timm name: say which
        print(f"error: cannot build {args.hf or args.timm!r}: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    p = prepare_plan(model, recipe)
    print(json.dumps(p.to_dict(), indent=1) if args.json else p.format())
    return 1 if p.error() else 0


if __name__ == "__main__":
    sys.exit(main())
