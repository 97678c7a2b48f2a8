"""Real compressed checkpoints: the converted model on disk at its true size, and back (format: format in common/README.md).

    python -m common.export RUN_DIR OUT_FILE [--report] [--dtype fp16|bf16|fp32] [--index combo3|combo5]
                                             [--pipeline NAME] [--verify] [--overwrite]

Backbone linears keep only their 4-bit codes (two per byte) at the kept 2:4 positions, plus the positions as a
compact index (6 patterns per group of 4: five groups per 13 bits, or three per byte with --index combo3), their
scales and the activation clips; everything else (embeddings, LayerNorm, heads, conv encoder, biases) is stored
in --dtype. `load_compressed` rebuilds a converted model whose outputs are bit-identical to `common.convert(...)`
of the training model when the file was written with dtype float32 (fp16/bf16 round the non-backbone tensors;
the backbone codes, scales and clips are always exact).

API: `export_model(model, out_file, extra_meta=None, dtype=torch.float16)` -> report dict;
`load_compressed(path, model=None)` -> converted model; `read_compressed(path)` -> (tensors, metadata);
`to_semi_structured(model)` -> GPU 2:4 sparse tensor-core inference; `LOADERS` / `register_loader` for run dirs.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import importlib
import json
import os
import struct
import sys
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import packing
from .fake_quant import act_qparams, quantize_act, weight_qrange
from .linear import as_linear
from .prepare import FrozenCompressedLinear, act_quantizers, convert, prepare
from .recipe import Recipe, RecipeError

FORMAT_NAME = "common-compressed-transformer"
FORMAT_VERSION = 1
QUANT_CLIPS = "_act_quant.clips"
QUANT_SIGNED = "_act_quant.signed"
DTYPES = {"fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp32": torch.float32, "float32": torch.float32, "float": torch.float32}
_ST_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32"}


class CompressedFormatError(ValueError):
    """A compressed checkpoint that cannot be read (corrupted, truncated, wrong version) or does not fit."""


def _as_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in _ST_DTYPES:
            raise ValueError(f"unsupported dtype {dtype} for non-backbone tensors; use float16, bfloat16 or float32")
        return dtype
    try:
        return DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; known: {sorted(DTYPES)}") from None


# -- how to rebuild the architecture ------------------------------------------------------------------------------
def timm_spec(name: str, **kwargs) -> dict:
    """Model spec of `timm.create_model(name, pretrained=False, **kwargs)` (timm models do not record their
    constructor arguments: set `model.export_spec = timm_spec(...)`, or pass `spec=` to export_model)."""
    kwargs = {k: v for k, v in kwargs.items() if k != "pretrained"}
    json.dumps(kwargs)  # must be JSON-serialisable to go into the file
    return {"kind": "timm", "name": name, "kwargs": kwargs}


def create_timm(name: str, **kwargs) -> nn.Module:
    """timm.create_model that remembers its arguments, so an exported checkpoint can rebuild the model."""
    import timm
    model = timm.create_model(name, **kwargs)
    model.export_spec = timm_spec(name, **kwargs)
    return model


def model_spec(model: nn.Module) -> dict:
    """{"kind": "hf" | "timm" | "module", ...}: what load_compressed needs to rebuild the architecture."""
    spec = getattr(model, "export_spec", None)
    if spec:
        return dict(spec)
    cls = type(model)
    base = {"class": cls.__name__, "module": cls.__module__}
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover
        PreTrainedModel = ()
    if PreTrainedModel and isinstance(model, PreTrainedModel):
        return {"kind": "hf", **base, "config": json.loads(model.config.to_json_string(use_diff=False))}
    if cls.__module__.startswith("timm."):
        arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
        return {"kind": "timm", **base, "name": arch, "kwargs": None}
    return {"kind": "module", **base}


def build_from_spec(spec: dict, source: str = "checkpoint") -> nn.Module:
    kind = spec.get("kind")
    if kind == "hf":
        mod = str(spec.get("module", ""))
        if not mod.startswith("transformers."):
            raise CompressedFormatError(f"{source}: refusing to import model module {mod!r} (only transformers.*); "
                                        f"pass model= to load_compressed")
        try:
            cls = getattr(importlib.import_module(mod), spec["class"])
        except (ImportError, AttributeError) as e:
            raise CompressedFormatError(f"{source}: cannot find model class {spec.get('class')!r} in {mod} "
                                        f"({e}); pass model= to load_compressed") from None
        return cls(cls.config_class.from_dict(spec["config"]))
    if kind == "timm" and spec.get("name") and spec.get("kwargs") is not None:
        import timm
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in spec["kwargs"].items()}  # JSON lists
        return timm.create_model(spec["name"], pretrained=False, **kwargs)
    raise CompressedFormatError(
        f"{source}: the file does not say how to rebuild its {spec.get('class', '?')} model (kind {kind!r}"
        f"{', no timm create arguments' if kind == 'timm' else ''}); pass model= (the architecture) to "
        f"load_compressed, or export with model.export_spec = common.export.timm_spec(name, **kwargs)")


# -- export -------------------------------------------------------------------------------------------------------
def _tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().cpu().contiguous().reshape(-1)
    return memoryview(t.view(torch.uint8).numpy())


def checksum(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the raw little-endian bytes of every tensor, in ascending order of the (UTF-8) tensor name."""
    h = hashlib.sha256()
    for name in sorted(tensors, key=lambda s: s.encode()):
        h.update(_tensor_bytes(tensors[name]))
    return "sha256:" + h.hexdigest()


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a))


