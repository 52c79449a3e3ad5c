"""Lossless chunk codecs: full encodings, and delta encodings against another chunk.

A stored value is ``[type u8][codec u8][payload]``. Full codecs:

* ``RAW`` (0): the bytes as they are.
* ``ZSTD`` (1): one zstd frame (with content size).
* ``PLANES`` (2): for floating-point elements of k bytes: each element is rotated
  left by one bit (the sign moves to bit 0, so the top byte is all exponent),
  then the bytes are split into k planes, top byte first. Each plane is zstd
  or raw: ``[k u8][raw_len u32][k x (plane codec u8, length u32)][payloads]``.

Delta codecs (chunks only; docs/format.md §5.1) start ``[base id 32][depth u8][k u8][float u8]``:
the chunk they are stored against, the length of the chain under them, and the element size
and kind they work in. Elements are unsigned integers of k bytes; for floats they are first
mapped to value order (negative: all bits flipped; positive: sign bit set), so that a small
change of value is a small difference, also across zero.

* ``DIFF`` (3): + a plane body of zigzag(new - base) (wrapping). A fine-tune moves each weight
  by a few units of its last place: the top planes are almost all zero, the low plane holds
  small numbers. Measured on a bf16 fine-tune: 0.44 of raw, where an XOR of the bits gives 0.52
  (a carry out of the mantissa flips exponent bits under XOR, not under subtraction).
* ``SPARSE`` (4): + ``[elements u32][mask codec u8][mask length u32][mask]`` + a plane body of
  the changed elements' new values: which elements differ (a little-endian bit mask, zstd or
  raw) and what they hold now. A prune (elements set to zero) costs about the mask.

Exponent planes compress to ~1/3; mantissa planes are nearly random and are stored raw unless
a probe shows they compress. Parameters were chosen by measurement, see docs/format.md.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Callable

import zstandard as zstd

from ..errors import CorruptObjectError
from . import kernels

RAW, ZSTD, PLANES, DIFF, SPARSE, PREDICT = 0, 1, 2, 3, 4, 5
DELTAS = (DIFF, SPARSE, PREDICT)
NAMES = {RAW: "raw", ZSTD: "zstd", PLANES: "planes", DIFF: "diff", SPARSE: "sparse", PREDICT: "predict"}
#: parent dtypes a PREDICT value can be computed from: code -> (element size, name)
PARENT_DTYPES = {0: (4, "F32"), 1: (2, "F16"), 2: (2, "BF16")}
MAX_CHUNK = 4 * 1024 * 1024  # no chunk decodes to more (pipeline.CHUNK_SIZE)
MAX_OBJECT = 256 * 1024 * 1024  # nor any object (metadata: a tree of many files)

_UINT = {2: "<u2", 4: "<u4", 8: "<u8"}  # numpy is imported on first use: `mvc status` never needs it
_PROBE = 64 * 1024
_DELTA_HEAD = 35  # base id, depth, element size, float flag
_tls = threading.local()

#: (base id (32 bytes), element size k) -> the base chunk's elements(); the final hash verifies the chain
BaseReader = Callable[[bytes, int], "object"]


def _ctx():
    c = getattr(_tls, "ctx", None)
    if c is None:
        # Exponent planes: short matches cost more than literals, so ask zstd for
        # long matches only and lean on its Huffman literal coder (measured: bf16
        # exponent plane 0.326 of raw vs 0.360 at the default level 1).
        fast = zstd.ZstdCompressor(
            compression_params=zstd.ZstdCompressionParameters(
                strategy=zstd.STRATEGY_FAST, window_log=17, hash_log=6, chain_log=6,
                search_log=1, min_match=7, target_length=0, write_content_size=True,
            )
        )
        general = zstd.ZstdCompressor(level=3)
        c = _tls.ctx = (fast, general, zstd.ZstdDecompressor())
    return c


def _delta_ctx():
    c = getattr(_tls, "delta", None)
    if c is None:
        c = _tls.delta = zstd.ZstdCompressor(level=1)
    return c


def _zstd_or_raw(cctx, data) -> tuple[int, bytes]:
    out = cctx.compress(data)
    if len(out) < len(data):
        return ZSTD, out
    return RAW, bytes(data)


def _entropy(cctx, data) -> bytes:
    """A zstd frame of *data* where only its byte statistics pay (an exponent plane, delta values):
    Huffman-coded literals from the C kernels (zstd's own coder without its match finder, which
    finds nothing here and costs as much: docs/format.md §5), else *cctx*."""
    out = kernels.huff(data)
    return cctx.compress(data) if out is None else out


def _entropy_or_raw(cctx, data) -> tuple[int, bytes]:
    out = _entropy(cctx, data)
    if len(out) < len(data):
        return ZSTD, out
    return RAW, bytes(data)


# -- planes ------------------------------------------------------------------------------------
def split(data, k: int):
    """Bytes of k-byte elements -> planes (k, n) uint8, top plane first, sign rotated into bit 0
    for k > 1. k = 1 gives the bytes themselves as one plane."""
    return kernels.split(elements(data, k), k, k > 1)


def merge(planes, k: int) -> memoryview:
    """The inverse of split: planes (k, n) -> the elements' bytes."""
    if k > 1 and kernels.native():  # into bytes of its own: no numpy (a checkout need not import it)
        out = bytearray(len(planes[0]) * k)
        kernels.merge(planes, k, True, out)
        return memoryview(out)
    return memoryview(kernels.merge(planes, k, k > 1)).cast("B")


