"""Bit packing of the compressed checkpoint (format in common/README.md): 4-bit codes two per byte, and the positions of
an N:M mask as a compact index. Pure functions on NumPy arrays / torch tensors, all little-endian in bits:

* nibbles: value 2i in the low nibble (bits 0-3) of byte i, value 2i+1 in the high nibble (bits 4-7); each nibble
  is the code in 4-bit two's complement (-8..7; the zero-preserving grid uses -7..7). An odd count pads with 0.
* 2:4 patterns: the C(4,2) = 6 ways to keep 2 of 4 weights, numbered in lexicographic order (PATTERNS_2_4).
* combo3: three patterns per byte, byte = p0 + 6*p1 + 36*p2 (values 0..215; 216..255 never occur).
* combo5: five patterns per 13 bits, v = p0 + 6*p1 + 36*p2 + 216*p3 + 1296*p4 (< 7776 < 2^13); the 13-bit fields
  are concatenated least-significant bit first into a little-endian bit stream (the stream is the integer
  sum_k v_k * 2^(13k)), padded with zero bits to whole bytes.
* bitmask: one bit per weight, weight i at bit i % 8 of byte i // 8 (any mask, any N:M).
Trailing padding (missing groups in the last byte or field) is pattern 0 / zero bits.
"""
from __future__ import annotations

import itertools

import numpy as np
import torch

PATTERNS_2_4: tuple[tuple[int, int], ...] = tuple(itertools.combinations(range(4), 2))
# ((0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3))
_PATTERN_MASKS = np.array([[i in p for i in range(4)] for p in PATTERNS_2_4], dtype=bool)  # [6, 4]
# 4-bit group mask (bit i = position i kept) -> pattern id, -1 where the group does not keep exactly 2
_MASK_TO_PATTERN = np.full(16, -1, dtype=np.int16)
for _pid, _p in enumerate(PATTERNS_2_4):
    _MASK_TO_PATTERN[(1 << _p[0]) | (1 << _p[1])] = _pid

INDEX_ENCODINGS = ("combo3", "combo5", "bitmask")


class PackingError(ValueError):
    """Packed data that cannot be decoded (out-of-range bytes, wrong lengths): a corrupted file."""


