"""The plane and delta transforms, in C when the extension was built (mvc/store/_kernels.c), else
in numpy: both give the same bytes (tests/test_kernels.py). ``use_native(False)`` forces numpy."""

from __future__ import annotations

try:
    from . import _kernels as _native
except ImportError:  # no compiler at install time: numpy does the same, slower
    _native = None

_UINT = {1: "<u1", 2: "<u2", 4: "<u4", 8: "<u8"}
_on = _native is not None


def native() -> bool:
    """Whether the C kernels are in use."""
    return _on


def use_native(on: bool) -> bool:
    """Turn the C kernels on or off (when built); returns whether they are now in use."""
    global _on
    _on = bool(on) and _native is not None
    return _on


def huff(data) -> bytes | None:
    """*data* (a contiguous buffer) as one zstd frame of Huffman-coded literal blocks and no
    sequences (_kernels.c), or None: the C kernels are off, or the data has fewer than two byte
    values or is under 1 KiB (or, with byte values above 128, its FSE-coded code weights would not
    fit 127 bytes); then zstd itself codes it. There is no numpy
    version: without the C kernels zstd codes everything (other bytes, the same values decoded)."""
    return _native.huff(data) if _on else None


def tiny_run(*args) -> int:
    """The per-tensor work of ingesting a run of tiny tensors (pipeline.Ingestor._tiny_run; the
    arguments are documented in _kernels.c). Only with the C kernels (pipeline.py does the same a
    tensor at a time otherwise; tests/test_kernels.py compares the two)."""
    return _native.tiny_run(*args)


def safetensors_header(raw, data_size: int, sizes: dict, entry_type):
    """(entries sorted by offsets, metadata) of a plain, valid safetensors header *raw*, or None:
    the C kernels are off, or the header is anything else (escapes, other keys, an error); then
    formats/safetensors.py parses and checks it in Python (_kernels.c says exactly what "plain" is)."""
    return _native.safetensors_header(raw, data_size, sizes, entry_type) if _on else None


def file_object(content):
    """(chunks, size, tensors) of a safetensors file object's canonical JSON in the common form
    (_kernels.c), or None: the C kernels are off, or objects.parse_object must decide."""
    return _native.file_object(content) if _on else None


def file_json(chunks: tuple, size: int, tensors: tuple) -> bytes | None:
    """A safetensors file object's canonical JSON, exactly objects.canonical_json's bytes, or None:
    the C kernels are off, or a name needs an escape (then json writes it)."""
    return _native.file_json(chunks, size, tensors) if _on else None


def verified_raw(hasher, kind: str, type_code: int, oids: list, values: list, head: bytes | None = None):
    """For each stored value of *oids*: its content where it is stored raw and hashes to its id,
    else None (decode it the general way); with *head*, (chunk id, rest) of a tiny tensor's JSON
    that begins with *head* (_kernels.c). None in place of the list without the C kernels."""
    return _native.verified_raw(hasher, kind, type_code, oids, values, head) if _on else None


#: merge strategies the C kernel computes for bf16 (others: numpy, mvc/merge/engine.py)
MERGE3_MODES = {None: 0, "average": 1, "task-arithmetic": 2}


def merge3_bf16(b, o, t, strategy: str | None, weights: tuple[float, float]):
    """(merged elements, conflicts) of a three-way merge of bf16 elements (uint16 arrays), or None
    where the C kernels are off or *strategy* is not one they compute: the same bytes as the numpy
    path of merge/engine.py (tests/test_kernels.py compares them)."""
    import numpy as np

    if not _on or strategy not in MERGE3_MODES:
        return None
    out = np.empty_like(o)
    w1, w2 = weights
    n = _native.merge3_bf16(b, o, t, out, MERGE3_MODES[strategy], w1, w2, w1 + w2)
    return out, n