def _pack_linear(name: str, m: FrozenCompressedLinear, dtype: torch.dtype, index: str, notes: list):
    out_f, in_f = m.out_features, m.in_features
    quantized = m.weight is None
    w = m.weight_codes if quantized else m.weight.detach()
    if tuple(w.shape) != (out_f, in_f):
        raise ValueError(f"{name}: weight of shape {tuple(w.shape)}, expected {(out_f, in_f)}")
    kind = ("nibble" if m.w_bits <= 4 else "int8") if quantized else "float"
    entry = {"name": name, "in_features": in_f, "out_features": out_f, "bits": m.w_bits,
             "zero_preserving": bool(m.zero_preserving), "nm": list(m.nm) if m.nm else None, "values": kind,
             "layout": "dense", "index": None, "n_values": out_f * in_f, "per_channel": False,
             "bias": m.bias is not None, "input_quant": f"{name}.input_quant" if m.input_quant is not None else None}
    ts: dict[str, torch.Tensor] = {}
    flat = w.detach().cpu().reshape(-1)
    check_np = (flat.float() if flat.dtype == torch.bfloat16 else flat).numpy()  # -0.0 counts as zero
    if not quantized:
        flat = flat.to(dtype)
    flat_np = flat.view(torch.int16).numpy() if flat.dtype == torch.bfloat16 else flat.numpy()
    if m.mask is not None:
        mask = m.mask.detach().cpu().bool()
        if tuple(mask.shape) != (out_f, in_f):
            raise ValueError(f"{name}: mask of shape {tuple(mask.shape)}, expected {(out_f, in_f)}")
        fmask = mask.reshape(-1).numpy()
        if quantized and not m.zero_preserving:  # code 0 is +step/2 there: the weight is not really sparse
            notes.append(f"{name}: plain grid, pruned weights dequantize to +-step/2 (not 0): stored as dense codes")
        elif not check_np[~fmask].any():
            entry["layout"] = "kept"
        else:
            raise ValueError(f"{name}: nonzero weights at pruned (mask False) positions; cannot store the layer")
        enc, packed = index, None
        if tuple(m.nm or ()) == (2, 4):
            try:
                packed = packing.pack_index(mask, index)
            except ValueError as e:
                notes.append(f"{name}: mask is not a regular 2:4 ({e}); index stored as a bitmask")
        else:
            notes.append(f"{name}: sparsity {m.nm} is not 2:4; index stored as a bitmask")
        if packed is None:
            enc, packed = "bitmask", packing.pack_index(mask, "bitmask")
        entry["index"] = enc
        ts[f"{name}.index"] = _t(packed)
        if entry["layout"] == "kept":
            flat_np = flat_np[fmask]
    entry["n_values"] = int(flat_np.size)
    if kind == "nibble":
        ts[f"{name}.codes"] = _t(packing.pack_nibbles(flat_np))
    elif kind == "int8":
        ts[f"{name}.codes"] = _t(flat_np.astype(np.int8))
    else:
        v = _t(flat_np.copy())
        ts[f"{name}.values"] = v.view(torch.bfloat16) if dtype == torch.bfloat16 else v
    if quantized:
        step = m.weight_step.detach().cpu()
        entry["per_channel"] = step.dim() > 0
        ts[f"{name}.weight_step"] = step.clone(memory_format=torch.contiguous_format)
    if m.bias is not None:
        ts[f"{name}.bias"] = m.bias.detach().cpu().to(dtype, copy=True)
    return entry, ts


def _part_of(name: str, layer_names: set[str]) -> str:
    if name in (QUANT_CLIPS, QUANT_SIGNED):
        return "clips"
    base, _, suffix = name.rpartition(".")
    if base in layer_names:
        return {"codes": "codes", "values": "codes", "index": "index", "weight_step": "scales"}.get(suffix, "other")
    return "other"


def _converted(model: nn.Module) -> nn.Module:
    if getattr(model, "compression_recipe", None) is None:
        raise ValueError("export: the model was not prepared (common.prepare); nothing marks its backbone")
    if getattr(model, "compression_converted", False):
        return model
    return convert(copy.deepcopy(model))


