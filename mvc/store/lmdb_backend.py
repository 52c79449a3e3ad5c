"""LMDB backend: one environment under .mvc/store with objects, refs, reflog and kv tables,
and pack files under .mvc/store/packs for large values (packs.py).

Rules (docs/format.md): synchronous commits always; one Environment per path and
process (opened again after fork); the map grows on MapFullError; stale reader
slots of killed processes are cleared on open; a pack is fdatasync()ed before the
transaction that indexes it.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import mmap
import operator
import os
import struct
import threading
from dataclasses import dataclass

import lmdb

from ..errors import CorruptObjectError, MvcError, RefConflictError
from ..state import KV_STATS
from .backend import Backend
from .codec import Joined
from .ids import is_hex_oid
from .packs import HEADER, LOC_SIZE, PACK_MIN, PackGone, PackSet, locator, parse_locator

_first, _second = operator.itemgetter(0), operator.itemgetter(1)
_is_joined = functools.partial(operator.is_, Joined)

_RECORD = 40  # a pack record's header: id and length
_MOVE_BATCH = 64 << 20

_MIN_MAP = 256 << 20
_envs: dict[str, tuple[int, lmdb.Environment, _RWLock, tuple[int, int] | None]] = {}
_envs_lock = threading.Lock()


class _RWLock:
    """Transactions share; growing the map (no transaction may be open in the process) excludes."""

    def __init__(self):
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._waiting = 0

    @contextlib.contextmanager
    def shared(self):
        with self._cond:
            while self._writer or self._waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self):
        with self._cond:
            self._waiting += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


def _open_env(path: str) -> tuple[lmdb.Environment, _RWLock]:
    key = os.path.realpath(path)
    data = os.path.join(key, "data.mdb")
    with _envs_lock:
        cached = _envs.get(key)
        if cached and cached[0] == os.getpid() and cached[3] == _file_id(data):
            return cached[1], cached[2]
        # (a store deleted and made again at the same path is another file: a new environment)
        used = os.stat(data).st_blocks * 512 if os.path.exists(data) else 0
        size = max(_MIN_MAP, os.path.getsize(data) if used else 0, 2 * used)
        try:
            # writemap: writes go straight to the map (measured 2x faster commits than copying
            # dirty pages); with it the file's apparent size is the map size (sparse).
            env = lmdb.open(key, map_size=size, max_dbs=8, subdir=True, sync=True, metasync=True,
                            writemap=True, readahead=False, max_readers=256, lock=True)
        except lmdb.Error as e:
            raise MvcError(f"cannot open store {key}: {e}") from e
        env.reader_check()
        rw = _RWLock()
        _envs[key] = (os.getpid(), env, rw, _file_id(data))
        return env, rw


def _file_id(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


@dataclass
class CompactReport:
    rewritten: int = 0  # packs whose live values were moved to another pack
    removed: int = 0  # pack files deleted (rewritten ones and ones no locator names)
    moved_bytes: int = 0
    freed_bytes: int = 0  # disk space given back


def _stored_len(v) -> int:
    """The length of the stored value an objects-table entry stands for."""
    loc = parse_locator(v) if len(v) == LOC_SIZE else None
    return loc[2] if loc is not None else len(v)


@functools.cache
def _libc():
    import ctypes

    return ctypes.CDLL(None, use_errno=True)


@functools.cache
def _map_file(path: str) -> str:
    return os.path.join(os.path.realpath(path), "data.mdb")


def _ref_value(name: str, raw: bytes) -> str:
    """A stored ref's value, checked: a commit id (64 lowercase hex digits) or "ref: <name>"."""
    value = raw.decode("utf-8", "replace")
    if is_hex_oid(value) or (value.startswith("ref: refs/") and "\ufffd" not in value):
        return value
    raise MvcError(f"ref {name} is damaged (it holds {value[:80]!r}, not a commit id)",
                   hint="the store was changed by something other than mvc; restore .mvc from a backup "
                        "or clone the repository again")