def split(u, k: int, rotate: bool):
    """Unsigned k-byte integers -> planes (k, n) uint8, top byte first; *rotate*: sign into bit 0."""
    import numpy as np

    if k == 1:
        return np.ascontiguousarray(u).reshape(1, -1)
    if _on:
        out = np.empty((k, u.size), dtype=np.uint8)
        _native.split(np.ascontiguousarray(u), out, k, rotate)
        return out
    if rotate:
        r = u << 1
        r |= u >> (8 * k - 1)
        u = r
    planes = np.empty((k, u.size), dtype=np.uint8)
    for j in range(k):
        planes[j] = u >> (8 * (k - 1 - j)) if j < k - 1 else u
    return planes


def merge(planes, k: int, rotate: bool, out=None):
    """The inverse of split: planes (k, n) -> unsigned k-byte integers. *planes* may also be a
    sequence of k separate uint8 arrays of n bytes (what a decoder read, not copied together).
    *out*: an array of n such integers (or a writable buffer of their bytes) to write them into
    (and return) instead of a new one."""
    if k > 1 and _on:
        if out is None:
            import numpy as np

            out = np.empty(len(planes[0]), dtype=_UINT[k])
        _native.merge(planes, out, k, rotate)
        return out
    merged = _merge_numpy(planes, k, rotate)
    if out is None:
        return merged
    out[:] = merged
    return out


def _merge_numpy(planes, k: int, rotate: bool):
    import numpy as np

    planes = [np.frombuffer(p, np.uint8) for p in planes]  # arrays or any buffers
    if k == 1:
        return np.ascontiguousarray(planes[0])
    r = planes[0].astype(_UINT[k])
    for j in range(1, k):
        r <<= 8
        r |= planes[j]
    if rotate:
        out = r >> 1
        out |= r << (8 * k - 1)
        return out
    return r


def _order(u, k: int):
    """Float bits -> unsigned integers in value order (negative: all bits flipped; else sign bit set)."""
    import numpy as np

    top = np.array(1 << (8 * k - 1), dtype=u.dtype)
    s = (u.view(f"<i{k}") >> (8 * k - 1)).view(u.dtype)  # all ones where negative
    s |= top
    s ^= u
    return s


def _unorder(m, k: int):
    import numpy as np

    top = np.array(1 << (8 * k - 1), dtype=m.dtype)
    s = ((~m).view(f"<i{k}") >> (8 * k - 1)).view(m.dtype)  # all ones where the sign bit is clear
    s |= top
    s ^= m
    return s


def diff(new, base, k: int, is_float: bool):
    """Planes (k, n) of zigzag(order(new) - order(base)), in wrapping k-byte arithmetic."""
    import numpy as np

    if _on:
        out = np.empty((k, new.size), dtype=np.uint8)
        _native.diff(np.ascontiguousarray(new), np.ascontiguousarray(base), out, k, is_float)
        return out
    if is_float:
        new, base = _order(new, k), _order(base, k)
    d = (new - base).view(np.int8 if k == 1 else f"<i{k}")
    return split(((d << 1) ^ (d >> (8 * k - 1))).view(new.dtype), k, False)


def undiff(planes, base, k: int, is_float: bool, out=None):
    """The inverse of diff, given the base: unsigned k-byte integers (*planes* as for merge).
    *out*: an array to write them into (and return); it may be *base* itself."""
    import numpy as np

    if _on:
        if out is None:
            out = np.empty(base.size, dtype=_UINT[k])
        _native.undiff(planes, np.ascontiguousarray(base), out, k, is_float)
        return out
    zz = merge(planes, k, False)
    one = np.array(1, dtype=zz.dtype)
    d = (zz >> one) ^ (np.array(0, dtype=zz.dtype) - (zz & one))
    new = base + d if not is_float else _unorder(_order(base, k) + d, k)
    if out is None:
        return new
    out[:] = new
    return out


def nibbles(plane):
    """(hi, lo) of a uint8 *plane*, in pairs of bytes (the last paired with 0 when odd): hi holds
    their high nibbles (the first's in the low half), lo their low nibbles (the same order)."""
    import numpy as np

    m = (plane.size + 1) // 2
    hi, lo = np.empty(m, np.uint8), np.empty(m, np.uint8)
    if _on:
        _native.nibbles(np.ascontiguousarray(plane), hi, lo)
        return hi, lo
    padded = np.zeros(2 * m, np.uint8)
    padded[:plane.size] = plane
    a, b = padded[0::2], padded[1::2]
    hi[:] = (a >> 4) | (b & 0xF0)
    lo[:] = (a & 0x0F) | (b << 4)
    return hi, lo