@torch.no_grad()
def export_model(model: nn.Module, out_file, extra_meta: dict | None = None, dtype=torch.float16, *,
                 index: str = "combo5", spec: dict | None = None) -> dict:
    """Write `model` (prepared or converted; a prepared one is converted on a copy) to `out_file` in the
    compressed format and return the size report (see `size_report`). `dtype`: storage dtype of the
    non-backbone floating tensors. `index`: combo5 (5 groups per 13 bits, default: 12.08x on BERT-base
    shapes) or combo3 (3 groups per byte, byte-aligned: 11.9999x)."""
    dtype = _as_dtype(dtype)
    if index not in ("combo3", "combo5"):
        raise ValueError(f"index must be 'combo3' or 'combo5', got {index!r}")
    spec = dict(spec) if spec else model_spec(model)
    conv = _converted(model)
    leftover = [n for n, m in conv.named_modules() if type(m).__name__ == "CompressedLinear"]
    if leftover:
        raise ValueError(f"export: layers not converted: {leftover[:3]}")
    recipe = conv.compression_recipe
    state = conv.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    layers, notes, owned = [], [], set()
    for name, m in conv.named_modules():
        if isinstance(m, FrozenCompressedLinear):
            entry, ts = _pack_linear(name, m, dtype, index, notes)
            layers.append(entry)
            tensors.update(ts)
            owned |= {f"{name}.{b}" for b in ("weight_codes", "weight_step", "mask", "weight", "bias")}
    quants = act_quantizers(conv)
    qmeta = []
    if quants:
        clips, signed = [], []
        for qn, q in quants.items():
            qmeta.append({"name": qn, "bits": q.bits, "method": q.method, "zero_preserving": bool(q.zero_preserving)})
            clips.append(torch.stack([q.lo.detach().float().reshape(()), q.hi.detach().float().reshape(())]))
            signed.append(bool(q.signed))
            owned |= {f"{qn}.lo", f"{qn}.hi", f"{qn}.signed"}
        tensors[QUANT_CLIPS] = torch.stack(clips).cpu()
        tensors[QUANT_SIGNED] = torch.tensor(signed, dtype=torch.uint8)
    aliases, seen = {}, {}
    for k, v in state.items():
        if k in owned:
            continue
        if k in tensors:
            raise ValueError(f"export: state key {k!r} collides with a tensor name of the format")
        ident = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), tuple(v.stride()), v.dtype)
        if v.numel() and ident in seen:  # tied weights: stored once
            aliases[k] = seen[ident]
            continue
        seen[ident] = k
        v = v.detach().cpu()
        tensors[k] = v.to(dtype, copy=True) if v.is_floating_point() else v.clone(
            memory_format=torch.contiguous_format)
    for n in notes:
        warnings.warn(f"export: {n}")
    js = lambda o: json.dumps(o, separators=(",", ":"), default=str)  # noqa: E731
    meta = {
        "format": FORMAT_NAME, "format_version": str(FORMAT_VERSION),
        "recipe": js(recipe.to_dict()), "model": js(spec), "layers": js(layers), "act_quantizers": js(qmeta),
        "storage": js({"dtype": str(dtype).replace("torch.", ""), "index": index, "aliases": aliases}),
        "extra": js(extra_meta or {}), "notes": js(notes),
        "created_by": f"common.export (torch {torch.__version__})",
        "checksum": checksum(tensors),
    }
    from safetensors.torch import save
    data = save(tensors, meta)
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_file.with_name(out_file.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, out_file)  # never a half-written file under the final name
    return size_report(data, tensors, layers, state, owned, aliases, str(out_file), dtype, index, notes)


def size_report(data: bytes, tensors, layers, state, owned, aliases, file, dtype, index, notes) -> dict:
    """Bytes per part (they sum to the file size), bits per backbone weight, ratios vs FP32/FP16 checkpoints.

    Reference checkpoints: the same model dense and unquantized, every floating tensor at 4 (2) bytes (backbone
    weights + biases + all other tensors, tied weights once; integer buffers at their own size), no header.
    Backbone = the compressed linears' weights only: codes + index + scales vs 4 (2) bytes per weight."""
    header = struct.unpack("<Q", data[:8])[0]
    names = {e["name"] for e in layers}
    parts = {"codes": 0, "index": 0, "scales": 0, "clips": 0, "other": 0, "metadata": 8 + header}
    for k, t in tensors.items():
        parts[_part_of(k, names)] += t.numel() * t.element_size()
    file_bytes = len(data)
    assert sum(parts.values()) == file_bytes, (parts, file_bytes)
    n_w = sum(e["in_features"] * e["out_features"] for e in layers)
    n_bias = sum(e["out_features"] for e in layers if e["bias"])
    ref32 = ref16 = 0
    for k, v in state.items():
        if k in owned or k in aliases:
            continue
        if v.is_floating_point():
            ref32, ref16 = ref32 + 4 * v.numel(), ref16 + 2 * v.numel()
        else:
            ref32, ref16 = ref32 + v.numel() * v.element_size(), ref16 + v.numel() * v.element_size()
    ref32 += 4 * (n_w + n_bias)
    ref16 += 2 * (n_w + n_bias)
    bb = parts["codes"] + parts["index"] + parts["scales"]
    r = lambda a, b: round(a / b, 4) if b else None  # noqa: E731
    return {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "file": file, "file_bytes": file_bytes,
        "dtype": str(dtype).replace("torch.", ""), "index_encoding": index,
        "parts_bytes": parts,
        "backbone_linears": len(layers), "backbone_weights": n_w,
        "sparse_linears": sum(e["layout"] == "kept" for e in layers),
        "dense_linears": sum(e["layout"] == "dense" for e in layers),
        "backbone_bytes": bb, "backbone_fp32_bytes": 4 * n_w, "backbone_fp16_bytes": 2 * n_w,
        "bits_per_backbone_weight": round(8 * bb / n_w, 4) if n_w else None,
        "bits_breakdown": {p: round(8 * parts[p] / n_w, 4) if n_w else None for p in ("codes", "index", "scales")},
        "backbone_ratio_vs_fp32": r(4 * n_w, bb), "backbone_ratio_vs_fp16": r(2 * n_w, bb),
        "model_fp32_bytes": ref32, "model_fp16_bytes": ref16,
        "model_ratio_vs_fp32": r(ref32, file_bytes), "model_ratio_vs_fp16": r(ref16, file_bytes),
        "notes": list(notes),
    }


