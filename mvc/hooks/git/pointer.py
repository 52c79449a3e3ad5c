"""The pointer file Git stores in place of a model file (docs/pointer-spec.md).

    version https://mvc.dev/spec/pointer/v1
    oid blake3:<64 lowercase hex: the mvc file object id>
    size <decimal bytes of the file>

Exactly one valid encoding: these three lines in this order, each ending in "\\n",
nothing else. Anything else is not a pointer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

VERSION = "https://mvc.dev/spec/pointer/v1"
MAX_SIZE = 1024
_RE = re.compile(rb"\Aversion https://mvc\.dev/spec/pointer/v1\n"
                 rb"oid blake3:([0-9a-f]{64})\n"
                 rb"size (0|[1-9][0-9]{0,19})\n\Z")


@dataclass(frozen=True)
class Pointer:
    oid: str
    size: int

    def encode(self) -> bytes:
        return f"version {VERSION}\noid blake3:{self.oid}\nsize {self.size}\n".encode()


def parse(data: bytes) -> Pointer | None:
    """The pointer *data* encodes, or None if it is not exactly a valid pointer."""
    if len(data) > MAX_SIZE:
        return None
    m = _RE.match(data)
    if not m:
        return None
    return Pointer(m.group(1).decode(), int(m.group(2)))