class LmdbBackend(Backend):
    """*packs*: whether new values of PACK_MIN bytes or more go to pack files (a repository of an
    older format keeps them in LMDB); packed values are read whatever it says."""

    def __init__(self, path: str, create: bool = False, packs: bool = True, pack_min: int = PACK_MIN):
        if not create and not os.path.exists(os.path.join(path, "data.mdb")):
            raise MvcError(f"store {path} is missing", hint="the repository is damaged; run `mvc doctor`")
        os.makedirs(path, exist_ok=True)
        self.path = path
        self.env, self._rw = _open_env(path)
        self._objects = self.env.open_db(b"objects")
        self._refs = self.env.open_db(b"refs")
        self._reflog = self.env.open_db(b"reflog")
        self._kv = self.env.open_db(b"kv")
        self.packs = PackSet(path)
        self.pack_writes = packs
        self.pack_min = pack_min

    # -- helpers ---------------------------------------------------------------
    def _grow(self, size: int) -> None:
        with self._rw.exclusive():
            if size == 0 or size > self.env.info()["map_size"]:
                self.env.set_mapsize(size)

    def _txn(self, fn, write: bool = False):
        """Run fn(txn) in a transaction; grow the map when full, adopt another process's growth."""
        while True:
            try:
                with self._rw.shared(), self.env.begin(write=write) as txn:
                    return fn(txn)
            except lmdb.MapFullError:
                self._grow(self.env.info()["map_size"] * 2)
            except lmdb.MapResizedError:
                self._grow(0)
            except lmdb.Error as e:
                raise MvcError(f"store {'write' if write else 'read'} failed: {e}") from e

    def _write(self, fn):
        return self._txn(fn, write=True)

    def _counts(self, txn) -> tuple[int, int]:
        raw = txn.get(KV_STATS, db=self._kv)
        if raw is None:
            return 0, 0
        if len(raw) == 16:
            return struct.unpack("<QQ", raw)
        n = size = 0  # damaged counters: count again (a write transaction then stores them right)
        with txn.cursor(db=self._objects) as cur:
            for _k, v in cur.iternext(keys=True, values=True):
                n += 1
                size += _stored_len(v)
        return n, size

    # -- objects ---------------------------------------------------------------
    def has(self, oid):
        def fn(txn):  # position a cursor: the value is neither copied nor paged in
            with txn.cursor(db=self._objects) as cur:
                return cur.set_key(oid)

        return self._txn(fn)

    def get(self, oid):
        return self.read_with(oid, bytes)

    def stored_size(self, oid):
        def fn(txn):  # the index entry only: a packed value's locator carries its length
            v = txn.get(oid, db=self._objects)
            return None if v is None else _stored_len(v)

        return self._txn(fn)

    def has_many(self, oids):
        def fn(txn):
            with txn.cursor(db=self._objects) as cur:
                return {o for o in oids if cur.set_key(o)}

        return self._txn(fn)

    def get_many(self, oids):
        def fn(txn):
            get, objects = txn.get, self._objects
            return [get(o, db=objects) for o in oids]

        values = self._txn(fn)
        for i, v in enumerate(values):  # a value in a pack: read on its own (it may move)
            if v is not None and len(v) == LOC_SIZE and parse_locator(v) is not None:
                values[i] = self.get(oids[i])
        return values

    def read_with(self, oid, fn):
        """fn(a view of the value in the map or its pack), in one read transaction: nothing is
        copied. *fn* must not read the store itself (a waiting writer would wait on this read)."""
        for attempt in range(3):
            try:
                with self._rw.shared(), self.env.begin(buffers=True) as txn:
                    v = txn.get(oid, db=self._objects)
                    if v is None:
                        return None
                    loc = parse_locator(v) if len(v) == LOC_SIZE else None
                    if loc is None:
                        return fn(v)
                    view = self.packs.view(oid, loc)
                return fn(view)  # outside the transaction: the pack does not move under it
            except PackGone as e:
                # compacted since this transaction began: the next one sees the new locator
                if attempt == 2:
                    raise CorruptObjectError(oid.hex(), f"its pack {self.packs.path(e.args[0])} is missing") from e
            except lmdb.MapResizedError:
                self._grow(0)
            except lmdb.Error as e:
                raise MvcError(f"store read failed: {e}") from e
        return None

    def lasting(self, view) -> bool:
        """Bytes, and views of a pack's map: a map lives as long as a view of it (Packs.view), and
        a pack's stored values never change. Views of the LMDB map end with their transaction."""
        return isinstance(view, bytes) or (isinstance(view, memoryview) and isinstance(view.obj, mmap.mmap))

    def _change_objects(self, items, one) -> int:
        """In one write transaction: one(txn, item) -> (objects added, bytes added) for each item,
        and the counters moved by the sums. Returns the bytes added (negative: freed)."""
        items = list(items)

        def fn(txn):
            n, size = self._counts(txn)
            dn = dsize = 0
            for item in items:
                a, b = one(txn, item)
                dn += a
                dsize += b
            txn.put(KV_STATS, struct.pack("<QQ", n + dn, size + dsize), db=self._kv)
            return dsize

        return self._write(fn)

    def _packed(self, items, present: bool):
        """(id, value, what to index) for each item: large values are appended to a pack (made
        durable here, before the index transaction) and indexed by their locator. Only ids that
        are absent (put) or *present* (replace) are packed: the others would be garbage."""
        limit = self.pack_min if self.pack_writes else float("inf")  # values this long go to a pack
        items = [(oid, bytes(v) if type(v) is Joined and len(v) < limit else v) for oid, v in items]
        big = [oid for oid, v in items if len(v) >= limit]
        if not big:
            return [(oid, v, v) for oid, v in items]

        def check(txn):
            with txn.cursor(db=self._objects) as cur:
                return {oid for oid in big if cur.set_key(oid) == present}

        pick = self._txn(check)
        todo, seen = [], set()
        for oid, v in items:
            if oid in pick and oid not in seen and len(v) >= self.pack_min:
                seen.add(oid)
                todo.append((oid, v))
        locs = dict(zip((oid for oid, _ in todo), self.packs.append(todo), strict=True))
        return [(oid, v, locs.get(oid, v)) for oid, v in items]

    def put_many(self, items):
        # whole C-speed passes, no Python step per item in the usual case: a commit may put
        # 200,000 tiny objects (the loops of getmulti/putmulti are in C)
        if not items:
            return 0
        limit = self.pack_min if self.pack_writes else float("inf")  # values this long go to a pack
        values = list(map(_second, items))
        sizes = list(map(len, values))
        pairs = items  # every value indexed inline, as it is, but for
        odd = list(itertools.compress(range(len(items)), map(operator.or_, map(limit.__le__, sizes),
                                                              map(_is_joined, map(type, values)))))
        if odd:  # values for a pack, and joined parts: only those take a step in Python
            pairs = list(items)
            for i, (oid, _v, index) in zip(odd, self._packed([items[i] for i in odd], present=False), strict=True):
                pairs[i] = (oid, index)

        def fn(txn):
            n, size = self._counts(txn)
            with txn.cursor(db=self._objects) as cur:
                have = {bytes(k) for k, _v in cur.getmulti(list(map(_first, pairs)))}
                todo = [p for p in pairs if p[0] not in have] if have else pairs
                _, count = cur.putmulti(todo, overwrite=False)  # one id twice: the first one
            if count == len(pairs):
                added = sum(sizes)
            else:  # some were there already or came twice: each new id counted once
                size_of = dict(zip(map(_first, reversed(pairs)), reversed(sizes)))
                added = sum(map(size_of.__getitem__, {p[0] for p in todo}))
            txn.put(KV_STATS, struct.pack("<QQ", n + count, size + added), db=self._kv)
            return added

        return self._write(fn)

    def replace_many(self, items):
        def one(txn, item):
            oid, value, index = item
            old = txn.get(oid, db=self._objects)
            if old is None:
                return 0, 0
            txn.put(oid, index, db=self._objects)
            return 0, len(value) - _stored_len(old)

        return self._change_objects(self._packed(items, present=True), one)

    def delete_many(self, oids):
        def one(txn, oid):
            v = txn.pop(oid, db=self._objects)
            return (-1, -_stored_len(v)) if v is not None else (0, 0)

        return -self._change_objects(oids, one)

    # -- packs -----------------------------------------------------------------
    def _pack_usage(self, packs) -> dict[int, list[tuple[bytes, tuple[int, int, int]]]]:
        """pack id -> (object id, locator) of every object stored in it, for the given packs."""
        def fn(txn):
            out = {p: [] for p in packs}
            with txn.cursor(db=self._objects) as cur:
                for k, v in cur.iternext(keys=True, values=True):
                    if len(v) == LOC_SIZE:
                        loc = parse_locator(v)
                        if loc is not None and loc[0] in out:
                            out[loc[0]].append((bytes(k), loc))
            return out

        while True:
            try:
                with self._rw.shared(), self.env.begin(buffers=True) as txn:
                    return fn(txn)
            except lmdb.MapResizedError:
                self._grow(0)
            except lmdb.Error as e:
                raise MvcError(f"store read failed: {e}") from e

    def pack_stats(self) -> dict:
        """{"packs": count, "pack_bytes": their size on disk, "packed_bytes": of values they hold}."""
        sizes = self.packs.list()
        usage = self._pack_usage(sizes)
        return {"packs": len(sizes), "pack_bytes": sum(sizes.values()),
                "packed_bytes": sum(loc[2] for objs in usage.values() for _, loc in objs)}

    def compact(self, min_live: float = 0.5) -> CompactReport:
        """Give back the space of values no locator names (deleted, re-encoded, or written by a
        killed process): a pack that no process appends to and whose live values fill less than
        *min_live* of it has them appended to another pack, re-indexed in one transaction each
        64 MiB, and is deleted; so is a pack no locator names. A kill at any point loses nothing:
        a value is indexed in its new place only once it is durable there, and a pack is deleted
        only after no committed locator names it."""
        rep = CompactReport()
        self.packs.close_writer()  # what this process appended (repack's re-encodings) is fair game too
        before = sum(self.packs.list().values())
        held = self.packs.lock_idle()
        try:
            usage = self._pack_usage(held)
            for pack, fd in held.items():
                objs = usage[pack]
                size = os.fstat(fd).st_size
                live = sum(_RECORD + loc[2] for _, loc in objs)
                if objs and live >= min_live * (size - len(HEADER)):
                    continue
                self._move(objs, rep)
                rep.rewritten += bool(objs)
                self.packs.remove(pack)
                rep.removed += 1
            for path in self.packs.leftovers():
                try:
                    rep.freed_bytes += os.stat(path).st_size
                    os.unlink(path)
                except FileNotFoundError:
                    pass
        finally:
            for fd in held.values():
                os.close(fd)
        if rep.removed:  # what the pack files take now against before (a new pack included)
            rep.freed_bytes += max(0, before - sum(self.packs.list().values()))
        return rep

    def _move(self, objs, rep: CompactReport) -> None:
        """Append these packed values to this process's pack and point their locators there, in
        batches; a locator that changed meanwhile (replaced, deleted) is left alone."""
        i = 0
        while i < len(objs):
            batch, size = [], 0
            while i < len(objs) and (not batch or size < _MOVE_BATCH):
                oid, loc = objs[i]
                batch.append((oid, loc, bytes(self.packs.view(oid, loc))))
                size += loc[2]
                i += 1
            new = self.packs.append([(oid, v) for oid, _, v in batch])

            def fn(txn, batch=batch, new=new):
                for (oid, loc, _), index in zip(batch, new, strict=True):
                    if txn.get(oid, db=self._objects) == locator(*loc):
                        txn.put(oid, index, db=self._objects)

            self._write(fn)
            rep.moved_bytes += size + _RECORD * len(batch)
            del batch
            self.packs.release_pages()  # the old pack's pages, read through the map, leave the RSS

    def iter_oids(self, prefix=b""):
        def fn(txn):
            cur = txn.cursor(db=self._objects)
            keys = []
            if cur.set_range(prefix):
                for k in cur.iternext(keys=True, values=False):
                    if not k.startswith(prefix):
                        break
                    keys.append(k)
            return keys

        return iter(self._txn(fn))

    def stats(self):
        n, size = self._txn(self._counts)
        return {"objects": n, "stored_bytes": size}

    # -- refs ------------------------------------------------------------------
    def get_ref(self, name):
        v = self._txn(lambda txn: txn.get(name.encode(), db=self._refs))
        return _ref_value(name, v) if v is not None else None

    def list_refs(self, prefix=""):
        def fn(txn):
            out = {}
            cur = txn.cursor(db=self._refs)
            if cur.set_range(prefix.encode()):
                for k, v in cur:
                    name = k.decode("utf-8", "replace")
                    if not name.startswith(prefix):
                        break
                    out[name] = _ref_value(name, v)
            return out

        return self._txn(fn)

    def update_refs(self, updates, log):
        def fn(txn):
            for name, old, _new in updates:
                cur = txn.get(name.encode(), db=self._refs)
                cur = cur.decode() if cur is not None else None
                if cur != old:
                    raise RefConflictError(
                        f"ref {name} moved (expected {old or 'nothing'}, found {cur or 'nothing'})")
            for name, _old, new in updates:
                if new is None:
                    txn.delete(name.encode(), db=self._refs)
                    self._drop_log(txn, name)
                else:
                    txn.put(name.encode(), new.encode(), db=self._refs)
            for name, entry in log:
                if txn.get(name.encode(), db=self._refs) is None:
                    continue
                prefix = name.encode() + b"\x00"
                cur = txn.cursor(db=self._reflog)
                seq = 0
                # last key with this prefix: seek past it and step back
                if cur.set_range(prefix + b"\xff" * 8):
                    cur.prev()
                elif not cur.last():
                    cur = None
                if cur is not None and cur.key().startswith(prefix):
                    seq = struct.unpack(">Q", cur.key()[len(prefix):])[0] + 1
                txn.put(prefix + struct.pack(">Q", seq), json.dumps(entry).encode(), db=self._reflog)

        self._write(fn)

    def _drop_log(self, txn, name):
        prefix = name.encode() + b"\x00"
        cur = txn.cursor(db=self._reflog)
        if cur.set_range(prefix):
            while cur.key().startswith(prefix):
                if not cur.delete():
                    break

    def reflog(self, name):
        prefix = name.encode() + b"\x00"

        def fn(txn):
            out = []
            cur = txn.cursor(db=self._reflog)
            if cur.set_range(prefix):
                for k, v in cur:
                    if not k.startswith(prefix):
                        break
                    try:
                        entry = json.loads(v)
                    except (ValueError, RecursionError):
                        entry = None
                    if not isinstance(entry, dict):  # shown, not fatal: the reflog is a record
                        entry = {"old": None, "new": None, "time": 0, "who": "?", "msg": "(damaged reflog entry)"}
                    out.append(entry)
            return out

        return self._txn(fn)

    # -- kv --------------------------------------------------------------------
    def kv_get(self, key):
        return self._txn(lambda txn: txn.get(key, db=self._kv))

    def kv_put_many(self, items):
        def fn(txn):
            for k, v in items.items():
                if v is None:
                    txn.delete(k, db=self._kv)
                else:
                    txn.put(k, v, db=self._kv)

        self._write(fn)

    # -- memory ----------------------------------------------------------------
    def release_pages(self):
        """madvise(DONTNEED) the read-only map: pages stay in the page cache, leave our RSS."""
        import ctypes

        data, libc = _map_file(self.path), _libc()
        try:
            with self._rw.exclusive(), open("/proc/self/maps") as f:
                for line in f:
                    if line.rstrip().endswith(data):
                        lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
                        libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), 4)  # MADV_DONTNEED
        except OSError:
            pass
        self.packs.release_pages()

    def close(self):
        self.packs.close()
