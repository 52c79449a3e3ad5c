"""Object ids: BLAKE3 of the canonical, uncompressed content, prefixed by a type header.

id = BLAKE3(b"<type> <length>\\0" + content), 32 bytes, shown as 64 hex digits.
The header keeps objects of different types from sharing an id even when their
bytes are equal. See docs/format.md for why BLAKE3 (measured against SHA-256).
"""

from __future__ import annotations

import blake3

OID_BYTES = 32
OID_HEX = 64

TYPES = ("chunk", "tensor", "file", "tree", "commit")
TYPE_CODE = {name: i for i, name in enumerate(TYPES)}


def header(kind: str, length: int) -> bytes:
    return b"%s %d\x00" % (kind.encode(), length)


_KINDS = {name: name.encode() for name in TYPES}


def hash_object(kind: str, content: bytes | bytearray | memoryview) -> bytes:
    """Return the 32-byte id of an object of type *kind* with *content*."""
    n = len(content)
    if n <= 4096 and type(content) is bytes:  # one call (a file may hold 100,000 tiny tensors)
        return blake3.blake3(b"%s %d\x00" % (_KINDS.get(kind) or kind.encode(), n) + content).digest()
    h = blake3.blake3(header(kind, n))
    h.update(content)
    return h.digest()


_HEX_DIGITS = frozenset("0123456789abcdef")


def is_hex_oid(text) -> bool:
    """An object id as mvc writes it: 64 lowercase hex digits (anything else, any type: False)."""
    return isinstance(text, str) and len(text) == OID_HEX and _HEX_DIGITS.issuperset(text)