# -- reading ------------------------------------------------------------------------------------------------------
def _json_field(meta: dict, key: str, path) -> object:
    if key not in meta:
        raise CompressedFormatError(f"{path}: metadata key {key!r} is missing (corrupted or foreign file)")
    try:
        return json.loads(meta[key])
    except json.JSONDecodeError as e:
        raise CompressedFormatError(f"{path}: metadata {key!r} is not valid JSON ({e}): corrupted file") from None


def read_compressed(path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata with its JSON fields parsed), after checking format, version, size and checksum."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CompressedFormatError(f"{path}: file not found") from None
    if len(data) < 8:
        raise CompressedFormatError(f"{path}: truncated: {len(data)} bytes, not even a safetensors header")
    n = struct.unpack("<Q", data[:8])[0]
    if 8 + n > len(data):
        raise CompressedFormatError(f"{path}: truncated or not a safetensors file: the header claims {n} bytes "
                                    f"but the file has {len(data)} bytes in all")
    try:
        header = json.loads(data[8:8 + n])
        assert isinstance(header, dict)
    except (ValueError, AssertionError):
        raise CompressedFormatError(f"{path}: corrupted header (not a valid safetensors JSON header)") from None
    meta = header.get("__metadata__") or {}
    if meta.get("format") != FORMAT_NAME:
        raise CompressedFormatError(f"{path}: not a compressed checkpoint (format {meta.get('format')!r}, "
                                    f"expected {FORMAT_NAME!r}); write one with python -m common.export")
    if meta.get("format_version") != str(FORMAT_VERSION):
        raise CompressedFormatError(f"{path}: format version {meta.get('format_version')!r} is not supported by "
                                    f"this reader (it reads version {FORMAT_VERSION})")
    try:
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (TypeError, KeyError, ValueError, IndexError):
        raise CompressedFormatError(f"{path}: corrupted header (bad tensor table)") from None
    if 8 + n + end > len(data):
        raise CompressedFormatError(f"{path}: truncated: the header describes {8 + n + end} bytes, the file has "
                                    f"{len(data)}")
    if 8 + n + end < len(data):
        raise CompressedFormatError(f"{path}: {len(data) - 8 - n - end} unexpected bytes after the tensor data "
                                    f"(corrupted or concatenated file)")
    from safetensors.torch import load
    try:
        tensors = load(data)
    except Exception as e:  # safetensors raises its own error type
        raise CompressedFormatError(f"{path}: corrupted safetensors data: {e}") from None
    got = checksum(tensors)
    if got != meta.get("checksum"):
        raise CompressedFormatError(f"{path}: checksum mismatch, the tensor data is corrupted (stored "
                                    f"{meta.get('checksum')}, computed {got})")
    parsed = {k: meta[k] for k in ("format", "format_version", "created_by", "checksum") if k in meta}
    for k in ("recipe", "model", "layers", "act_quantizers", "storage", "extra", "notes"):
        parsed[k] = _json_field(meta, k, path)
    return tensors, parsed


def _mismatch(path, what: str, in_file, in_model) -> CompressedFormatError:
    a, b = sorted(set(in_file) - set(in_model)), sorted(set(in_model) - set(in_file))
    return CompressedFormatError(
        f"{path}: the model does not match the checkpoint ({what}): only in the file {a[:5]}"
        f"{'…' if len(a) > 5 else ''}, only in the model {b[:5]}{'…' if len(b) > 5 else ''}")


