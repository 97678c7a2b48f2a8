"""Stage configs: YAML files (with `_base_` inheritance) whose values are the defaults, overridden on the command
line by dotted `key=value` pairs (`train.learning_rate=1e-4`); the resolved config is saved next to the run.

Unknown keys are errors that name the key and the file, so a typo never silently falls back to a default.
"""
from __future__ import annotations

import argparse
import copy
import difflib
import os
import re
from pathlib import Path

import yaml


class ConfigError(ValueError):
    pass


OPEN_SECTIONS = ("compression", "train")
# how a stage is started, not what it computes: left out when two configs of a run are compared
VOLATILE = {"overwrite_output_dir", "resume", "config_file", "interrupt_at_step"}


def read_yaml_mapping(path: str | Path, error: type[ValueError] = ConfigError, what: str = "config file") -> dict:
    """The mapping a YAML file holds ({} if empty); `error` names the file and the problem otherwise."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise error(f"{path}: {what} not found") from None
    except yaml.YAMLError as e:
        raise error(f"{path}: not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise error(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def unknown_key(source: str, prefix: str, key: str, known, where: str | None = None) -> ConfigError:
    """The error for an unknown config key: the source, the key, the nearest known names, then the known names (or,
    when they are too many to print, `where` they are listed)."""
    known = sorted(known)
    near = difflib.get_close_matches(key, known, n=3)
    hint = f"did you mean {' or '.join(prefix + k for k in near)}? " if near else ""
    listed = f"known keys: {where}" if where and len(known) > 40 else f"known keys here: {known}"
    return ConfigError(f"{source}: unknown config key '{prefix}{key}'; {hint}{listed}")


def _merge(base: dict, over: dict, source: str, prefix: str = "", strict: bool = True) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        key = f"{prefix}{k}"
        if strict and k not in base:
            raise unknown_key(source, prefix, k, base)
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            # these sections are checked by their consumer, which knows all keys (common.Recipe, and the
            # HF TrainingArguments that `train` is passed to)
            out[k] = _merge(base[k], v, source, key + ".", strict and k not in OPEN_SECTIONS)
        else:
            _check_type(base.get(k), v, source, key)
            out[k] = copy.deepcopy(v)
    return out


# keys whose consumer takes a boolean or a string (ViT's train.amp: false | bf16 | fp16)
BOOL_OR_STRING = {"train.amp"}


def _check_type(default, v, source: str, key: str) -> None:
    """A number where the base config has one (false, 0 to the consumer, passes), a boolean where it has one:
    `train.lr=abc` stops the call here, naming the key, not hours later inside the optimizer, or never (a string
    'false' is true). Null passes both ways."""
    if v is None or default is None:
        return
    if isinstance(default, bool) and not isinstance(v, bool) and not (key in BOOL_OR_STRING and isinstance(v, str)):
        raise ConfigError(f"{source}: '{key}' must be true or false, got {v!r}")
    if isinstance(default, (int, float)) and not isinstance(default, bool) and not isinstance(v, (int, float)):
        hint = ""
        try:
            float(v)
            hint = " (YAML 1.1 reads a number like 1e-4 as text: write 1.0e-4)"
        except (TypeError, ValueError):
            pass
        raise ConfigError(f"{source}: '{key}' must be a number (the base config has {default!r}), got {v!r}{hint}")


def load_yaml_config(path: str | Path) -> dict:
    """Read a config, resolving `_base_` (a file or a list, relative to this one) recursively.
    Keys that the base does not have are errors."""
    path = Path(path)
    data = read_yaml_mapping(path)
    bases = data.pop("_base_", None)
    if bases is None:
        return data
    # a list of bases merges left to right: e.g. [../qat4.yaml, base.yaml] = the paper stage + mini-scale deltas
    bases = [bases] if isinstance(bases, str) else list(bases)
    merged = load_yaml_config(path.parent / bases[0])
    for b in bases[1:]:
        merged = _merge(merged, load_yaml_config(path.parent / b), str(path.parent / b))
    return _merge(merged, data, str(path))


def check_open_section(cfg: dict, overrides: list[str] | None, section: str, known,
                       where: str | None = None) -> None:
    """The keys of an open section (OPEN_SECTIONS: common.config leaves them to their consumer) of a loaded config
    against the consumer's `known` names: the first unknown one is a ConfigError naming its source (the command
    line's first, then the stage file's), with the nearest known names; `where` says where the known names are
    listed when they are too many to print (TrainingArguments has ~150)."""
    values = cfg.get(section)
    unknown = sorted(set(values) - set(known)) if isinstance(values, dict) else []
    if not unknown:
        return
    given = parse_overrides(overrides or []).get(section)
    typed = [k for k in unknown if isinstance(given, dict) and k in given]
    raise unknown_key(source_of(cfg, overrides, f"{section}.{(typed or unknown)[0]}"), section + ".",
                      (typed or unknown)[0], known, where)


def source_of(cfg: dict, overrides: list[str] | None, key: str) -> str:
    """Where a loaded config's dotted `key` was set, for an error message: the command line if an override sets
    it, else the stage file (or a file of its _base_ chain)."""
    given = parse_overrides(overrides or [])
    for part in key.split("."):
        if not isinstance(given, dict) or part not in given:
            return f"{cfg.get('config_file', 'config')} (or a file in its _base_ chain)"
        given = given[part]
    return "command line"


def _value(raw: str):
    if raw == "":
        return None
    if re.fullmatch(r"\s*\d+\s*:\s*\d+\s*", raw):  # YAML 1.1 reads an unquoted 2:4 as the base-60 number 124
        return raw
    v = yaml.safe_load(raw)
    if isinstance(v, str):  # YAML 1.1 leaves 1e-3 (no dot) as text; a user means the number
        try:
            return float(v)
        except ValueError:
            pass
    return v


def parse_overrides(pairs: list[str]) -> dict:
    """key=value pairs, applied in order, as one nested mapping. A mapping value merges into what earlier pairs set
    (as _merge merges it into the file's section): `compression={w_bits: 8}` keeps an earlier
    `compression.calib_batches=4`, and the reverse order too."""
    out: dict = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"command line: override {pair!r} is not of the form key=value (e.g. train.seed=1)")
        key, raw = pair.split("=", 1)
        node = out
        parts = key.strip().lstrip("-").split(".")
        for i, p in enumerate(parts[:-1]):
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"command line: an earlier override sets '{'.'.join(parts[:i + 1])}' to {node!r}, "
                                  f"so '{key.strip()}=...' has nothing to change")
        value = _value(raw)  # YAML 1.1 reads an unquoted 2:4 as the base-60 number 124: keep N:M as text
        if isinstance(value, dict) and isinstance(node.get(parts[-1]), dict):
            value = _merge(node[parts[-1]], value, "command line", strict=False)
        node[parts[-1]] = value
    return out


def load_config(path: str | Path, overrides: list[str] | None = None) -> dict:
    cfg = load_yaml_config(path)
    if overrides:
        for pair in overrides:
            top, dot, rest = pair.split("=", 1)[0].lstrip("-").partition(".")
            # `compression.w_bits=8` on a full-precision stage would silently build a default W4A4+2:4 recipe
            if dot and top in cfg and cfg[top] is None:
                raise ConfigError(f"command line: '{top}' is null in {path}, so '{top}.{rest}=...' has nothing to "
                                  f"change; set the whole section, e.g. {top}='{{w_bits: 8}}'")
        cfg = _merge(cfg, parse_overrides(overrides), "command line")
    cfg["config_file"] = str(path)
    return cfg


def save_config(cfg: dict, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg, sort_keys=False))


def expand_paths(cfg: dict, pipeline: str) -> dict:
    """Fill `{runs_dir}`, `{scale}`, `{stage}`, `{pipeline}` in path-like values; default output_dir is
    RUNS_DIR/<scale>/<pipeline>/<stage> (the RUNS_DIR environment variable overrides runs_dir)."""
    import os
    runs_dir = os.environ.get("RUNS_DIR") or cfg.get("runs_dir") or "runs"
    cfg["runs_dir"] = runs_dir
    fmt = dict(runs_dir=runs_dir, scale=cfg.get("scale", "paper"), stage=cfg.get("stage", "stage"), pipeline=pipeline)
    if not cfg.get("output_dir"):
        cfg["output_dir"] = "{runs_dir}/{scale}/{pipeline}/{stage}"

    def fill(v):
        if isinstance(v, str) and "{" in v:
            try:
                return v.format(**fmt)
            except (KeyError, IndexError) as e:
                raise ConfigError(f"{cfg.get('config_file')}: unknown placeholder {e} in {v!r}") from None
        if isinstance(v, dict):
            return {k: fill(x) for k, x in v.items()}
        return v

    # recipe values (regexes) are not paths: leave them alone
    return {k: (v if k == "compression" else fill(v)) for k, v in cfg.items()}


def stage_argv(argv, doc: str, pipeline: str, override_example: str) -> argparse.Namespace:
    """The command line every PIPELINE/train.py takes: `--config STAGE.yaml` and dotted key=value overrides."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help=f"stage YAML, e.g. {pipeline}/configs/qat4.yaml")
    ap.add_argument("overrides", nargs="*", help=f"dotted key=value overrides, e.g. {override_example}")
    return ap.parse_args(argv)


def split_global_batch(global_batch: int, per_device: int, accum: int | None, world: int,
                       source: str) -> tuple[int, int]:
    """(per-device batch, gradient accumulation) that make `global_batch` on `world` processes, so a paper-scale
    stage keeps its global batch on any number of GPUs (choice). `accum` given: checked. `accum` None: derived;
    a configured per-device batch larger than the global batch's share of one process is lowered to that share.
    `source` ("FILE: key") starts the error messages."""
    if global_batch < 1 or per_device < 1:
        raise ConfigError(f"{source} {global_batch} and a per-device batch of {per_device} must be positive")
    if accum is not None:
        if per_device * int(accum) * world != global_batch:
            raise ConfigError(f"{source} {global_batch} != per-device batch {per_device} x accumulation {accum} x "
                              f"{world} processes; set the accumulation to null to derive it, or change the batch")
        return per_device, int(accum)
    if global_batch % world:
        fits = [n for n in range(1, global_batch + 1) if global_batch % n == 0]
        raise ConfigError(f"{source} {global_batch} does not split over {world} processes; run {fits} processes, "
                          f"or change the global batch")
    share = global_batch // world
    if per_device >= share:
        return share, 1
    if share % per_device:
        raise ConfigError(f"{source} {global_batch} over {world} processes is {share} per process, not a multiple "
                          f"of the per-device batch {per_device}; change the per-device batch or set the accumulation")
    return per_device, share // per_device


def comparable(cfg: dict) -> dict:
    """The config as far as it decides the run: a key added to the configs later with a null default does not make
    finished runs stale, nor does RUNS_DIR given once relative and once absolute (paths under it are compared
    absolute)."""
    runs = str(cfg.get("runs_dir") or "").rstrip("/")

    def norm(v, drop_null=True):
        # a null at any depth (dropout.step_at), but not in the open sections, where an absent key means the
        # consumer's default (train.max_grad_norm 1.0, compression.sparsity 2:4), not null
        if isinstance(v, dict):
            return {k: norm(x, drop_null) for k, x in v.items() if x is not None or not drop_null}
        if runs and isinstance(v, str) and (v == runs or v.startswith(runs + "/")):
            return os.path.abspath(v)
        return v
    return {k: norm(v, k not in OPEN_SECTIONS) for k, v in cfg.items() if k not in VOLATILE and v is not None}


def flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def config_changes(saved: dict, cfg: dict, most: int = 3) -> str:
    """How a run dir's config.yaml (`saved`) differs from `cfg` as far as it decides the run (`comparable`), the
    first `most` keys: "key: old -> new; ...", "" if not at all."""
    old, new = flat(comparable(saved)), flat(comparable(cfg))
    keys = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    shown = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys[:most])
    return shown + ("; ..." if len(keys) > most else "")