#: plane codec of delta values only (format 2): the positions of the non-zero bytes (a bit mask)
#: and those bytes, each a zstd frame. A DIFF's top planes are ~95 % zeros: measured 0.059 of
#: the plane against 0.096 for zstd on the plane itself.
NONZERO = 2
#: plane codec of delta values only (format 4): the bytes' high nibbles, two to a byte, as a zstd
#: frame (or raw), then their low nibbles, two to a byte, raw. A DIFF's low plane is noise, 6.7
#: bits a byte: its low nibbles are near uniform, so this costs 0.822 of the plane where Huffman
#: coding the bytes costs 0.816, and decodes in half the time (docs/format.md §5.1).
NIBBLES = 3


def _plane_body(planes, k: int, nonzero: bool = False) -> bytes:
    return b"".join(_plane_parts(planes, k, nonzero))


def _plane_parts(planes, k: int, nonzero: bool = False) -> list:
    """``[k u8][raw_len u32][k x (codec u8, length u32)][payloads]``: the top plane with the
    exponent coder (_entropy), the others zstd where a probe shows they compress, else raw; with
    *nonzero* (delta values), each plane as _delta_plane chooses (delta planes are noise: no
    matches to find, measured the same size without them)."""
    fast, general, _ = _ctx()
    if nonzero:
        general = _delta_ctx()
    heads, bodies = [], []
    for i in range(k):
        plane = planes[i]
        if nonzero:
            codec, body = _delta_plane(plane, fast, general)
        elif i == 0:
            codec, body = _entropy_or_raw(fast, plane)
        else:
            probe = fast.compress(plane[:_PROBE])
            if len(probe) < 0.9 * min(_PROBE, len(plane)):
                codec, body = _zstd_or_raw(general, plane)
            else:
                codec, body = RAW, memoryview(plane)  # no copy: joined once into the stored value
        heads.append(struct.pack("<BI", codec, len(body)))
        bodies.extend(body.parts if isinstance(body, Joined) else (body,))
    return [struct.pack("<BI", k, k * len(planes[0])), *heads, *bodies]


def _delta_plane(plane, fast, general) -> tuple[int, bytes]:
    """(plane codec, body) of one plane of a delta value: NONZERO where at most a quarter of its
    bytes are non-zero (counted only where its first 64 KiB are at most half non-zero: a noise
    plane is not gathered for nothing), else whichever of Huffman-coded bytes and NIBBLES is
    smaller on a probe (within 1 %, NIBBLES: it decodes in half the time), or RAW where neither
    saves a tenth."""
    import numpy as np

    n = len(plane)
    sample = plane[:_PROBE]
    if np.count_nonzero(sample) <= len(sample) // 2:  # a plane mostly zeros starts so: count the rest
        mask, values = kernels.gather(plane, _zeros(n), 1)
        if values.size <= n // 4:
            return NONZERO, _nonzero_body(mask, values)
    m = min(_PROBE, n)
    coded = len(_entropy(fast, sample))
    split = len(_nibbles_body(sample, general))
    if min(coded, split) >= 0.9 * m:
        return RAW, memoryview(plane)
    if split <= 1.01 * coded:
        return NIBBLES, Joined(_nibbles_parts(plane, general))
    return _entropy_or_raw(general, plane)


