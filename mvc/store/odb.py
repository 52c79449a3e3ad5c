"""Typed, verifying object database on top of a Backend.

Every read re-hashes what it decoded and compares with the id asked for, so a
damaged store raises CorruptObjectError instead of handing back wrong bytes.
"""

from __future__ import annotations

from collections import OrderedDict

from ..errors import CorruptObjectError, ObjectMissingError
from . import codec
from .backend import Backend
from .ids import TYPE_CODE, TYPES, hash_object
from .objects import encode_object, parse_object

CHUNK = TYPE_CODE["chunk"]


def encode_chunk(data, float_size: int = 0) -> tuple[bytes, bytes]:
    """Hash and encode one chunk: (32-byte id, stored value). Thread-safe."""
    return hash_object("chunk", data), codec.encode(CHUNK, data, float_size)


def decode_verified(oid: bytes, stored, want: str | None = None):
    """Decode a stored value and check its id. Returns (kind, content). Thread-safe."""
    hex_id = oid.hex()
    type_code, content = codec.decode(stored, hex_id)
    if type_code >= len(TYPES):
        raise CorruptObjectError(hex_id, f"unknown type code {type_code}")
    kind = TYPES[type_code]
    if hash_object(kind, content) != oid:
        raise CorruptObjectError(hex_id, "content does not match its id")
    if want is not None and kind != want:
        raise CorruptObjectError(hex_id, f"expected a {want}, found a {kind}")
    return kind, content


class ObjectDB:
    def __init__(self, backend: Backend, cache_size: int = 4096):
        self.backend = backend
        self._cache: OrderedDict[str, object] = OrderedDict()
        self._cache_size = cache_size
        #: hex id -> verified stored value or None; set for lazy clones (mvc/remote/sync.py)
        self.fetcher = None

    # -- writing ---------------------------------------------------------------
    @staticmethod
    def encode_meta(obj) -> tuple[bytes, bytes]:
        content = encode_object(obj)
        return hash_object(obj.kind, content), codec.encode(TYPE_CODE[obj.kind], content)

    def put(self, obj) -> str:
        oid, stored = self.encode_meta(obj)
        self.backend.put_many([(oid, stored)])
        return oid.hex()

    def put_chunk(self, data, float_size: int = 0) -> str:
        oid, stored = encode_chunk(data, float_size)
        if not self.backend.has(oid):
            self.backend.put_many([(oid, stored)])
        return oid.hex()

    # -- reading ---------------------------------------------------------------
    def has(self, hex_id: str) -> bool:
        return self.backend.has(bytes.fromhex(hex_id))

    def stored(self, hex_id: str, what: str = "object"):
        v = self.backend.get(bytes.fromhex(hex_id))
        if v is None and self.fetcher is not None:
            v = self.fetcher(hex_id)  # a lazy clone: download, verify and store it now
        if v is None:
            raise ObjectMissingError(hex_id, what)
        return v

    def read(self, hex_id: str, want: str | None = None):
        """(kind, content bytes) of any object, verified."""
        return decode_verified(bytes.fromhex(hex_id), self.stored(hex_id, want or "object"), want)

    def get(self, hex_id: str, kind: str):
        """A parsed, verified metadata object of the given kind (cached)."""
        obj = self._cache.get(hex_id)
        if obj is not None and obj.kind == kind:
            self._cache.move_to_end(hex_id)
            return obj
        _, content = self.read(hex_id, kind)
        obj = parse_object(kind, bytes(content), hex_id)
        self._cache[hex_id] = obj
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return obj

    @staticmethod
    def get_parsed_from(kind: str, content, hex_id: str):
        """Parse verified content of a metadata object that is not in the store yet."""
        return parse_object(kind, bytes(content), hex_id)

    def kind_of(self, hex_id: str) -> str:
        stored = self.stored(hex_id)
        if not stored or stored[0] >= len(TYPES):
            raise CorruptObjectError(hex_id, "unknown type")
        return TYPES[stored[0]]

    def resolve_prefix(self, prefix: str) -> list[str]:
        """Object ids starting with a hex prefix (for short ids)."""
        prefix = prefix.lower()
        head = bytes.fromhex(prefix[: len(prefix) // 2 * 2])
        return [o.hex() for o in self.backend.iter_oids(head) if o.hex().startswith(prefix)]
