"""What changed between two trees, at file and tensor level, by id only (no tensor data is read)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from ..store.objects import File, Tensor, Tree, TreeEntry

Lookup = Callable[[str, str], object]  # (oid, kind) -> object


@dataclass
class TensorChange:
    name: str
    status: str  # added | removed | modified
    old: Tensor | None
    new: Tensor | None
    stats: dict | None = None  # filled by Repo.diff(stats=True); see docs/diff-json.md


@dataclass
class FileChange:
    path: str
    status: str  # added | deleted | modified | mode
    old: TreeEntry | None
    new: TreeEntry | None
    tensors: list[TensorChange] = field(default_factory=list)
    old_size: int = 0
    new_size: int = 0


def tensor_changes(get: Lookup, old: File | None, new: File | None) -> list[TensorChange]:
    a = dict(old.tensors) if old is not None else {}
    b = dict(new.tensors) if new is not None else {}
    out = []
    # the names whose id differs, found by one set operation over the (name, id) pairs (a file
    # may hold 100,000 tensors and one changed)
    for name in sorted({name for name, _ in a.items() ^ b.items()}):
        ta, tb = a.get(name), b.get(name)
        status = "added" if ta is None else "removed" if tb is None else "modified"
        out.append(TensorChange(name, status, get(ta, "tensor") if ta else None,
                                get(tb, "tensor") if tb else None))
    return out


def diff_trees(get: Lookup, old: Tree | None, new: Tree | None, prefixes: list[str] | None = None) -> list[FileChange]:
    a = old.as_dict() if old else {}
    b = new.as_dict() if new else {}
    changes = []
    for path in sorted(a.keys() | b.keys(), key=lambda p: p.encode()):
        if prefixes and not any(path == p or path.startswith(p.rstrip("/") + "/") or not p for p in prefixes):
            continue
        ea, eb = a.get(path), b.get(path)
        if ea == eb:
            continue
        status = "added" if ea is None else "deleted" if eb is None else (
            "mode" if ea.oid == eb.oid else "modified")
        fa = get(ea.oid, "file") if ea else None
        fb = get(eb.oid, "file") if eb else None
        fc = FileChange(path, status, ea, eb, old_size=fa.size if fa else 0, new_size=fb.size if fb else 0)
        if (fa is None or fa.format == "safetensors") and (fb is None or fb.format == "safetensors"):
            fc.tensors = tensor_changes(get, fa, fb)
        changes.append(fc)
    return changes