def _decode_entry(path, e: dict, tensors: dict) -> dict:
    """One layer of the file -> {"codes" (int8 [out, in]) or "weight" (float), "step", "mask", "bias"};
    checks the file's own consistency (lengths, code range), not the model."""
    name = e["name"]
    out_f, in_f = e["out_features"], e["in_features"]
    n = out_f * in_f

    def need(key):
        if key not in tensors:
            raise CompressedFormatError(f"{path}: tensor {key!r} is missing (corrupted file)")
        return tensors[key]

    try:
        mask = None
        if e["index"] is not None:
            mask = packing.unpack_index(need(f"{name}.index").numpy(), e["index"], n)
        if e["values"] == "nibble":
            vals = packing.unpack_nibbles(need(f"{name}.codes").numpy(), e["n_values"])
        elif e["values"] == "int8":
            vals = need(f"{name}.codes").numpy().astype(np.int8).reshape(-1)
        elif e["values"] == "float":
            vals = need(f"{name}.values").reshape(-1)
        else:
            raise packing.PackingError(f"unknown value encoding {e['values']!r}")
    except packing.PackingError as err:
        raise CompressedFormatError(f"{path}: layer {name}: {err}") from None
    if e["layout"] not in ("kept", "dense") or (e["layout"] == "kept" and mask is None):
        raise CompressedFormatError(f"{path}: layer {name}: layout {e['layout']!r} without its index (corrupted)")
    expect = int(mask.sum()) if e["layout"] == "kept" else n
    got = vals.size if isinstance(vals, np.ndarray) else vals.numel()
    if got != expect:
        raise CompressedFormatError(f"{path}: layer {name}: {got} stored values, the layout {e['layout']!r} "
                                    f"needs {expect} (corrupted file)")
    out = {"mask": None if mask is None else torch.from_numpy(mask).reshape(out_f, in_f), "step": None,
           "bias": need(f"{name}.bias") if e["bias"] else None}
    if e["values"] == "float":
        full = vals
        if e["layout"] == "kept":
            full = torch.zeros(n, dtype=vals.dtype)
            full[out["mask"].reshape(-1)] = vals
        out["weight"] = full.reshape(out_f, in_f)
        return out
    if e["layout"] == "kept":
        full = np.zeros(n, np.int8)
        full[mask] = vals
    else:
        full = vals
    lo, hi = weight_qrange(e["bits"], e["zero_preserving"])
    if full.size and (int(full.min()) < lo or int(full.max()) > hi):
        raise CompressedFormatError(f"{path}: layer {name}: codes outside {lo}..{hi} (corrupted file)")
    out["codes"] = torch.from_numpy(full).reshape(out_f, in_f)
    out["step"] = need(f"{name}.weight_step")
    return out


def _assign_layer(path, e: dict, d: dict, m: FrozenCompressedLinear) -> None:
    name = e["name"]
    out_f, in_f = e["out_features"], e["in_features"]
    if (m.out_features, m.in_features) != (out_f, in_f):
        raise CompressedFormatError(f"{path}: the model does not match the checkpoint: layer {name} is "
                                    f"{out_f}x{in_f} in the file, {m.out_features}x{m.in_features} in the model")
    mine = {"bits": m.w_bits, "zero_preserving": bool(m.zero_preserving), "nm": list(m.nm) if m.nm else None,
            "bias": m.bias is not None, "quantized": m.weight is None, "input_quant": m.input_quant is not None}
    theirs = {"bits": e["bits"], "zero_preserving": e["zero_preserving"], "nm": e["nm"], "bias": e["bias"],
              "quantized": e["values"] != "float", "input_quant": e["input_quant"] is not None}
    if mine != theirs:
        diff = {k: (theirs[k], mine[k]) for k in mine if mine[k] != theirs[k]}
        raise CompressedFormatError(f"{path}: the model does not match the checkpoint: layer {name} differs "
                                    f"(file, model): {diff}")
    if "codes" in d:
        dev = m.weight_codes.device
        if d["step"].shape != m.weight_step.shape:
            raise CompressedFormatError(f"{path}: the model does not match the checkpoint: layer {name} has step "
                                        f"shape {tuple(d['step'].shape)} in the file, {tuple(m.weight_step.shape)} "
                                        f"in the model (per-channel vs per-tensor)")
        m.weight_codes = d["codes"].to(dev)
        m.weight_step = d["step"].to(device=dev, dtype=m.weight_step.dtype)
    else:
        dev = m.weight.device
        m.weight = d["weight"].to(device=dev, dtype=m.weight.dtype)
    m.mask = None if d["mask"] is None else d["mask"].to(dev)
    if d["bias"] is not None:
        m.bias = d["bias"].to(device=m.bias.device, dtype=m.bias.dtype)