def _nibbles_parts(plane, cctx) -> list:
    """NIBBLES: [hi codec u8][hi length u32][hi: zstd frame or raw][lo: raw], hi and lo each
    (n + 1) // 2 bytes (kernels.nibbles), as its parts (joined once, with the whole value)."""
    hi, lo = kernels.nibbles(plane)
    hcodec, hbody = _zstd_or_raw(cctx, hi)
    return [struct.pack("<BI", hcodec, len(hbody)), hbody, lo]


def _nibbles_body(plane, cctx) -> bytes:
    return b"".join(_nibbles_parts(plane, cctx))


def _read_nibbles(chunk, n: int):
    hcodec, hlen = struct.unpack_from("<BI", chunk, 0)
    m = (n + 1) // 2
    if hcodec not in (RAW, ZSTD) or 5 + hlen > len(chunk) or len(chunk) - 5 - hlen != m:
        raise ValueError("bad nibbles plane")
    hbody = chunk[5:5 + hlen]
    hi = hbody if hcodec == RAW else _inflate(hbody, m)
    if len(hi) != m:
        raise ValueError("bad nibbles plane")
    return kernels.unnibbles(hi, chunk[5 + hlen:], n)


def _nonzero_body(mask, values) -> bytes:
    """NONZERO: [mask length u32][mask: zstd frame of the little-endian bit mask][zstd frame of the
    non-zero bytes in order] (*mask*, *values*: kernels.gather of the plane against zeros)."""
    fast = _ctx()[0]
    m = _entropy(fast, mask)
    return struct.pack("<I", len(m)) + m + _entropy(fast, values)


def _zeros(n: int):
    import numpy as np

    z = getattr(_tls, "zeros", None)
    if z is None or z.size < n:
        z = _tls.zeros = np.zeros(max(n, 1 << 22), dtype=np.uint8)
    return z[:n]


