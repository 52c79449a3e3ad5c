"""Git diff and merge drivers for files tracked through the mvc filter.

Git hands these drivers blob contents (pointers) or work-tree files (real model files);
both are accepted: a pointer is looked up in the store, a real file is hashed in place.
"""

from __future__ import annotations

import os

from ...diff.stats import fill_stats
from ...diff.trees import FileChange, tensor_changes
from ...errors import MvcError
from ...pipeline import Ingestor, Scratch
from ...store.objects import MODE_FILE, File, Tree
from ...store.odb import ObjectDB
from .pointer import parse


class _View:
    """File objects of pointers (from the store) or real files (hashed, data read in place)."""

    def __init__(self, odb: ObjectDB):
        self.odb = odb
        self.scratch = Scratch()
        self.locations: dict = {}

    def file(self, path: str, name: str) -> File | None:
        if path == "/dev/null" or not os.path.exists(path):
            return None
        with open(path, "rb") as f:
            head = f.read(1025)
        ptr = parse(head)
        if ptr is not None:
            if not self.odb.has(ptr.oid):
                raise MvcError(f"object {ptr.oid[:12]} for {name} is missing from the mvc store")
            return self.odb.get(ptr.oid, "file")
        with Ingestor(self.odb, store=False) as ing:
            oid = ing.ingest(path, name)
        self.scratch.update(ing.scratch)
        self.locations.update(ing.locations)
        return self.scratch[oid]

    def get(self, oid: str, kind: str):
        return self.scratch.get(oid) or self.odb.get(oid, kind)


def diff_files(odb: ObjectDB, name: str, old: str, new: str) -> FileChange:
    """mvc's per-tensor statistics between two versions of one tracked file."""
    view = _View(odb)
    fa, fb = view.file(old, name), view.file(new, name)
    status = "added" if fa is None else "deleted" if fb is None else "modified"
    fc = FileChange(name, status, None, None, old_size=fa.size if fa else 0, new_size=fb.size if fb else 0)
    if (fa is None or fa.format == "safetensors") and (fb is None or fb.format == "safetensors"):
        fc.tensors = tensor_changes(view.get, fa, fb)
        fill_stats(odb, [fc], view.locations)
    return fc


def textconv_lines(odb: ObjectDB, path: str, name: str) -> list[str]:
    """One line per tensor (name, dtype, shape, short id): what `git log -p` shows for a model."""
    view = _View(odb)
    f = view.file(path, name)
    if f is None:
        return []
    if f.format != "safetensors":
        return [f"{name}: {f.size} bytes (not safetensors)"]
    out = []
    for tname, tid in f.tensors:
        t = view.get(tid, "tensor")
        out.append(f"{tname}  {t.dtype}{list(t.shape)}  {tid[:12]}")
    return out


def merge_pointers(repo_like, name: str, base: bytes, ours: bytes, theirs: bytes,
                   strategy: str | None = None) -> tuple[bytes | None, list]:
    """Three-way merge of three pointers; (merged pointer or None on conflict, conflicts)."""
    from ...merge.engine import Merger
    from .pointer import Pointer

    def tree(data: bytes) -> Tree:
        p = parse(data)
        if p is None:
            if data:
                raise MvcError(f"{name}: not an mvc pointer; was the file committed without the filter?")
            return Tree(())
        return Tree.build({name: (MODE_FILE, p.oid)})

    res = Merger(repo_like, strategy).merge_trees(tree(base), tree(ours), tree(theirs))
    if res.conflicts:
        return None, res.conflicts
    entry = res.entries.get(name)
    if entry is None:
        return b"", []
    size = repo_like.odb.get(entry[1], "file").size
    return Pointer(entry[1], size).encode(), []