def _np(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


# -- nibbles ----------------------------------------------------------------------------------------------------
def pack_nibbles(codes) -> np.ndarray:
    """int codes in -8..7 (any shape, flattened row-major) -> uint8 [ceil(n/2)]."""
    c = _np(codes).reshape(-1).astype(np.int16)
    if c.size and (c.min() < -8 or c.max() > 7):
        raise ValueError(f"codes out of the 4-bit range -8..7 (min {c.min()}, max {c.max()})")
    u = (c & 0xF).astype(np.uint8)
    if u.size % 2:
        u = np.concatenate([u, np.zeros(1, np.uint8)])
    return u[0::2] | (u[1::2] << 4)


def unpack_nibbles(packed, n: int) -> np.ndarray:
    """uint8 [ceil(n/2)] -> int8 [n] (sign-extended 4-bit two's complement)."""
    p = _np(packed).reshape(-1).astype(np.uint8)
    if p.size != (n + 1) // 2:
        raise PackingError(f"nibble data holds {p.size} bytes, expected {(n + 1) // 2} for {n} codes")
    u = np.empty(p.size * 2, np.int8)
    u[0::2] = (p & 0xF).astype(np.int8)
    u[1::2] = (p >> 4).astype(np.int8)
    u = np.where(u >= 8, u - 16, u).astype(np.int8)
    return u[:n]


# -- 2:4 patterns -----------------------------------------------------------------------------------------------
def mask_to_patterns(mask) -> np.ndarray:
    """bool mask (any shape, last dim a multiple of 4; groups of 4 consecutive along it) -> uint8 pattern ids
    [n_groups]. Raises ValueError when a group does not keep exactly 2 of its 4 weights."""
    m = _np(mask).astype(bool)
    if m.shape[-1] % 4:
        raise ValueError(f"mask last dimension {m.shape[-1]} is not a multiple of 4")
    g = m.reshape(-1, 4).astype(np.uint8)
    key = g[:, 0] | (g[:, 1] << 1) | (g[:, 2] << 2) | (g[:, 3] << 3)
    pid = _MASK_TO_PATTERN[key]
    if (pid < 0).any():
        bad = int(np.flatnonzero(pid < 0)[0])
        raise ValueError(f"group {bad} keeps {int(g[bad].sum())} of 4 weights, not exactly 2")
    return pid.astype(np.uint8)


def patterns_to_mask(patterns) -> np.ndarray:
    """uint8 pattern ids [n_groups] -> bool [n_groups * 4]."""
    p = _np(patterns).reshape(-1)
    if p.size and p.max() >= 6:
        raise PackingError(f"pattern id {int(p.max())} out of range 0..5")
    return _PATTERN_MASKS[p.astype(np.int64)].reshape(-1)


def _digits(patterns, k: int) -> np.ndarray:
    p = _np(patterns).reshape(-1).astype(np.int64)
    if p.size and (p.min() < 0 or p.max() >= 6):
        raise ValueError("pattern ids must be in 0..5")
    pad = (-p.size) % k
    if pad:
        p = np.concatenate([p, np.zeros(pad, np.int64)])
    d = p.reshape(-1, k)
    return (d * (6 ** np.arange(k, dtype=np.int64))).sum(1)


def _undigits(v: np.ndarray, k: int, n: int) -> np.ndarray:
    out = np.empty((v.size, k), np.uint8)
    v = v.astype(np.int64)
    for j in range(k):
        out[:, j] = v % 6
        v = v // 6
    return out.reshape(-1)[:n]


def pack_combo3(patterns) -> np.ndarray:
    """pattern ids [g] -> uint8 [ceil(g/3)], byte = p0 + 6*p1 + 36*p2."""
    return _digits(patterns, 3).astype(np.uint8)


def unpack_combo3(packed, n_groups: int) -> np.ndarray:
    b = _np(packed).reshape(-1)
    if b.size != -(-n_groups // 3):
        raise PackingError(f"combo3 index holds {b.size} bytes, expected {-(-n_groups // 3)} for {n_groups} groups")
    if b.size and int(b.max()) >= 216:
        raise PackingError(f"combo3 index byte {int(b.max())} >= 216 (6^3) is not a valid pattern triple")
    return _undigits(b, 3, n_groups)


def combo5_nbytes(n_groups: int) -> int:
    n_fields = -(-n_groups // 5)  # ceil(g / 5)
    return (13 * n_fields + 7) // 8


def pack_combo5(patterns) -> np.ndarray:
    """pattern ids [g] -> uint8 [ceil(13*ceil(g/5)/8)]: 13-bit fields, LSB-first bit stream."""
    v = _digits(patterns, 5)
    bits = ((v[:, None] >> np.arange(13)) & 1).astype(np.uint8).reshape(-1)
    return np.packbits(bits, bitorder="little")


def unpack_combo5(packed, n_groups: int) -> np.ndarray:
    b = _np(packed).reshape(-1).astype(np.uint8)
    n_fields = -(-n_groups // 5)
    if b.size != combo5_nbytes(n_groups):
        raise PackingError(f"combo5 index holds {b.size} bytes, expected {combo5_nbytes(n_groups)} for "
                           f"{n_groups} groups")
    bits = np.unpackbits(b, bitorder="little")[: n_fields * 13].reshape(n_fields, 13).astype(np.int64)
    v = (bits << np.arange(13)).sum(1)
    if v.size and int(v.max()) >= 7776:
        raise PackingError(f"combo5 field {int(v.max())} >= 7776 (6^5) is not a valid pattern quintuple")
    return _undigits(v, 5, n_groups)


# -- masks ------------------------------------------------------------------------------------------------------
def pack_bitmask(mask) -> np.ndarray:
    return np.packbits(_np(mask).astype(bool).reshape(-1), bitorder="little")


def unpack_bitmask(packed, n: int) -> np.ndarray:
    b = _np(packed).reshape(-1).astype(np.uint8)
    if b.size != -(-n // 8):
        raise PackingError(f"bitmask holds {b.size} bytes, expected {-(-n // 8)} for {n} weights")
    return np.unpackbits(b, bitorder="little")[:n].astype(bool)


def pack_index(mask, encoding: str) -> np.ndarray:
    """bool mask [out, in] -> packed index (uint8 1-D) in `encoding` (combo3 | combo5 | bitmask)."""
    if encoding == "bitmask":
        return pack_bitmask(mask)
    pats = mask_to_patterns(mask)
    if encoding == "combo3":
        return pack_combo3(pats)
    if encoding == "combo5":
        return pack_combo5(pats)
    raise ValueError(f"unknown index encoding {encoding!r}; known: {INDEX_ENCODINGS}")


def unpack_index(packed, encoding: str, n_weights: int) -> np.ndarray:
    """packed index -> bool [n_weights] (flattened row-major mask)."""
    if encoding == "bitmask":
        return unpack_bitmask(packed, n_weights)
    if n_weights % 4:
        raise PackingError(f"{encoding} index needs a multiple of 4 weights, got {n_weights}")
    if encoding == "combo3":
        return patterns_to_mask(unpack_combo3(packed, n_weights // 4))
    if encoding == "combo5":
        return patterns_to_mask(unpack_combo5(packed, n_weights // 4))
    raise PackingError(f"unknown index encoding {encoding!r}; known: {INDEX_ENCODINGS}")