@torch.no_grad()
def load_compressed(path, model: nn.Module | None = None) -> nn.Module:
    """Rebuild the converted model from a compressed checkpoint: from the architecture stored in the file, or
    into `model` (plain, prepared or converted, same architecture; a plain one is prepared with the file's
    recipe and masks, and converted). Returns the model in eval mode."""
    tensors, meta = read_compressed(path)
    try:
        recipe = Recipe.from_dict(meta["recipe"], source=f"{path}: recipe")
    except RecipeError as e:
        raise CompressedFormatError(str(e)) from None
    layers = {e["name"]: e for e in meta["layers"]}
    decoded = {name: _decode_entry(path, e, tensors) for name, e in layers.items()}
    if model is None:
        model = build_from_spec(meta["model"], str(path))
    if getattr(model, "compression_recipe", None) is None:
        mods = dict(model.named_modules())
        for name, e in layers.items():
            lin = as_linear(mods[name]) if name in mods else None  # nn.Linear, or transformers' Conv1D
            if lin is not None and (lin.out_features, lin.in_features) != (e["out_features"], e["in_features"]):
                raise CompressedFormatError(
                    f"{path}: the model does not match the checkpoint: layer {name} is {e['out_features']}x"
                    f"{e['in_features']} in the file, {lin.out_features}x{lin.in_features} in the model")
        try:  # the file's masks: no need to recompute them from weights that are about to be replaced
            prepare(model, recipe, {n: d["mask"] for n, d in decoded.items() if d["mask"] is not None})
        except ValueError as e:
            raise CompressedFormatError(f"{path}: the model does not match the checkpoint: {e}") from None
    if not getattr(model, "compression_converted", False):
        convert(model)
    lins = {n: m for n, m in model.named_modules() if isinstance(m, FrozenCompressedLinear)}
    if set(lins) != set(layers):
        raise _mismatch(path, "compressed linears", layers, lins)
    for name, e in layers.items():
        _assign_layer(path, e, decoded[name], lins[name])
    quants = act_quantizers(model)
    qmeta = {q["name"]: (i, q) for i, q in enumerate(meta["act_quantizers"])}
    if set(quants) != set(qmeta):
        raise _mismatch(path, "activation quantizers", qmeta, quants)
    if quants:
        clips, signed = tensors.get(QUANT_CLIPS), tensors.get(QUANT_SIGNED)
        if clips is None or signed is None or tuple(clips.shape) != (len(qmeta), 2) or signed.numel() != len(qmeta):
            raise CompressedFormatError(f"{path}: activation clip table missing or of the wrong shape (corrupted)")
        for qn, q in quants.items():
            i, qm = qmeta[qn]
            if (q.bits, q.method, bool(q.zero_preserving)) != (qm["bits"], qm["method"], qm["zero_preserving"]):
                raise CompressedFormatError(
                    f"{path}: the model does not match the checkpoint: quantizer {qn} is "
                    f"{(qm['bits'], qm['method'], qm['zero_preserving'])} in the file, "
                    f"{(q.bits, q.method, bool(q.zero_preserving))} in the model (bits, method, zero_preserving)")
            q.lo.copy_(clips[i, 0])
            q.hi.copy_(clips[i, 1])
            q.signed.fill_(bool(signed[i]))
    owned = {f"{n}.{b}" for n in lins for b in ("weight_codes", "weight_step", "mask", "weight", "bias")}
    owned |= {f"{n}.{b}" for n in quants for b in ("lo", "hi", "signed")}
    expected = [k for k in model.state_dict() if k not in owned]
    names = set(layers)
    aliases = meta["storage"].get("aliases", {})
    others = {k: v for k, v in tensors.items() if _part_of(k, names) == "other" and k not in owned}
    others.update({k: tensors[t] for k, t in aliases.items() if t in tensors})
    if set(others) != set(expected):
        raise _mismatch(path, "other tensors", others, expected)
    try:
        model.load_state_dict(others, strict=False)
    except RuntimeError as e:
        raise CompressedFormatError(f"{path}: the model does not match the checkpoint: {e}") from None
    return model.eval()


@torch.no_grad()
def verify_export(converted: nn.Module, path) -> dict:
    """Reload `path` and compare every state tensor with `converted`: {"bit_exact": bool, "max_abs_diff": float}."""
    a = converted.state_dict()
    b = load_compressed(path).state_dict()
    if set(a) != set(b):
        raise CompressedFormatError(f"{path}: reloaded model has other tensors than the exported one")
    exact, diff = True, 0.0
    for k, v in a.items():
        if not torch.equal(v, b[k]):
            exact = False
            if v.is_floating_point():
                diff = max(diff, float((v.float() - b[k].float()).abs().max()))
            else:
                diff = float("inf")
    return {"bit_exact": exact, "max_abs_diff": diff}


# -- GPU inference with 2:4 sparse tensor cores ------------------------------------------------------------------
class SemiStructuredLinear(nn.Module):
    """FrozenCompressedLinear whose dequantized 2:4 weight is a torch SparseSemiStructuredTensor. The input is
    quantized exactly as in the frozen layer (in the model's dtype), then cast to `compute_dtype` for the sparse
    matmul and the output cast back, so the rest of the model may stay in float32."""

    def __init__(self, src: FrozenCompressedLinear, compute_dtype: torch.dtype, sparse_cls):
        super().__init__()
        self.in_features, self.out_features, self.nm = src.in_features, src.out_features, src.nm
        self.w_bits, self.zero_preserving = src.w_bits, src.zero_preserving
        w = src.effective_weight().detach()
        if src.mask is not None:
            w = w * src.mask
        self.weight = nn.Parameter(sparse_cls.from_dense(w.to(compute_dtype).contiguous()), requires_grad=False)
        self.register_buffer("bias", None if src.bias is None else src.bias.detach().to(compute_dtype))
        self.input_quant = src.input_quant
        self.compute_dtype = compute_dtype

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"compute_dtype={self.compute_dtype}, backend={type(self.weight).__name__}")

    def forward(self, x):
        aq = self.input_quant
        if aq is not None:
            scale, zp, _, _ = act_qparams(aq.lo, aq.hi, aq.bits, aq.zero_preserving)
            x = quantize_act(x, scale, zp, aq.bits, aq.zero_preserving)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(self.compute_dtype).contiguous()
        y = F.linear(x2, self.weight, self.bias)
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)