def _read_nonzero(chunk, n: int):
    import numpy as np

    (mlen,) = struct.unpack_from("<I", chunk, 0)
    if 4 + mlen > len(chunk):
        raise ValueError("bad non-zero plane")
    mask = np.frombuffer(_inflate(chunk[4:4 + mlen], (n + 7) // 8), np.uint8)
    if mask.size != (n + 7) // 8:
        raise ValueError("bad non-zero plane mask")
    values = np.frombuffer(_inflate(chunk[4 + mlen:], n), np.uint8)
    return kernels.scatter(_zeros(n), mask, values, 1)


def _read_plane_body(body: memoryview, limit: int, nonzero: bool = False, arrays: bool = True):
    """(k, planes: a list of k uint8 arrays of n bytes, or with *arrays* false memoryviews) from a
    plane body; at most *limit* bytes in all; *nonzero*: the body of a delta value, where NONZERO
    planes may appear. Raw planes are views of *body* and decoded ones what zstd returned:
    nothing is copied."""
    if arrays:
        import numpy as np

    k, total = struct.unpack_from("<BI", body, 0)
    if k not in (1, *_UINT) or total % k or total > limit:
        raise ValueError("bad plane header")
    n = total // k
    pos = 5 + 5 * k
    heads = [struct.unpack_from("<BI", body, 5 + 5 * j) for j in range(k)]
    planes = []
    for codec, length in heads:
        chunk = body[pos:pos + length]
        pos += length
        if codec == RAW:
            raw = chunk
        elif codec == ZSTD:
            raw = _inflate(chunk, n) if n else b""
        elif codec == NONZERO and nonzero:
            raw = _read_nonzero(chunk, n)
        elif codec == NIBBLES and nonzero:
            raw = _read_nibbles(chunk, n)
        else:
            raise ValueError(f"bad plane codec {codec}")
        if len(raw) != n:
            raise ValueError("plane length mismatch")
        planes.append(np.frombuffer(raw, dtype=np.uint8) if arrays else memoryview(raw))
    if pos != len(body):
        raise ValueError("trailing bytes")
    return k, planes


# -- full encodings ----------------------------------------------------------------------------
class Joined:
    """A stored value kept as the buffers it is made of (encode(..., joined=True)): a pack write
    hands them to the kernel as they are (one pwritev), sparing a copy of the chunk; anywhere else
    bytes() joins them. len() is the value's length in bytes."""

    __slots__ = ("parts", "nbytes")

    def __init__(self, parts: list):
        self.parts = parts
        self.nbytes = sum(memoryview(p).nbytes for p in parts)

    def __len__(self) -> int:
        return self.nbytes

    def __bytes__(self) -> bytes:
        return b"".join(self.parts)


RAW_BELOW = 128  # values shorter than this are stored raw
_PLANES_FROM = 1024  # float chunks from this size are split into planes (below: one zstd call, or raw)


def encode(type_code: int, data: bytes | bytearray | memoryview, float_size: int = 0, joined: bool = False):
    """Encode *data* for storage (bytes; with *joined*, a planes value may come as a Joined).
    *float_size* is the element size of a floating dtype (2, 4, 8) or 0."""
    n = len(data)
    if n < RAW_BELOW:  # nothing to gain that pays for a coder's call (100,000 tiny tensors: measured)
        return bytes((type_code, RAW)) + bytes(data)
    if float_size in _UINT and n >= _PLANES_FROM and n % float_size == 0:
        parts = [bytes((type_code, PLANES)), *_plane_parts(split(data, float_size), float_size)]
        return Joined(parts) if joined else b"".join(parts)
    # metadata (type code > 0: JSON full of hex ids, which have no long matches) at zstd's level
    # 1: a 100,000-tensor file object of 8.4 MB codes to 3.57 MB in 34 ms there, 3.92 MB in 78 ms
    # at level 3, which stays for the chunks of plain files
    codec, payload = _zstd_or_raw(_ctx()[1] if type_code == 0 else _delta_ctx(), data)
    return bytes((type_code, codec)) + payload


# -- delta encodings ---------------------------------------------------------------------------
def elements(data, k: int):
    """The chunk's bytes as unsigned integers of k bytes (a read-only view where possible)."""
    import numpy as np

    return np.frombuffer(data, dtype=np.uint8 if k == 1 else _UINT[k])


def encode_diff(type_code: int, new, base, k: int, is_float: bool, base_id: bytes, depth: int) -> bytes:
    """DIFF: the difference from the base chunk, element by element (new, base: elements())."""
    planes = kernels.diff(new, base, k, is_float)
    return b"".join([bytes((type_code, DIFF)), base_id, bytes((depth, k, int(is_float))),
                     *_plane_parts(planes, k, True)])


def encode_sparse(type_code: int, new, base, k: int, is_float: bool, base_id: bytes, depth: int) -> bytes:
    """SPARSE: the elements that changed and their new values."""
    mask_bits, values = kernels.gather(new, base, k)
    mcodec, mbody = _zstd_or_raw(_ctx()[1], mask_bits)
    planes = kernels.split(values, k, is_float and k > 1)
    return b"".join([bytes((type_code, SPARSE)), base_id, bytes((depth, k, int(is_float))),
                     struct.pack("<IBI", new.size, mcodec, len(mbody)), mbody, *_plane_parts(planes, k, True)])


def delta_base(stored) -> tuple[bytes, int] | None:
    """(base id, chain depth) of a delta-coded stored value; None for a full one."""
    if len(stored) >= 2 + _DELTA_HEAD and stored[1] in DELTAS:
        return bytes(stored[2:34]), stored[34]
    return None


def links(stored) -> list[bytes]:
    """Every chunk a delta-coded value is computed from (empty for a full encoding)."""
    first = delta_base(stored)
    if first is None:
        return []
    if stored[1] != PREDICT or len(stored) < 38:
        return [first[0]]
    extra = min(stored[37], (len(stored) - 38) // 32)  # a damaged value names no more than it holds
    return [first[0]] + [bytes(stored[38 + 32 * i:70 + 32 * i]) for i in range(extra)]


def delta_k(stored) -> tuple[int, bool]:
    """(element size, floating point?) that a delta-coded value works in."""
    return stored[35], bool(stored[36])


def depth(stored) -> int:
    """How many deltas must be applied to decode this value (0: a full encoding)."""
    d = delta_base(stored)
    return 0 if d is None else d[1]


def to_f32(el, pdtype: int):
    """Parent elements (bits of F32, F16 or BF16) as float32."""
    import numpy as np

    if pdtype == 2:  # bf16 bits are the top half of the float32
        return (el.astype(np.uint32) << 16).view(np.float32)
    if pdtype == 1:
        return el.view(np.float16).astype(np.float32)
    return el.view(np.float32)


def predict_rtn8(parent, scales, cols: int, col0: int):
    """Per-row symmetric round-to-nearest int8 codes of *parent* (float32 elements that start at
    column *col0* of a row of *cols*) with *scales* (float32, one per row from that row on):
    clip(rint(x / scale), -127, 127), as mvc's rtn-int8 and the usual int8 recipes compute them."""
    import numpy as np

    q = np.empty(parent.size, dtype=np.float32)
    head = min(parent.size, (cols - col0) % cols)  # the rest of a row begun in an earlier chunk
    whole = (parent.size - head) // cols
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):  # inf and NaN are clipped below
        np.divide(parent[:head], scales[:1], out=q[:head])
        r0 = 1 if head else 0
        mid = slice(head, head + whole * cols)
        np.divide(parent[mid].reshape(whole, cols), scales[r0:r0 + whole, None],
                  out=q[mid].reshape(whole, cols))
        tail = slice(head + whole * cols, parent.size)
        np.divide(parent[tail], scales[r0 + whole:r0 + whole + 1], out=q[tail])
    np.rint(q, out=q)
    np.nan_to_num(q, copy=False, nan=0.0)  # the same codes on every machine, whatever the floats hold
    np.clip(q, -127, 127, out=q)
    return q.astype(np.int8).view(np.uint8)


def encode_predict(type_code: int, new, parent, pdtype: int, bases: list[bytes], skip: int, cols: int, col0: int,
                   scales, depth: int) -> bytes:
    """PREDICT: int8 codes as their difference from the codes predicted from the parent's floats
    (*parent*: their elements, from the chunks *bases*, from element *skip* of the first) and the
    stored per-row scales."""
    import numpy as np

    scales = np.ascontiguousarray(scales, dtype="<f4")
    pred = kernels.rtn8(parent, pdtype, scales, cols, col0)
    planes = kernels.diff(new, pred, 1, False)
    head = bytes((type_code, PREDICT)) + bases[0] + bytes((depth, 1, 0, len(bases) - 1)) + b"".join(bases[1:])
    return (head + struct.pack("<BIIII", pdtype, skip, cols, col0, scales.size) + scales.tobytes()
            + _plane_body(planes, 1, True))


def _decode_predict(stored, bases: BaseReader):
    import numpy as np

    ids = links(stored)
    pos = 38 + 32 * (len(ids) - 1)
    pdtype, skip, cols, col0, nscale = struct.unpack_from("<BIIII", stored, pos)
    pos += 17
    if pdtype not in PARENT_DTYPES or cols == 0 or nscale * 4 > MAX_CHUNK:
        raise ValueError("bad predict header")
    scales = np.frombuffer(stored[pos:pos + 4 * nscale], dtype="<f4")
    pos += 4 * nscale
    k, planes = _read_plane_body(memoryview(stored)[pos:], MAX_CHUNK, True)
    n = planes[0].size
    if k != 1 or len(scales) != nscale or (col0 + n - 1) // cols >= nscale:
        raise ValueError("predict delta does not fit its scales")
    psize = PARENT_DTYPES[pdtype][0]
    parent = np.concatenate([bases(b, psize) for b in ids])[skip:skip + n]
    if parent.size != n:
        raise ValueError("predict delta does not fit its parent")
    pred = kernels.rtn8(parent, pdtype, scales, cols, col0)
    return kernels.undiff(planes, pred, 1, False)


# -- decoding ----------------------------------------------------------------------------------
def decode(stored: bytes | memoryview, oid_hex: str = "?", bases: BaseReader | None = None
           ) -> tuple[int, bytes | memoryview]:
    """Return (type code, decoded bytes; a read-only buffer). Raises CorruptObjectError on malformed
    input. Delta codecs need *bases* (base id, k -> the base's elements()) to reach their base."""
    try:
        type_code, codec = stored[0], stored[1]
        body = memoryview(stored)[2:]
        if codec == RAW:
            if len(body) > MAX_OBJECT:
                raise ValueError("raw value over the object size limit")
            return type_code, bytes(body)
        if codec == ZSTD:
            return type_code, _ctx()[2].decompress(body, max_output_size=_frame_bound(body))
        if codec == PLANES:
            k, planes = _read_plane_body(body, MAX_CHUNK, arrays=False)
            return type_code, merge(planes, k)
        if codec in DELTAS:
            k = stored[35]
            return type_code, memoryview(decode_elements(stored, bases, k)).cast("B")
    except (zstd.ZstdError, struct.error, ValueError, IndexError, TypeError) as e:
        raise CorruptObjectError(oid_hex, f"cannot decode ({e})") from e
    raise CorruptObjectError(oid_hex, f"unknown codec {codec}")


#: elements merged at a time by decode_slices: a slice and its planes (and those of a chain of
#: DIFFs on it) stay in the CPU's second-level cache. Measured on the 512 MiB benchmark history
#: (docs/benchmarks.md), 64 Ki against 256 Ki elements: its first version checks out in
#: 0.35-0.40 against 0.32-0.34 s, its last in 0.50-0.52 against 0.46-0.48 s.
_SLICE = 256 * 1024


class NibbleDiff:
    """A DIFF of two-byte elements whose top plane is NONZERO and low plane NIBBLES (a fine-tune's,
    a merge's), kept as those planes' parts: the bit mask, the non-zero bytes (*count* of them,
    then 16 zeros: kernels.undiff_parts loads 16 at a time), the high and the low nibble bytes,
    which kernels.undiff_parts applies without making the planes."""

    __slots__ = ("n", "mask", "values", "count", "hi", "lo")

    def __init__(self, n: int, mask: bytes, values: bytes, hi: bytes, lo: bytes):
        self.n, self.mask, self.count, self.hi, self.lo = n, mask, len(values), hi, lo
        self.values = values + bytes(16)

    def apply(self, out, start: int, used: int, is_float: bool, base_planes=()) -> int:
        """kernels.undiff_parts of this level on *out* (elements from *start*; *used* values before)."""
        return kernels.undiff_parts(out, start, self.mask, self.values, self.count, used, self.hi, self.lo, is_float,
                                    *base_planes)


def _nibble_diff(body, lasting: bool = False) -> NibbleDiff | None:
    """The parts of a two-plane body coded NONZERO then NIBBLES (None: coded otherwise), each a
    buffer of its own, but for the low nibbles, a view of *body* where it is *lasting* (it stays
    valid while the view lives); ValueError (or zstd's, struct's) where they do not fit."""
    k, total = struct.unpack_from("<BI", body, 0)
    if k != 2 or total % 2 or total > MAX_CHUNK:
        return None
    (c0, l0), (c1, l1) = struct.unpack_from("<BI", body, 5), struct.unpack_from("<BI", body, 10)
    if (c0, c1) != (NONZERO, NIBBLES):
        return None
    n, pos = total // 2, 15
    if pos + l0 + l1 != len(body):
        raise ValueError("trailing bytes")
    nz, nb = body[pos:pos + l0], body[pos + l0:pos + l0 + l1]
    (mlen,) = struct.unpack_from("<I", nz, 0)
    if 4 + mlen > len(nz):
        raise ValueError("bad non-zero plane")
    mask = _inflate(nz[4:4 + mlen], (n + 7) // 8)
    values = _inflate(nz[4 + mlen:], n)
    if len(mask) != (n + 7) // 8:
        raise ValueError("bad non-zero plane mask")
    hcodec, hlen = struct.unpack_from("<BI", nb, 0)
    m = (n + 1) // 2
    if hcodec not in (RAW, ZSTD) or 5 + hlen > len(nb) or len(nb) - 5 - hlen != m:
        raise ValueError("bad nibbles plane")
    hbody = nb[5:5 + hlen]
    hi = bytes(hbody) if hcodec == RAW else _inflate(hbody, m)
    if len(hi) != m:
        raise ValueError("bad nibbles plane")
    lo = nb[5 + hlen:]
    return NibbleDiff(n, mask, values, hi, lo if lasting else bytes(lo))


def diff_level(stored, oid_hex: str = "?", lasting: bool = False):
    """A DIFF value's (base id, element size k, float?, its k planes as arrays of their own, not
    views of *stored*, or a NibbleDiff where undiff_parts runs, which may view *stored* where it
    is *lasting*: Backend.lasting), for decode_slices; None for any other codec or without the C
    kernels. Raises CorruptObjectError on malformed input."""
    if len(stored) < 2 + _DELTA_HEAD or stored[1] != DIFF or not kernels.native():
        return None
    body = memoryview(stored)[2:]
    k, is_float = body[33], body[34]
    try:
        if k not in (1, *_UINT) or is_float > 1:
            raise ValueError("delta element size does not fit")
        parts = _nibble_diff(body[35:], lasting) if k == 2 and kernels.undiff_parts_ready() else None
        if parts is not None:
            return bytes(body[:32]), k, bool(is_float), parts
        pk, planes = _read_plane_body(body[35:], MAX_CHUNK, True)
        if pk != k:
            raise ValueError("delta element size does not fit")
    except (zstd.ZstdError, struct.error, ValueError, IndexError, TypeError) as e:
        raise CorruptObjectError(oid_hex, f"cannot decode ({e})") from e
    import numpy as np

    own = [np.array(p) if isinstance(p.base, memoryview) else p for p in planes]  # raw planes are views
    return bytes(body[:32]), k, bool(is_float), own


def decode_slices(stored, oid_hex: str = "?", levels: list = ()):
    """A PLANES value decoded a slice at a time: (its decoded length, an iterator of the slices),
    each slice a view of one buffer that the next overwrites; None for any other codec, for
    *levels* that do not fit it, or without the C kernels. The planes are decoded first (zstd, or
    views of *stored*); merging a slice, then hashing and writing it while it is in the cache
    spares three trips through memory per chunk (checkout). *levels*: DIFF values stored on this
    one (diff_level's tuples, the top of the chain first), applied to each slice in turn, so a
    chain of differences is decoded in the cache too. Raises CorruptObjectError on malformed
    input, also while iterating."""
    if len(stored) < 2 or stored[1] != PLANES or not kernels.native():
        return None
    try:  # memoryviews, not arrays: checking out a bf16 model imports no numpy (70-100 ms)
        k, planes = _read_plane_body(memoryview(stored)[2:], MAX_CHUNK, arrays=False)
    except (zstd.ZstdError, struct.error, ValueError, IndexError, TypeError) as e:
        raise CorruptObjectError(oid_hex, f"cannot decode ({e})") from e
    n = len(planes[0])
    if any(lk != k or (lp.n if isinstance(lp, NibbleDiff) else len(lp[0])) != n for _, lk, _, lp in levels):
        return None
    step = min(_SLICE, n)
    below = list(reversed(levels))

    def slices():
        buf = memoryview(bytearray(step * k))
        used = [0] * len(below)  # NibbleDiff levels: their values used so far
        # the first difference, from a NibbleDiff, merges this value's planes itself (one pass)
        merged = bool(below) and isinstance(below[0][3], NibbleDiff)
        for i in range(0, n, step):
            part = [p[i:i + step] for p in planes]
            out = buf[:len(part[0]) * k]
            if not merged:
                kernels.merge(part, k, k > 1, out)
            for j, (_, _, is_float, lp) in enumerate(below):  # in place: each element read before written
                if isinstance(lp, NibbleDiff):
                    try:
                        used[j] = lp.apply(out, i, used[j], is_float, part if j == 0 and merged else ())
                    except ValueError as e:
                        raise CorruptObjectError(oid_hex, f"cannot decode a delta on it ({e})") from e
                else:
                    kernels.undiff([p[i:i + step] for p in lp], out, k, is_float, out)
            yield out
        if any(isinstance(lp, NibbleDiff) and used[j] != lp.count for j, (*_, lp) in enumerate(below)):
            raise CorruptObjectError(oid_hex, "a delta on it has non-zero bytes its mask does not place")

    return n * k, slices()


def _inflate(frame, limit: int) -> bytes:
    """A zstd frame of a delta or plane decoded to at most *limit* bytes: a frame that declares
    more is refused before anything is allocated (python-zstandard allocates what a frame
    declares, whatever max_output_size says)."""
    size = zstd.frame_content_size(frame)
    if size > limit:
        raise ValueError(f"zstd frame declares {size} bytes where at most {limit} fit")
    return _ctx()[2].decompress(frame, max_output_size=max(limit, 1))


def _frame_bound(body) -> int:
    """The decoded size a zstd frame may have: what it declares, at most 256 MiB (metadata objects
    may be larger than a chunk)."""
    size = zstd.frame_content_size(body)
    if size < 0:
        raise ValueError("zstd frame without a content size")
    if size > MAX_OBJECT:
        raise ValueError(f"zstd frame declares {size} bytes")
    return max(size, 1)


def decode_elements(stored, bases: BaseReader | None, k: int):
    """A chunk's stored value as elements() of k bytes; deltas are applied to their base's elements."""
    import numpy as np

    codec = stored[1]
    if codec not in DELTAS:
        _, data = decode(stored)
        if len(data) % k:
            raise ValueError("chunk is not a whole number of elements")
        return elements(data, k)
    if bases is None:
        raise ValueError("a delta-coded value needs its base")
    if codec == PREDICT:
        if k != 1:
            raise ValueError("delta element size does not fit")
        return _decode_predict(stored, bases)
    body = memoryview(stored)[2:]
    base = bytes(body[:32])
    kk, is_float = body[33], bool(body[34])
    if kk != k or kk not in (1, *_UINT) or body[34] > 1:
        raise ValueError("delta element size does not fit")
    base_el = bases(base, k)
    if codec == DIFF:
        parts = _nibble_diff(body[35:]) if k == 2 and kernels.undiff_parts_ready() else None
        if parts is not None:  # applied from its parts (kernels.undiff_parts), onto a copy of the base
            if parts.n != base_el.size:
                raise ValueError("delta and base differ in size")
            out = np.array(base_el)
            if parts.apply(out, 0, 0, is_float) != parts.count:
                raise ValueError("non-zero bytes the mask does not place")
            return out
        pk, planes = _read_plane_body(body[35:], MAX_CHUNK, True)
        if pk != k or planes[0].size != base_el.size:
            raise ValueError("delta and base differ in size")
        return kernels.undiff(planes, base_el, k, is_float)
    n, mcodec, mlen = struct.unpack_from("<IBI", body, 35)
    pos = 44
    mbody = body[pos:pos + mlen]
    pos += mlen
    if n != base_el.size or len(mbody) != mlen:
        raise ValueError("sparse delta does not fit its base")
    mask = mbody if mcodec == RAW else _inflate(mbody, (n + 7) // 8)
    if len(mask) != (n + 7) // 8:
        raise ValueError("bad sparse mask")
    vk, planes = _read_plane_body(body[pos:], MAX_CHUNK, True)
    if vk != k:
        raise ValueError("sparse values do not fit the mask")
    values = kernels.merge(planes, k, is_float and k > 1)
    return kernels.scatter(base_el, np.frombuffer(mask, np.uint8), values, k)
