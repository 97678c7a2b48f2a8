"""Stage configs: YAML files (with `_base_` inheritance) whose values are the defaults, overridden on the command
line by dotted `key=value` pairs (`train.learning_rate=1e-4`); the resolved config is saved next to the run.

Unknown keys are errors that name the key and the file, so a typo never silently falls back to a default.
"""
from __future__ import annotations

import copy
from pathlib import Path

import yaml


class ConfigError(ValueError):
    pass


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def _merge(base: dict, over: dict, source: str, prefix: str = "", strict: bool = True) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        key = f"{prefix}{k}"
        if strict and k not in base:
            raise ConfigError(f"{source}: unknown config key '{key}'; known keys here: {sorted(base)}")
        if isinstance(v, dict) and isinstance(base.get(k), dict) and not k.endswith("compression"):
            out[k] = _merge(base[k], v, source, key + ".", strict)
        else:
            out[k] = copy.deepcopy(v)
    return out


def load_yaml_config(path: str | Path) -> dict:
    """Read a config, resolving `_base_` (relative to the file) recursively. Keys not in the base are errors."""
    path = Path(path)
    data = _read_yaml(path)
    base_rel = data.pop("_base_", None)
    if base_rel is None:
        return data
    base = load_yaml_config(path.parent / base_rel)
    return _merge(base, data, str(path))


def parse_overrides(pairs: list[str]) -> dict:
    out: dict = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"command line: override {pair!r} is not of the form key=value (e.g. train.seed=1)")
        key, raw = pair.split("=", 1)
        node = out
        parts = key.strip().lstrip("-").split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = yaml.safe_load(raw) if raw != "" else None
    return out


def load_config(path: str | Path, overrides: list[str] | None = None) -> dict:
    cfg = load_yaml_config(path)
    if overrides:
        cfg = _merge(cfg, parse_overrides(overrides), "command line")
    cfg["config_file"] = str(path)
    return cfg


def save_config(cfg: dict, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg, sort_keys=False))