def semi_structured_skip_reason(m: FrozenCompressedLinear, sparse_cls=None, dtype=torch.float16) -> str | None:
    """Why to_semi_structured leaves the frozen layer `m` as it is, or None if it converts it. Without `sparse_cls`
    (a torch.sparse.SparseSemiStructuredTensor subclass) only the layer itself counts (a 2:4 mask, a weight grid
    with an exact zero), not its device or the backend's shape limits."""
    if tuple(m.nm or ()) != (2, 4) or m.mask is None:
        return "not 2:4 sparse"
    if not m.zero_preserving and m.weight is None:
        return "plain grid: pruned weights are not zero"
    if sparse_cls is None:
        return None
    dev = (m.weight_codes if m.weight is None else m.weight).device
    if dev.type != "cuda":
        return f"on {dev}, not CUDA: move the model to the GPU first"
    c = sparse_cls._DTYPE_SHAPE_CONSTRAINTS.get(dtype)
    if c is None or m.out_features % c.sparse_min_rows or m.in_features % c.sparse_min_cols:
        return (f"shape {m.out_features}x{m.in_features} not a multiple of "
                f"{(c.sparse_min_rows, c.sparse_min_cols) if c else '?'} for {sparse_cls.__name__} {dtype}")
    return None


@torch.no_grad()
def to_semi_structured(model: nn.Module, dtype=torch.float16, backend: str = "auto") -> dict:
    """Swap the converted model's 2:4 linears for SemiStructuredLinear (torch.sparse.to_sparse_semi_structured
    layouts) for inference on GPUs with sparse tensor cores (Ampere and newer), in place. The model must be on a
    CUDA device. `dtype`: float16 or bfloat16 (compute dtype of the sparse matmuls). `backend`: "cusparselt",
    "cutlass" or "auto" (cuSPARSELt when available). Layers whose shape the backend does not support, dense
    layers and plain-grid layers stay as they are. Returns {"converted": [names], "skipped": {name: reason}}."""
    from torch.sparse import SparseSemiStructuredTensorCUSPARSELT, SparseSemiStructuredTensorCUTLASS
    if dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"to_semi_structured: dtype must be float16 or bfloat16, got {dtype} (int8 is not "
                         f"provided: it would need integer activation codes and int32 outputs)")
    if not torch.cuda.is_available():
        raise RuntimeError("to_semi_structured: needs a CUDA GPU (semi-structured sparse tensors are CUDA only)")
    if not getattr(model, "compression_converted", False):
        raise ValueError("to_semi_structured: convert the model first (common.convert or load_compressed)")
    if backend == "auto":
        backend = "cusparselt" if torch.backends.cusparselt.is_available() else "cutlass"
    cls = {"cusparselt": SparseSemiStructuredTensorCUSPARSELT, "cutlass": SparseSemiStructuredTensorCUTLASS}[backend]
    done, skipped = [], {}
    for name, m in list(model.named_modules()):
        if not isinstance(m, FrozenCompressedLinear):
            continue
        reason = semi_structured_skip_reason(m, cls, dtype)
        if reason is not None:
            skipped[name] = reason
        else:
            new = SemiStructuredLinear(m, dtype, cls)
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, new)
            done.append(name)
    return {"converted": done, "skipped": skipped, "backend": backend}


# -- run directories ----------------------------------------------------------------------------------------------
LOADERS: dict[str, Callable[[Path], nn.Module]] = {}


def register_loader(pipeline: str):
    """Decorator: `fn(run_dir) -> prepared (or converted) model` for runs of `pipeline`."""
    def deco(fn):
        LOADERS[pipeline] = fn
        return fn
    return deco


@register_loader("bert_squad")
def _load_bert_squad(run_dir: Path) -> nn.Module:
    from bert_squad.eval import load_run
    return load_run(Path(run_dir))[1]


@register_loader("hf")
def load_hf_run(run_dir: Path) -> nn.Module:
    """Any Hugging Face run dir: the class from config.json's "architectures", the recipe from config.yaml,
    the prepared model's weights from model.safetensors (strict)."""
    import transformers
    from .runs import RunError
    from .stage import load_hf_run as load_prepared

    def build(d: Path) -> nn.Module:
        arch = (json.loads((d / "config.json").read_text()).get("architectures") or [None])[0]
        cls = getattr(transformers, arch, None) if arch else None
        if cls is None:
            raise RunError(f"{d}/config.json: no known 'architectures' entry ({arch!r})")
        return cls(transformers.AutoConfig.from_pretrained(d))

    return load_prepared(Path(run_dir), build)[1]


@register_loader("wav2vec_librispeech")
def _load_wav2vec_librispeech(run_dir: Path) -> nn.Module:
    from wav2vec_librispeech.eval import load_run
    return load_run(Path(run_dir))[1]


@register_loader("vit_imagenet")
def _load_vit_imagenet(run_dir: Path) -> nn.Module:
    """vit_imagenet.eval.load_run_model, plus the timm create arguments (timm models do not keep them) so the
    exported file can rebuild the architecture on its own."""
    from common.config import load_config
    from vit_imagenet.eval import load_run_model
    from vit_imagenet.pipeline import MODEL_KWARGS
    cfg = load_config(Path(run_dir) / "config.yaml")
    model = load_run_model(Path(run_dir), cfg)
    m = cfg["model"]
    model.export_spec = timm_spec(m["name"], **{k: m[k] for k in MODEL_KWARGS if m.get(k) is not None})
    return model.eval()


