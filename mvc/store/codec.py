"""Lossless chunk codecs.

A stored value is ``[type u8][codec u8][payload]``. Codecs:

* ``RAW`` (0): the bytes as they are.
* ``ZSTD`` (1): one zstd frame (with content size).
* ``PLANES`` (2): for floating-point elements of k bytes: each element is rotated
  left by one bit (the sign moves to bit 0, so the top byte is all exponent),
  then the bytes are split into k planes, top byte first. Each plane is zstd
  or raw: ``[k u8][raw_len u32][k x (plane codec u8, length u32)][payloads]``.

Exponent planes compress to ~1/3; mantissa planes are nearly random and are
stored raw unless a probe shows they compress (pruned tensors: runs of zeros).
Parameters were chosen by measurement, see docs/format.md.
"""

from __future__ import annotations

import struct
import threading

import zstandard as zstd

from ..errors import CorruptObjectError

RAW, ZSTD, PLANES = 0, 1, 2

_UINT = {2: "<u2", 4: "<u4", 8: "<u8"}  # numpy is imported on first use: `mvc status` never needs it
_PROBE = 64 * 1024
_tls = threading.local()


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


def _zstd_or_raw(cctx, data) -> tuple[int, bytes]:
    out = cctx.compress(data)
    if len(out) < len(data):
        return ZSTD, out
    return RAW, bytes(data)


def encode(type_code: int, data: bytes | bytearray | memoryview, float_size: int = 0) -> bytes:
    """Encode *data* for storage. *float_size* is the element size of a floating dtype (2, 4, 8) or 0."""
    n = len(data)
    if float_size in _UINT and n >= 64 and n % float_size == 0:
        return bytes((type_code, PLANES)) + _encode_planes(data, float_size)
    if n < 64:
        return bytes((type_code, RAW)) + bytes(data)
    codec, payload = _zstd_or_raw(_ctx()[1], data)
    return bytes((type_code, codec)) + payload


def _encode_planes(data, k: int) -> bytes:
    import numpy as np

    fast, general, _ = _ctx()
    bits = 8 * k
    u = np.frombuffer(data, dtype=_UINT[k])
    r = u << 1
    r |= u >> (bits - 1)
    heads, bodies = [], []
    for i in range(k - 1, -1, -1):
        plane = (r >> (8 * i)).astype(np.uint8) if i else r.astype(np.uint8)
        if i == k - 1:
            codec, body = _zstd_or_raw(fast, plane)
        else:
            probe = fast.compress(plane[:_PROBE])
            if len(probe) < 0.9 * min(_PROBE, len(plane)):
                codec, body = _zstd_or_raw(general, plane)
            else:
                codec, body = RAW, plane.tobytes()
        heads.append(struct.pack("<BI", codec, len(body)))
        bodies.append(body)
    return b"".join([struct.pack("<BI", k, len(data)), *heads, *bodies])


def decode(stored: bytes | memoryview, oid_hex: str = "?") -> tuple[int, bytes | memoryview]:
    """Return (type code, decoded bytes; a read-only buffer). Raises CorruptObjectError on malformed input."""
    try:
        type_code, codec = stored[0], stored[1]
        body = memoryview(stored)[2:]
        if codec == RAW:
            return type_code, bytes(body)
        if codec == ZSTD:
            return type_code, _ctx()[2].decompress(body)
        if codec == PLANES:
            return type_code, _decode_planes(body)
    except (zstd.ZstdError, struct.error, ValueError, IndexError) as e:
        raise CorruptObjectError(oid_hex, f"cannot decode ({e})") from e
    raise CorruptObjectError(oid_hex, f"unknown codec {codec}")


def _decode_planes(body: memoryview) -> memoryview:
    import numpy as np

    k, total = struct.unpack_from("<BI", body, 0)
    if k not in _UINT or total % k:
        raise ValueError("bad plane header")
    n = total // k
    pos = 5 + 5 * k
    heads = [struct.unpack_from("<BI", body, 5 + 5 * j) for j in range(k)]
    dctx = _ctx()[2]
    r = None
    for codec, length in heads:  # top plane first: r = ((p[k-1] << 8 | p[k-2]) << 8 | ...)
        chunk = body[pos:pos + length]
        pos += length
        raw = chunk if codec == RAW else dctx.decompress(chunk, max_output_size=n)
        if len(raw) != n:
            raise ValueError("plane length mismatch")
        plane = np.frombuffer(raw, dtype=np.uint8)
        if r is None:
            r = plane.astype(_UINT[k])
        else:
            r <<= 8
            r |= plane
    if pos != len(body):
        raise ValueError("trailing bytes")
    out = r >> 1
    out |= r << (8 * k - 1)
    return memoryview(out).cast("B")
