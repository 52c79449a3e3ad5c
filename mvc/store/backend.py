"""Storage backends: one narrow interface, an in-memory and an LMDB implementation.

A backend holds four tables: objects (id -> stored value), refs (name -> value),
reflog, and a small key-value table for the stat cache and counters. Everything
above (typed objects, refs logic) is written against this interface, and one
conformance suite (tests/test_backend.py) runs against every implementation.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator

from ..errors import RefConflictError


class Backend(ABC):
    # -- objects ---------------------------------------------------------------
    @abstractmethod
    def has(self, oid: bytes) -> bool: ...

    @abstractmethod
    def get(self, oid: bytes) -> bytes | None: ...

    def has_many(self, oids: list[bytes]) -> set[bytes]:
        """The ids among *oids* that are stored (one transaction where the backend has them)."""
        return {o for o in oids if self.has(o)}

    def get_many(self, oids: list[bytes]) -> list[bytes | None]:
        """The stored values of *oids*, in order (None where absent), read in one transaction
        where the backend has them: for many small objects, not for chunk payloads."""
        return [self.get(o) for o in oids]

    def stored_size(self, oid: bytes) -> int | None:
        """Bytes the object's stored value takes (None when absent), without reading the value."""
        v = self.get(oid)
        return None if v is None else len(v)

    def read_with(self, oid: bytes, fn):
        """fn(stored value) for an object, or None when absent. A backend may hand *fn* a view of
        its storage that is valid only during the call (no copy): *fn* must not keep it, unless
        lasting(view) says it stays valid while it lives."""
        v = self.get(oid)
        return None if v is None else fn(v)

    def lasting(self, view) -> bool:
        """Whether a value read_with handed over stays valid for as long as it is kept."""
        return isinstance(view, bytes)

    @abstractmethod
    def put_many(self, items: Iterable[tuple[bytes, bytes]]) -> int:
        """Store objects in one transaction; return the number of stored bytes added (new ones)."""

    @abstractmethod
    def replace_many(self, items: Iterable[tuple[bytes, bytes]]) -> int:
        """Store new encodings of objects already present (same id, same content), in one
        transaction; return the change in stored bytes. Ids not present are skipped."""

    @abstractmethod
    def delete_many(self, oids: Iterable[bytes]) -> int:
        """Delete objects; return the stored bytes freed."""

    @abstractmethod
    def iter_oids(self, prefix: bytes = b"") -> Iterator[bytes]:
        """Object ids in sorted order, optionally only those starting with *prefix*."""

    @abstractmethod
    def stats(self) -> dict:
        """{"objects": count, "stored_bytes": sum of stored value sizes}."""

    # -- refs ------------------------------------------------------------------
    @abstractmethod
    def get_ref(self, name: str) -> str | None: ...

    @abstractmethod
    def list_refs(self, prefix: str = "") -> dict[str, str]: ...

    @abstractmethod
    def update_refs(self, updates: list[tuple[str, str | None, str | None]],
                    log: list[tuple[str, dict]]) -> None:
        """Atomically apply (name, expected old, new) updates; new None deletes.

        Every expected value is compared first (compare-and-swap); on any mismatch
        nothing changes and RefConflictError is raised. Reflog entries are appended
        in the same transaction.
        """

    @abstractmethod
    def reflog(self, name: str) -> list[dict]: ...

    # -- small key-value table (stat cache, config counters) -------------------
    @abstractmethod
    def kv_get(self, key: bytes) -> bytes | None: ...

    @abstractmethod
    def kv_put_many(self, items: dict[bytes, bytes | None]) -> None: ...

    def release_pages(self) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Hint that mapped pages read so far are no longer needed (keeps RSS flat)."""

    def close(self) -> None:  # noqa: B027
        """Release resources; the default holds none."""


class MemoryBackend(Backend):
    """Dict-backed backend for tests and throwaway repositories."""

    def __init__(self):
        self._objects: dict[bytes, bytes] = {}
        self._refs: dict[str, str] = {}
        self._reflog: dict[str, list[dict]] = {}
        self._kv: dict[bytes, bytes] = {}
        self._lock = threading.Lock()

    def has(self, oid):
        return oid in self._objects

    def get(self, oid):
        return self._objects.get(oid)

    def put_many(self, items):
        added = 0
        with self._lock:
            for oid, value in items:
                if oid not in self._objects:
                    self._objects[oid] = bytes(value)
                    added += len(value)
        return added

    def replace_many(self, items):
        change = 0
        with self._lock:
            for oid, value in items:
                if oid in self._objects:
                    change += len(value) - len(self._objects[oid])
                    self._objects[oid] = bytes(value)
        return change

    def delete_many(self, oids):
        freed = 0
        with self._lock:
            for oid in oids:
                v = self._objects.pop(oid, None)
                if v is not None:
                    freed += len(v)
        return freed

    def iter_oids(self, prefix=b""):
        return iter(sorted(o for o in list(self._objects) if o.startswith(prefix)))

    def stats(self):
        return {"objects": len(self._objects),
                "stored_bytes": sum(len(v) for v in self._objects.values())}

    def get_ref(self, name):
        return self._refs.get(name)

    def list_refs(self, prefix=""):
        return {k: v for k, v in sorted(self._refs.items()) if k.startswith(prefix)}

    def update_refs(self, updates, log):
        with self._lock:
            for name, old, _new in updates:
                if self._refs.get(name) != old:
                    raise RefConflictError(
                        f"ref {name} moved (expected {old or 'nothing'}, found "
                        f"{self._refs.get(name) or 'nothing'})")
            for name, _old, new in updates:
                if new is None:
                    self._refs.pop(name, None)
                    self._reflog.pop(name, None)
                else:
                    self._refs[name] = new
            for name, entry in log:
                if name in self._refs:
                    self._reflog.setdefault(name, []).append(entry)

    def reflog(self, name):
        return list(self._reflog.get(name, []))

    def kv_get(self, key):
        return self._kv.get(key)

    def kv_put_many(self, items):
        with self._lock:
            for k, v in items.items():
                if v is None:
                    self._kv.pop(k, None)
                else:
                    self._kv[k] = v
