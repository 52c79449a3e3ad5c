"""Typed, verifying object database on top of a Backend.

Every read re-hashes what it decoded and compares with the id asked for, so a
damaged store raises CorruptObjectError instead of handing back wrong bytes. A
delta-coded chunk is decoded through its chain of bases (codec.py); the chain is
verified as a whole by the final hash, and a failure names the damaged base.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict

import blake3

from ..errors import CorruptObjectError, MvcError, ObjectMissingError
from . import codec, kernels
from .backend import Backend
from .ids import TYPE_CODE, TYPES, hash_object, header
from .objects import encode_object, parse_object

CHUNK = TYPE_CODE["chunk"]
TENSOR = TYPE_CODE["tensor"]
_CHUNK_CACHE_BYTES = 16 * 1024 * 1024  # a merge reads base, ours and theirs of one chunk in a row
_RELEASE_BYTES = 32 * 1024 * 1024
_MAX_CHAIN = 64  # a read refuses longer delta chains (the writer keeps them within delta.max_depth)


def encode_chunk(data, float_size: int = 0, joined: bool = False) -> tuple[bytes, bytes]:
    """Hash and encode one chunk in full: (32-byte id, stored value; with *joined*, perhaps a
    codec.Joined, which Backend.put_many takes too). Thread-safe."""
    return hash_object("chunk", data), codec.encode(CHUNK, data, float_size, joined)


def decode_verified(oid: bytes, stored, want: str | None = None, bases: codec.BaseReader | None = None):
    """Decode a stored value and check its id. Returns (kind, content). Thread-safe.
    A delta-coded chunk needs *bases* (ObjectDB.base_reader) to reach its base."""
    hex_id = oid.hex()
    type_code, content = codec.decode(stored, hex_id, bases)
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
        #: chunk id -> its verified bytes, the most recent first out: bases that several reads share
        #: (a merge reads the merge base's chunk, then ours and theirs stored against it)
        self._chunks: OrderedDict[bytes, object] = OrderedDict()
        self._chunks_bytes = 0
        self._read_bytes = 0
        self._lock = threading.Lock()
        #: what follows the chunk id in a tiny tensor's JSON -> its size in bytes (tiny_tensors)
        self._tail_sizes: dict[bytes, int] = {}
        self._tls = threading.local()
        #: verify and cache every link of a delta chain read (see base_reader)
        self.keep_links = False
        #: bytes of verified chunks kept (a writer raises it: each worker walks a chain of links)
        self.cache_bytes = _CHUNK_CACHE_BYTES
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

    def stored_or_none(self, oid: bytes):
        """The stored value of *oid* in this store, or None (no lazy fetching)."""
        v = self.backend.get(oid)
        if v is not None:
            self._account(len(v))
        return v

    def read_chunk(self, hex_id: str):
        """The verified bytes of a chunk. A whole value is decoded straight from the store's
        storage (no copy where the backend allows); a delta is copied out first and decoded
        after the read, since its chain reads other values (nothing nests inside the read)."""
        oid = bytes.fromhex(hex_id)
        size = [0]

        def decode(view):
            size[0] = len(view)
            if len(view) > 1 and view[1] in codec.DELTAS:
                return False, bytes(view)
            return True, self.decode(oid, view, "chunk")[1]

        got = self.backend.read_with(oid, decode)
        if got is None:
            return self.decode(oid, self.stored(hex_id, "chunk"), "chunk")[1]
        self._account(size[0])  # after the read: handing pages back waits for every reader
        decoded, data = got
        return data if decoded else self.decode(oid, data, "chunk")[1]

    def place_chunk(self, hex_id: str, fd: int, offset: int, n: int) -> bool:
        """Decode a chunk stored as planes, or as a chain of DIFFs on planes, straight into file
        *fd* at *offset* (its *n* bytes), a slice at a time (codec.decode_slices), hashing as it
        goes. False when the chunk is stored otherwise or is not *n* bytes long, and when a chain
        does not decode to its id: the caller reads it whole (and names what is damaged), writing
        over whatever this wrote. A mismatch of a value stored whole raises, and the caller must
        discard the file (checkout writes into a temporary file renamed on success)."""
        oid = bytes.fromhex(hex_id)
        size = [0]
        levels: list = []  # the DIFFs read so far, the top of the chain first

        def place(view):
            size[0] += len(view)
            level = codec.diff_level(view, hex_id, self.backend.lasting(view))
            if level is not None:
                return level
            got = codec.decode_slices(view, hex_id, levels)
            if got is None or got[0] != n:
                return False
            h = blake3.blake3(header("chunk", n))
            pos = offset
            for piece in got[1]:
                h.update(piece)
                done = 0
                while done < len(piece):
                    done += os.pwrite(fd, piece[done:], pos + done)
                pos += len(piece)
            if pos != offset + n or h.digest() != oid:
                raise CorruptObjectError(hex_id, "content does not match its id")
            return True

        cur = oid
        try:
            for _ in range(_MAX_CHAIN):
                got = self.backend.read_with(cur, place)
                if not isinstance(got, tuple):
                    break
                levels.append(got)
                cur = got[0]
            else:
                got = False
        except CorruptObjectError:
            if not levels:
                raise
            got = False  # a damaged chain: the caller's whole read names the damaged link
        if size[0]:
            self._account(size[0])
        return got is True

    def stored(self, hex_id: str, what: str = "object"):
        v = self.stored_or_none(bytes.fromhex(hex_id))
        if v is None and self.fetcher is not None:
            v = self.fetcher(hex_id)  # a lazy clone: download, verify and store it now
        if v is None:
            raise ObjectMissingError(hex_id, what)
        return v

    def read(self, hex_id: str, want: str | None = None):
        """(kind, content bytes) of any object, verified."""
        oid = bytes.fromhex(hex_id)
        return self.decode(oid, self.stored(hex_id, want or "object"), want)

    def decode(self, oid: bytes, stored, want: str | None = None):
        """decode_verified with this store's bases; a failure of a delta names its damaged base."""
        try:
            kind, content = decode_verified(oid, stored, want, self.base_reader)
        except (CorruptObjectError, ObjectMissingError) as e:
            bad = next((b for b in map(self._damaged_link, codec.links(stored)) if b is not None), None)
            if bad is None:
                raise
            what = "missing" if isinstance(e, ObjectMissingError) else "corrupt"
            raise CorruptObjectError(oid.hex(), f"its delta base {bad} is {what}") from e
        if kind == "chunk":
            self._remember(oid, content)
        return kind, content

    def _damaged_link(self, base: bytes, seen: set | None = None) -> str | None:
        """The deepest object of a delta chain, from *base* down, that is missing or fails its own
        check (None: the chain is sound)."""
        seen = set() if seen is None else seen
        if base in seen:
            return base.hex()  # a cycle: damaged
        seen.add(base)
        stored = self.backend.get(base)
        if stored is None:
            return base.hex()
        try:
            decode_verified(base, stored, "chunk", self.base_reader)
            return None
        except CorruptObjectError:
            deeper = (self._damaged_link(link, seen) for link in codec.links(stored))
            return next((b for b in deeper if b is not None), base.hex())

    def base_reader(self, oid: bytes, k: int):
        """The elements of chunk *oid* (codec.elements), for decoding a delta stored against it:
        from the cache of verified chunks, else decoded here (the caller's final hash verifies the
        chain). With ``keep_links`` (writers: commit and repack try several bases of one chain),
        each link is verified and remembered, so that the next read finds it."""
        with self._lock:
            hit = self._chunks.get(oid)
            if hit is not None:
                self._chunks.move_to_end(oid)
                return codec.elements(hit, k)
        level = getattr(self._tls, "level", 0)
        if level >= _MAX_CHAIN:
            raise CorruptObjectError(oid.hex(), f"delta chain longer than {_MAX_CHAIN} (or a loop)")
        self._tls.level = level + 1
        try:
            stored = self.stored(oid.hex(), "chunk")
            if not getattr(self._tls, "keep", self.keep_links):
                return codec.decode_elements(stored, self.base_reader, k)
            _, content = decode_verified(oid, stored, "chunk", self.base_reader)
        finally:
            self._tls.level = level
        self._remember(oid, content)
        return codec.elements(content, k)

    def chunk_elements(self, oid: bytes, k: int, stored=None, keep_links: bool | None = None):
        """The verified elements of a chunk (for encoding a delta against it). *keep_links*
        overrides ``keep_links`` for this read: a writer that decodes one base of a chain, not
        several, has no use for its links (the chunk's own hash verifies the chain)."""
        with self._lock:
            hit = self._chunks.get(oid)
        if hit is None:
            if stored is None:
                stored = self.stored(oid.hex(), "chunk")
            before = getattr(self._tls, "keep", None)
            if keep_links is not None:
                self._tls.keep = keep_links
            try:
                hit = self.decode(oid, stored, "chunk")[1]
            finally:
                if keep_links is not None:
                    if before is None:
                        del self._tls.keep
                    else:
                        self._tls.keep = before
        return codec.elements(hit, k)

    def base_elements(self, oid: bytes, k: int, max_depth: int, keep_links: bool | None = None):
        """(depth, elements) of chunk *oid* as a delta base: the chain depth a delta stored on it
        gets, and its verified elements (chunk_elements). None where no delta may go on it: not in
        this store (nothing is fetched), its chain already *max_depth* long, or damaged (nothing is
        stored against bytes that do not verify). A whole value is decoded straight from the
        store's storage (read_chunk's way: no copy of it)."""
        with self._lock:
            hit = self._chunks.get(oid)
        size = [0]

        def look(view):
            size[0] = len(view)
            depth = codec.depth(view) + 1
            if depth > max_depth or hit is not None:
                return depth, None, False
            if len(view) > 1 and view[1] in codec.DELTAS:
                return depth, bytes(view), True  # stored as a delta: its chain is read after this read
            return depth, self.decode(oid, view, "chunk")[1], False

        try:
            got = self.backend.read_with(oid, look)
            if got is None or got[0] > max_depth:
                return None
            depth, data, stored_delta = got
            if stored_delta:
                return depth, self.chunk_elements(oid, k, data, keep_links)
            return depth, codec.elements(hit if hit is not None else data, k)
        except MvcError:
            return None
        finally:
            self._account(size[0])

    def _account(self, n: int) -> None:
        """Every _RELEASE_BYTES read, hand the store's mapped pages back: they stay in the page cache
        but leave this process's RSS (reads of delta chains touch a lot of the map)."""
        with self._lock:
            self._read_bytes += n
            if self._read_bytes < _RELEASE_BYTES:
                return
            self._read_bytes = 0
        self.backend.release_pages()

    def _remember(self, oid: bytes, content) -> None:
        with self._lock:
            if oid in self._chunks:
                self._chunks.move_to_end(oid)
                return
            self._chunks[oid] = content
            self._chunks_bytes += len(content)
            while self._chunks_bytes > self.cache_bytes and self._chunks:
                _, old = self._chunks.popitem(last=False)
                self._chunks_bytes -= len(old)

    def standalone(self, hex_id: str) -> bytes:
        """A stored value that needs no other object: the value itself, or a delta re-encoded in full
        (for places that may lack its base: patches, another store)."""
        stored = self.stored(hex_id)
        if codec.delta_base(stored) is None:
            return bytes(stored)
        _, content = self.decode(bytes.fromhex(hex_id), stored, "chunk")
        k, is_float = codec.delta_k(stored)
        return codec.encode(CHUNK, content, k if is_float and k > 1 else 0)

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

    def get_many(self, hex_ids: list[str], kind: str) -> list:
        """get() of many metadata objects, the store read in one transaction (a file of 100,000
        tensors: one transaction, not 100,000). Each object is verified and parsed as by get()."""
        out: list = [None] * len(hex_ids)
        need: list[int] = []
        for i, h in enumerate(hex_ids):
            obj = self._cache.get(h)
            if obj is not None and obj.kind == kind:
                out[i] = obj
            else:
                need.append(i)
        if not need:
            return out
        values = self.backend.get_many([bytes.fromhex(hex_ids[i]) for i in need])
        self._account(sum(len(v) for v in values if v is not None))
        for i, stored in zip(need, values):
            h = hex_ids[i]
            if stored is None:
                stored = self.stored(h, kind)  # a lazy clone's fetch, or the missing-object error
            _, content = self.decode(bytes.fromhex(h), stored, kind)
            out[i] = obj = parse_object(kind, bytes(content), h)
            self._cache[h] = obj
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return out

    def read_chunks(self, hex_ids: list[str]) -> list:
        """read_chunk() of many small chunks, the store read in one transaction; each verified."""
        oids = list(map(bytes.fromhex, hex_ids))
        values = self.backend.get_many(oids)
        self._account(sum(map(len, filter(None, values))))
        # raw-stored ones checked in one C loop (a file of 100,000 tiny tensors); the rest here
        out = kernels.verified_raw(blake3.blake3, "chunk", CHUNK, oids, values) or [None] * len(values)
        for i, stored in enumerate(values):
            if out[i] is not None:
                continue
            if stored is None or (len(stored) > 1 and stored[1] in codec.DELTAS):
                out[i] = self.read_chunk(hex_ids[i])  # fetched, or a delta: its chain is read on its own
            else:
                out[i] = decode_verified(oids[i], stored, "chunk")[1]  # whole: no bases
        return out

    def tiny_tensors(self, hex_ids: list[str], head: bytes) -> list:
        """For each tensor id: (its one chunk's id, its size in bytes) where the tensor object is
        stored whole (raw or zstd), verified, and is the JSON that tiny_tensor_json makes (*head*,
        the chunk id, then the part that names dtype and shape); None for any other, to be read by
        get_many. Needs the C kernels (all None without them)."""
        oids = list(map(bytes.fromhex, hex_ids))
        values = self.backend.get_many(oids) if kernels.native() else []
        self._account(sum(map(len, filter(None, values))))
        raw = bytes((TENSOR, codec.RAW))
        for i, v in enumerate(values):  # zstd-coded ones (JSON of 128 bytes or more): decoded here
            if v is not None and len(v) > 1 and v[1] == codec.ZSTD and v[0] == TENSOR:
                try:
                    values[i] = raw + codec.decode(v)[1]
                except CorruptObjectError:
                    pass  # left as it is: get_many reads it again and names the damage
        found = kernels.verified_raw(blake3.blake3, "tensor", TENSOR, oids, values, head)
        if found is None:
            return [None] * len(hex_ids)
        sizes = self._tail_sizes
        for i, hit in enumerate(found):
            if hit is None:
                continue
            cid, tail = hit
            n = sizes.get(tail)
            if n is None:  # a dtype and shape not seen yet: parsed and checked as get() would
                try:
                    t = parse_object("tensor", head + b"0" * 64 + tail)
                except CorruptObjectError:
                    found[i] = None
                    continue
                if len(t.chunks) != 1 or len(sizes) >= 4096:
                    found[i] = None
                    continue
                n = sizes[tail] = t.nbytes
            found[i] = (cid, n)
        return found

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