def detect_pipeline(run_dir: Path) -> tuple[str, str]:
    """(pipeline, how it was found): metrics.json "pipeline", else config.yaml "pipeline", else a path component
    equal to a registered pipeline (runs/<scale>/<pipeline>/<stage>), else "hf" when config.json exists."""
    import yaml
    run_dir = Path(run_dir)
    for fname, read in (("metrics.json", json.loads), ("config.yaml", yaml.safe_load)):
        f = run_dir / fname
        if f.exists():
            try:
                p = (read(f.read_text()) or {}).get("pipeline")
            except Exception:  # an unreadable file just does not tell
                p = None
            if p:
                return str(p), f"{fname} 'pipeline'"
    for part in reversed(run_dir.resolve().parts):
        if part in LOADERS and part != "hf":
            return part, "run dir path"
    if (run_dir / "config.json").exists():
        return "hf", "config.json present"
    raise CompressedFormatError(f"{run_dir}: cannot tell which pipeline made this run (no 'pipeline' in "
                                f"metrics.json/config.yaml, no registered name {sorted(LOADERS)} in the path, "
                                f"no config.json); pass --pipeline")


def export_run(run_dir, out_file, dtype=torch.float16, index: str = "combo5", pipeline: str | None = None,
               verify: bool = False) -> dict:
    """Load a run dir with its pipeline's loader, export it, and write RUN_DIR/compression.json (the report)."""
    run_dir = Path(run_dir)
    how = "--pipeline"
    if pipeline is None:
        pipeline, how = detect_pipeline(run_dir)
    if pipeline not in LOADERS:
        raise CompressedFormatError(f"{run_dir}: no loader registered for pipeline {pipeline!r} (found by {how}); "
                                    f"known: {sorted(LOADERS)} (common.export.register_loader)")
    model = LOADERS[pipeline](run_dir)
    conv = _converted(model)
    extra = {"run_dir": str(run_dir), "pipeline": pipeline, "pipeline_found_by": how}
    from .runs import read_metrics
    if m := read_metrics(run_dir):  # a damaged one: an error that names it
        extra.update({k: m.get(k) for k in ("stage", "scale", "model", "main_metric") if k in m})
        if m.get("main_metric") in m:
            extra[m["main_metric"]] = m[m["main_metric"]]
    report = export_model(conv, out_file, extra, dtype, index=index)
    report.update(pipeline=pipeline, pipeline_found_by=how, run_dir=str(run_dir))
    if verify:
        report["verify"] = verify_export(conv, out_file)
    (run_dir / "compression.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def summary_line(rep: dict) -> str:
    line = (f"{rep['file']}: {rep['file_bytes']:,} bytes; backbone {rep['bits_per_backbone_weight']} bits/weight "
            f"= {rep['backbone_ratio_vs_fp32']}x vs FP32; whole model {rep['model_ratio_vs_fp32']}x vs FP32, "
            f"{rep['model_ratio_vs_fp16']}x vs FP16 ({rep['dtype']} non-backbone tensors)")
    v = rep.get("verify")
    if v:
        line += "; reload: bit-exact" if v["bit_exact"] else f"; reload: max |diff| {v['max_abs_diff']:.3g}"
    return line


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("out_file", type=Path)
    ap.add_argument("--report", action="store_true", help="print the full size report (JSON)")
    ap.add_argument("--dtype", default="fp16", help="non-backbone tensors: fp16 (default), bf16 or fp32")
    ap.add_argument("--index", default="combo5", choices=("combo3", "combo5"),
                    help="2:4 index: 5 groups per 13 bits (combo5, default, smaller) or 3 groups per byte "
                         "(combo3, byte-aligned)")
    ap.add_argument("--pipeline", default=None, help=f"loader to use (default: detected); known: {sorted(LOADERS)}")
    ap.add_argument("--verify", action="store_true", help="reload the file and compare every tensor")
    ap.add_argument("--overwrite", action="store_true", help="replace OUT_FILE if it exists")
    a = ap.parse_args(argv)
    if not a.run_dir.is_dir():
        raise CompressedFormatError(f"{a.run_dir}: no such run dir")
    if a.out_file.exists() and not a.overwrite:  # nothing a user made is replaced unasked
        raise CompressedFormatError(f"{a.out_file} exists; pass --overwrite to replace it")
    root = str(Path(__file__).resolve().parents[1])
    if root not in sys.path:  # pipeline packages (bert_squad, ...) live next to common/
        sys.path.insert(0, root)
    rep = export_run(a.run_dir, a.out_file, _as_dtype(a.dtype), a.index, a.pipeline, a.verify)
    print(json.dumps(rep, indent=2) if a.report else summary_line(rep))
    return rep


if __name__ == "__main__":
    from common.runs import cli
    cli(main, CompressedFormatError)
