"""A clone writes its work tree while it fetches.

Every chunk a fetch downloads is decoded to be verified; a clone then checks the branch out and
decodes it all again. A Prefill keeps the first decode: once the metadata is in, it lays out
each file of the commit the clone will check out in a scratch file (``.mvc/tmp/clone.N``), and
each verified chunk of those files is written at its places there. The checkout then writes
only what is missing (chunks the store already had, small ones), verifies the written chunks
in place, and moves each scratch file into the work tree (Repo.write_entries, *prepared*).
"""

from __future__ import annotations

import contextlib
import os
import threading

from ..pipeline import _INLINE_BELOW, _Misfit, header_places, tensor_places
from ..store.packs import pwrite_all
from ..worktree import drop_scratch

SCRATCH = os.path.join("tmp", "clone")  # under .mvc: .mvc/tmp/clone.N, one per file
MAX_FILES = 64  # files laid out at once (each holds a descriptor open); the rest are checked out as ever


def default_branch(tips: dict[str, str]) -> str:
    """The branch a clone checks out: main, else the first by name."""
    return "main" if "main" in tips else sorted(tips)[0]


class Prefill:
    def __init__(self, root: str):
        self.prefix = os.path.join(root, ".mvc", SCRATCH)
        self.tip: str | None = None  # the commit that will be checked out (choose())
        #: chunk id -> [(fd, offset, length)] of every place it has in the scratch files
        self._places: dict[str, list[tuple[int, int]]] = {}
        self._fds: list[int] = []
        self._path_of: dict[int, str] = {}
        #: what Repo.write_entries takes: chunk id -> (scratch file, offset, length); path -> scratch
        self.locations: dict[str, tuple[str, int, int]] = {}
        self.prepared: dict[str, str] = {}
        # one writer at a time: the fetch's threads wait on this (asleep), not on the file's own
        # lock (where the kernel spins them on the other core)
        self._lock = threading.Lock()
        self.drop()

    def choose(self, tips: dict[str, str]) -> None:
        self.tip = tips[default_branch(tips)] if tips else None

    def plan(self, get) -> None:
        """Lay out the files of the chosen commit; *get(oid, kind)* gives a parsed metadata object
        (downloaded, not stored yet, or in the store). Chunks under _INLINE_BELOW bytes are left
        to the checkout (it writes runs of small ones in bulk)."""
        if self.tip is None:
            return
        tree = get(get(self.tip, "commit").tree, "tree")
        for entry in tree.entries:
            if len(self.prepared) >= MAX_FILES:
                break
            f = get(entry.oid, "file")
            tensors = [get(tid, "tensor") for _name, tid in f.tensors]
            head = f.size - sum(t.nbytes for t in tensors)
            try:
                places = header_places(f, head)
            except _Misfit:
                continue  # not the layout a checkout writes: it is written the usual way
            offset = head
            for t in tensors:
                for c, at, n in tensor_places(t, offset):
                    places.append((c, at, n))
                    offset = at + n
            big = [p for p in places if p[2] >= _INLINE_BELOW]
            if not big:
                continue
            path = f"{self.prefix}.{len(self.prepared)}"
            try:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o666)
            except OSError:
                continue
            self._fds.append(fd)
            self._path_of[fd] = path
            self.prepared[entry.path] = path
            for c, at, n in big:
                self._places.setdefault(c, []).append((fd, at, n))

    def put(self, oid: str, content) -> None:
        """Write the verified *content* of chunk *oid* at each of its places (a length that does not
        fit is left to the checkout, which then names it). Thread-safe."""
        places = self._places.pop(oid, ())
        if not places:
            return
        with self._lock:
            for fd, at, n in places:
                if len(content) != n:
                    continue
                try:
                    pwrite_all(fd, [content], at)
                except OSError:  # a full disk: the checkout writes it
                    continue
                self.locations.setdefault(oid, (self._path_of[fd], at, n))

    def close(self) -> None:
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds = []

    def drop(self) -> None:
        """Remove the scratch files (what a checkout did not move into the work tree, or a killed
        clone's)."""
        self.close()
        drop_scratch(self.prefix)
