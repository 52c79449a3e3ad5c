"""Pack files: large stored values appended to files that the LMDB index points into.

LMDB is the index and keeps everything small; a value of at least PACK_MIN bytes (a chunk's
payload) is appended to a pack file instead, and its entry in the objects table becomes a
locator. Writing a value into LMDB's map runs at a third of the speed of appending it to a file
(docs/format.md §2.1 has the numbers), and a commit is mostly payload.

Order (Git's and restic's): values are appended and the pack fdatasync()ed, then one LMDB
transaction writes their locators, then refs move. A process killed in between leaves bytes that
no locator names; ``compact`` (run by gc and repack) reclaims them.

A pack file::

    header  b"MVCPACK1"  u64 little-endian 0 (reserved)
    record  32-byte object id | u64 LE length | the stored value      (repeated)

A locator (the objects table's value for a packed object, 22 bytes)::

    b"\\xffP" | u64 LE pack id | u64 LE offset of the value | u32 LE length

No stored value starts with 0xff (its first byte is a type code), so a locator is unambiguous.

Concurrency: a process appends only to a pack it holds flock()ed, so two writers never share
one; a pack file is created under a temporary name and renamed once locked, and ``compact``
rewrites or deletes only packs it can lock, so it never pulls a file from under a writer. A
reader that finds a pack gone (compacted since its transaction began) asks again.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import secrets
import struct
import threading

from ..errors import CorruptObjectError, MvcError
from .codec import Joined

PACK_MIN = 32 << 10  # values this large or larger are packed
PACK_MAX = 4 << 30  # a writer starts a new pack past this size
MAGIC = b"MVCPACK1"
HEADER = MAGIC + bytes(8)
LOC_TAG = b"\xffP"
_LOC = struct.Struct("<2sQQI")
LOC_SIZE = _LOC.size
_REC = struct.Struct("<32sQ")
PREFIX, SUFFIX = "pack-", ".pack"


def locator(pack: int, offset: int, length: int) -> bytes:
    return _LOC.pack(LOC_TAG, pack, offset, length)


def parse_locator(value) -> tuple[int, int, int] | None:
    """(pack id, offset, length) of a locator; None for any other stored value."""
    if len(value) != LOC_SIZE or bytes(value[:2]) != LOC_TAG:
        return None
    _, pack, offset, length = _LOC.unpack(value)
    return pack, offset, length


class PackGone(Exception):
    """A locator names a pack that is not there (compacted away since the read began)."""


def _pack_id(name: str) -> int | None:
    if not (name.startswith(PREFIX) and name.endswith(SUFFIX)):
        return None
    digits = name[len(PREFIX):-len(SUFFIX)]
    if len(digits) != 16:
        return None
    try:
        return int(digits, 16)
    except ValueError:
        return None


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def pwrite_all(fd: int, buffers: list, pos: int) -> None:
    """Write *buffers* one after the other at *pos* (one pwritev; again from where a short write
    stopped)."""
    views = [memoryview(b).cast("B") for b in buffers]
    while views:
        done = os.pwritev(fd, views, pos)
        if done <= 0:
            raise OSError("short write")
        pos += done
        while views and done >= len(views[0]):
            done -= len(views[0])
            views.pop(0)
        if views and done:
            views[0] = views[0][done:]


def _lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


class PackSet:
    """The pack files of one store directory (``<store>/packs``)."""

    def __init__(self, store_dir: str):
        self.dir = os.path.join(store_dir, "packs")
        self._maps: dict[int, mmap.mmap] = {}
        self._maps_lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._fd: int | None = None  # the pack this process appends to (flock()ed)
        self._id = 0
        self._end = 0

    def path(self, pack: int) -> str:
        return os.path.join(self.dir, f"{PREFIX}{pack:016x}{SUFFIX}")

    def list(self) -> dict[int, int]:
        """pack id -> size in bytes of every pack file."""
        out = {}
        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:
            return out
        for name in names:
            pack = _pack_id(name)
            if pack is not None:
                try:
                    out[pack] = os.stat(os.path.join(self.dir, name)).st_size
                except FileNotFoundError:
                    continue
        return out

    # -- writing ------------------------------------------------------------------
    def _open_writer(self, min_free: int) -> None:
        """Lock a pack to append to: one with room that no other process holds, else a new one."""
        if self._fd is not None:
            if self._end + min_free <= PACK_MAX:
                return
            os.close(self._fd)
            self._fd = None
        for pack, size in sorted(self.list().items(), key=lambda kv: kv[1]):
            if size + min_free > PACK_MAX:
                continue
            try:
                fd = os.open(self.path(pack), os.O_RDWR)
            except FileNotFoundError:
                continue
            # locked, and still the file of that name (not one compact unlinked meanwhile), and a pack
            if _lock(fd) and self._same_file(fd, pack) and os.pread(fd, len(MAGIC), 0) == MAGIC:
                self._fd, self._id, self._end = fd, pack, os.fstat(fd).st_size
                return
            os.close(fd)
        os.makedirs(self.dir, exist_ok=True)
        pack = secrets.randbits(64)
        tmp = os.path.join(self.dir, f"tmp-{pack:016x}{SUFFIX}")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            _lock(fd)
            os.pwrite(fd, HEADER, 0)
            os.fsync(fd)
            os.rename(tmp, self.path(pack))  # locked before anyone can see it under its name
            _fsync_dir(self.dir)
        except BaseException:
            os.close(fd)
            raise
        self._fd, self._id, self._end = fd, pack, len(HEADER)

    def _same_file(self, fd: int, pack: int) -> bool:
        try:
            st = os.stat(self.path(pack))
        except FileNotFoundError:
            return False
        mine = os.fstat(fd)
        return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)

    def append(self, items: list[tuple[bytes, bytes]]) -> list[bytes]:
        """Append (id, value) records and make them durable; return a locator for each."""
        if not items:
            return []
        need = sum(_REC.size + len(v) for _, v in items)
        with self._write_lock:
            self._open_writer(need)
            out = []
            try:
                pos = self._end
                for oid, value in items:
                    parts = value.parts if isinstance(value, Joined) else [value]
                    pwrite_all(self._fd, [_REC.pack(oid, len(value)), *parts], pos)
                    pos += _REC.size
                    out.append(locator(self._id, pos, len(value)))
                    pos += len(value)
                os.fdatasync(self._fd)
            except OSError as e:
                raise MvcError(f"cannot write pack {self.path(self._id)}: {e.strerror or e}") from e
            self._end = pos
        return out

    # -- reading ------------------------------------------------------------------
    def view(self, oid: bytes, loc: tuple[int, int, int]) -> memoryview:
        """The stored value a locator names, as a view of the pack's map (no copy)."""
        pack, offset, length = loc
        end = offset + length
        with self._maps_lock:
            m = self._maps.get(pack)
            if m is None or end > len(m):
                m = self._map(oid, pack, end)
        return memoryview(m)[offset:end]

    def _map(self, oid: bytes, pack: int, end: int) -> mmap.mmap:
        try:
            fd = os.open(self.path(pack), os.O_RDONLY)
        except FileNotFoundError as e:
            raise PackGone(pack) from e
        try:
            size = os.fstat(fd).st_size
            if end > size or size < len(HEADER):
                raise CorruptObjectError(oid.hex(), f"pack {self.path(pack)} is truncated "
                                                    f"(the object ends at byte {end}, the file has {size})")
            m = mmap.mmap(fd, size, access=mmap.ACCESS_READ)
        finally:
            os.close(fd)
        if m[:len(MAGIC)] != MAGIC:
            raise CorruptObjectError(oid.hex(), f"{self.path(pack)} is not a pack file")
        self._maps[pack] = m  # an older, shorter map stays alive while views of it do
        return m

    def release_pages(self) -> None:
        with self._maps_lock:
            maps = list(self._maps.values())
        for m in maps:
            try:
                m.madvise(mmap.MADV_DONTNEED)
            except (OSError, ValueError):
                pass

    def forget(self, pack: int) -> None:
        with self._maps_lock:
            self._maps.pop(pack, None)

    def close_writer(self) -> None:
        """Let go of the pack this process appends to (it becomes idle: compaction may take it)."""
        with self._write_lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def close(self) -> None:
        self.close_writer()
        with self._maps_lock:
            self._maps.clear()  # the maps close when the last view of them goes

    # -- maintenance -----------------------------------------------------------------
    def lock_idle(self) -> dict[int, int]:
        """Lock every pack no process appends to: pack id -> fd holding the lock (the caller
        closes them). Packs this process writes are left out too."""
        held = {}
        for pack in self.list():
            if pack == self._id and self._fd is not None:
                continue
            try:
                fd = os.open(self.path(pack), os.O_RDONLY)
            except FileNotFoundError:
                continue
            if _lock(fd) and self._same_file(fd, pack):
                held[pack] = fd
            else:
                os.close(fd)
        return held

    def remove(self, pack: int) -> int:
        """Delete a pack (the caller holds its lock and no locator names it); its size."""
        path = self.path(pack)
        try:
            size = os.stat(path).st_size
            os.unlink(path)
        except FileNotFoundError:
            return 0
        self.forget(pack)
        return size

    def leftovers(self) -> list[str]:
        """Temporary pack files of killed writers (not locked by anyone)."""
        out = []
        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:
            return out
        for name in names:
            if name.startswith("tmp-") and name.endswith(SUFFIX):
                path = os.path.join(self.dir, name)
                try:
                    fd = os.open(path, os.O_RDONLY)
                except FileNotFoundError:
                    continue
                try:
                    if _lock(fd):
                        out.append(path)
                finally:
                    os.close(fd)
        return out

    def read_header(self, pack: int) -> bytes:
        with open(self.path(pack), "rb") as f:
            return f.read(len(HEADER))