def unnibbles(hi, lo, n: int):
    """The inverse of nibbles: a uint8 array of *n* bytes."""
    import numpy as np

    out = np.empty(n, np.uint8)
    if _on:
        _native.unnibbles(hi, lo, out)
        return out
    hi, lo = np.frombuffer(hi, np.uint8), np.frombuffer(lo, np.uint8)
    if hi.size != (n + 1) // 2 or lo.size != hi.size:
        raise ValueError("unnibbles: hi and lo must hold (n + 1) // 2 bytes")
    pair = np.empty(2 * hi.size, np.uint8)
    pair[0::2] = (hi << 4) | (lo & 0x0F)
    pair[1::2] = (hi & 0xF0) | (lo >> 4)
    out[:] = pair[:n]
    return out


def gather(new, base, k: int):
    """(little-endian bit mask of the elements where *new* differs from *base*, those elements)."""
    import numpy as np

    if _on:
        mask = np.zeros((new.size + 7) // 8, dtype=np.uint8)
        values = np.empty_like(new)
        m = _native.gather(np.ascontiguousarray(new), np.ascontiguousarray(base), mask, values, k)
        return mask, values[:m]
    changed = new != base
    return np.packbits(changed, bitorder="little"), new[changed]


def scatter(base, mask, values, k: int):
    """*base* with the elements the bit *mask* marks replaced by *values*, in order."""
    import numpy as np

    if _on:
        out = np.empty_like(base)
        _native.scatter(np.ascontiguousarray(base), np.ascontiguousarray(mask), np.ascontiguousarray(values), out, k)
        return out
    changed = np.unpackbits(mask, count=base.size, bitorder="little").astype(bool)
    if values.size != int(np.count_nonzero(changed)):
        raise ValueError("sparse values do not fit the mask")
    out = base.copy()
    out[changed] = values
    return out


def rtn8(parent, pdtype: int, scales, cols: int, col0: int):
    """The int8 codes (as uint8) that per-row round-to-nearest gives *parent* (elements: bits of
    F32, F16 or BF16, *pdtype* 0, 1, 2; codec.PARENT_DTYPES), see codec.predict_rtn8."""
    import numpy as np

    from . import codec

    if _on:
        out = np.empty(parent.size, dtype=np.uint8)
        _native.rtn8(np.ascontiguousarray(parent), pdtype, np.ascontiguousarray(scales, dtype="<f4"), cols, col0,
                     out)
        return out
    return codec.predict_rtn8(codec.to_f32(parent, pdtype), scales, cols, col0)


def undiff_parts_ready() -> bool:
    """Whether undiff_parts runs here (the C kernels, on an x86-64 CPU with SSSE3)."""
    return _on and hasattr(_native, "undiff_parts") and _native.undiff_parts_ready()


def undiff_parts(out, start: int, mask, values, count: int, voff: int, hi, lo, is_float: bool, base_hi=None,
                 base_lo=None) -> int:
    """One DIFF level of two-byte elements whose top plane is NONZERO (*mask*, and *count*
    non-zero bytes in *values*, which holds 16 bytes more) and low plane NIBBLES (*hi*, *lo*),
    applied to *out* (the chunk's elements from *start*, a multiple of 16): in place, or onto the
    base given as the (rotated) planes *base_hi*, *base_lo* of those elements, merged as it goes.
    *voff* values are used before *start*. Returns the values used by the end of *out*. Only where
    undiff_parts_ready(): the same as undiff of the planes scatter and unnibbles make
    (tests/test_kernels.py)."""
    base = () if base_hi is None else (base_hi, base_lo)
    return _native.undiff_parts(out, start, mask, values, count, voff, hi, lo, is_float, *base)
