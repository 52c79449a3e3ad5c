"""Per-tensor statistics of a change, streamed chunk by chunk with float64 accumulators.

Only tensors whose ids differ are read; the caller skips equal ids before asking.
The schema of the numbers is documented in docs/diff-json.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator

import numpy as np

from ..store.objects import DTYPES, Tensor

ChunkReader = Callable[[Iterable[str]], Iterator[bytes]]


def _e4m3_table() -> np.ndarray:
    """float8 e4m3fn (no infinities; 0x7f/0xff are NaN) as float64, by formula."""
    v = np.arange(256)
    sign = np.where(v & 0x80, -1.0, 1.0)
    exp = (v >> 3) & 0xF
    man = v & 0x7
    val = np.where(exp == 0, man / 8.0 * 2.0 ** -6, (1 + man / 8.0) * 2.0 ** (exp - 7.0))
    val = sign * val
    val[(v & 0x7F) == 0x7F] = np.nan
    return val


_TABLES: dict[str, np.ndarray] = {}


def to_float64(dtype: str, raw) -> np.ndarray:
    """Raw little-endian bytes of *dtype* as float64 values (bool and integers included)."""
    b = np.frombuffer(raw, dtype=np.uint8)
    if dtype == "BF16":
        return (b.view("<u2").astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    if dtype == "F8_E5M2":  # the top byte of a float16
        return (b.astype(np.uint16) << 8).view(np.float16).astype(np.float64)
    if dtype == "F8_E4M3":
        if "e4m3" not in _TABLES:
            _TABLES["e4m3"] = _e4m3_table()
        return _TABLES["e4m3"][b]
    if dtype == "F8_E8M0":
        out = np.exp2(b.astype(np.float64) - 127.0)
        out[b == 0xFF] = np.nan
        return out
    if dtype == "C64":  # magnitude of each complex element
        return np.abs(b.view("<c8")).astype(np.float64)
    np_dtype = {"BOOL": "u1", "U8": "u1", "I8": "i1", "U16": "<u2", "I16": "<i2", "F16": "<f2",
                "U32": "<u4", "I32": "<i4", "F32": "<f4", "U64": "<u8", "I64": "<i8", "F64": "<f8"}[dtype]
    return b.view(np_dtype).astype(np.float64)


def _changed_elements(dtype: str, a, b) -> int:
    """Elements whose bits differ (so -0.0 vs 0.0 and NaN payloads count, equal NaNs do not)."""
    size = DTYPES[dtype][0]
    view = {1: "u1", 2: "<u2", 4: "<u4", 8: "<u8"}[size]
    return int(np.count_nonzero(np.frombuffer(a, view) != np.frombuffer(b, view)))


def _one_side(dtype: str, chunks: Iterator[bytes]) -> dict:
    n = zeros = 0
    sq = 0.0
    for raw in chunks:
        x = to_float64(dtype, raw)
        n += x.size
        zeros += int(np.count_nonzero(x == 0))
        sq += float(np.dot(x, x))
    return {"numel": n, "sparsity": zeros / n if n else 0.0, "l2": math.sqrt(sq)}


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def tensor_stats(read: ChunkReader, old: Tensor | None, new: Tensor | None) -> dict:
    """Statistics of one changed tensor (see docs/diff-json.md for each field)."""
    if old is None or new is None:
        side = _one_side((new or old).dtype, read((new or old).chunks))
        key = "new" if new is not None else "old"
        return {"numel": side["numel"], f"sparsity_{key}": side["sparsity"], f"l2_{key}": side["l2"]}
    if (old.dtype, old.shape) != (new.dtype, new.shape) or old.chunk_size != new.chunk_size:
        a = _one_side(old.dtype, read(old.chunks))
        b = _one_side(new.dtype, read(new.chunks))
        return {"numel_old": a["numel"], "numel_new": b["numel"], "sparsity_old": a["sparsity"],
                "sparsity_new": b["sparsity"], "l2_old": a["l2"], "l2_new": b["l2"]}
    n = changed = zeros_a = zeros_b = 0
    sq_d = sq_a = sq_b = dot = 0.0
    max_abs = 0.0
    pairs = zip(read(old.chunks), read(new.chunks), strict=True)
    for raw_a, raw_b in pairs:
        a = to_float64(old.dtype, raw_a)
        b = to_float64(new.dtype, raw_b)
        n += a.size
        changed += _changed_elements(old.dtype, raw_a, raw_b)
        zeros_a += int(np.count_nonzero(a == 0))
        zeros_b += int(np.count_nonzero(b == 0))
        d = b - a
        sq_d += float(np.dot(d, d))
        sq_a += float(np.dot(a, a))
        sq_b += float(np.dot(b, b))
        dot += float(np.dot(a, b))
        if d.size and not np.isnan(d).all():
            max_abs = max(max_abs, float(np.nanmax(np.abs(d))))
    l2_a, l2_b, l2_d = math.sqrt(sq_a), math.sqrt(sq_b), math.sqrt(sq_d)
    return {
        "numel": n,
        "changed": changed,
        "changed_fraction": changed / n if n else 0.0,
        "sparsity_old": zeros_a / n if n else 0.0,
        "sparsity_new": zeros_b / n if n else 0.0,
        "l2_old": _finite(l2_a),
        "l2_new": _finite(l2_b),
        "l2_delta": _finite(l2_d),
        "rel_l2_delta": _finite(l2_d / l2_a) if l2_a else None,
        "max_abs_delta": _finite(max_abs),
        "cosine": _finite(dot / (l2_a * l2_b)) if l2_a and l2_b else None,
    }


def fill_stats(odb, changes, locations: dict | None = None, workers: int | None = None) -> None:
    """Set ``stats`` on every tensor change of *changes* (FileChange list). Chunks listed in
    *locations* are read from work-tree files, the rest from the store."""
    from ..pipeline import Materializer

    with Materializer(odb, workers=workers) as mat:
        mat.locations = locations or {}
        for fc in changes:
            for tc in fc.tensors:
                tc.stats = tensor_stats(mat.chunks, tc.old, tc.new)
