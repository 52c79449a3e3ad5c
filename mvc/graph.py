"""The object graph: what names what (children), what refs keep alive (ref_roots), and walks over it
(closure for remote/patch/filter transfers, reachable for fsck and gc)."""

from __future__ import annotations

from .errors import MvcError
from .refs import HEAD
from .store.codec import links


class StoreView:
    """The little of a Repo that walks and merges need, over a bare object store (Git's .git/mvc)."""

    def __init__(self, odb, workers: int | None = None):
        self.odb = odb
        self.workers = workers

    def delta_bases(self, commits):
        """A bare store has no config to raise to format 2: it stores new chunks in full."""
        return None


def with_delta_bases(backend, keep: set[bytes]) -> set[bytes]:
    """*keep* and every chunk that a kept delta is stored against, transitively: gc never drops a base."""
    out = set(keep)
    stack = list(keep)
    while stack:
        stored = backend.get(stack.pop())
        for base in links(stored) if stored is not None else ():
            if base not in out:
                out.add(base)
                stack.append(base)
    return out


def ref_roots(repo) -> dict[str, str]:
    """Commit ids named by refs, HEAD and reflogs: what must stay reachable."""
    roots = {}
    for name, value in repo.backend.list_refs("").items():
        if not value.startswith("ref: "):
            roots.setdefault(value, name)
        for entry in repo.backend.reflog(name):
            for k in ("old", "new"):
                if entry.get(k):
                    roots.setdefault(entry[k], f"reflog of {name}")
    head = repo.backend.get_ref(HEAD)
    if head and not head.startswith("ref: "):
        roots.setdefault(head, HEAD)
    return roots


def children(kind: str, obj) -> list[tuple[str, str]]:
    if kind == "commit":
        return [(obj.tree, "tree")] + [(p, "commit") for p in obj.parents]
    if kind == "tree":
        return [(e.oid, "file") for e in obj.entries]
    if kind == "file":
        return [(c, "chunk") for c in obj.chunks] + [(t, "tensor") for _n, t in obj.tensors]
    if kind == "tensor":
        return [(c, "chunk") for c in obj.chunks]
    return []


def closure(get, roots, skip=None) -> dict[str, str]:
    """Object id -> kind for everything reachable from *roots* [(id, kind)], reading metadata with
    get(id, kind). An object for which skip(id) is true is left out, and so is what only it names."""
    out: dict[str, str] = {}
    stack = list(roots)
    while stack:
        oid, kind = stack.pop()
        if oid in out or (skip is not None and skip(oid)):
            continue
        out[oid] = kind
        if kind != "chunk":
            stack.extend(children(kind, get(oid, kind)))
    return out


def reachable(repo, report=None, roots: dict[str, str] | None = None,
              root_kind: str = "commit") -> set[str]:
    """Ids reachable from the roots (commits, or *root_kind* objects). Missing or damaged objects
    are noted in *report* (or raise)."""
    seen: set[str] = set()
    stack = [(oid, root_kind, who) for oid, who in (ref_roots(repo) if roots is None else roots).items()]
    while stack:
        oid, kind, who = stack.pop()
        if oid in seen:
            continue
        seen.add(oid)
        if kind == "chunk":
            if not repo.odb.has(oid):
                if getattr(repo.odb, "fetcher", None) is not None:
                    if report is not None:
                        report.not_fetched += 1  # a lazy clone: it stays on the remote until needed
                    continue
                if report is None:
                    raise MvcError(f"chunk {oid} (named by {who}) is missing")
                report.missing[oid] = who
            continue
        try:
            obj = repo.odb.get(oid, kind)
        except MvcError as e:
            if report is None:
                raise
            if repo.odb.has(oid):
                report.corrupt[oid] = str(e)
            else:
                report.missing[oid] = f"{kind} named by {who}"
            continue
        for child, ckind in children(kind, obj):
            stack.append((child, ckind, f"{kind} {oid[:12]}"))
    return seen


def commits_oldest_first(repo, roots) -> list[str]:
    """Every commit reachable from *roots*, parents before children."""
    out: list[str] = []
    done: set[str] = set()
    for root in roots:
        stack = [(root, False)]
        while stack:
            oid, expanded = stack.pop()
            if oid in done:
                continue
            if expanded:
                done.add(oid)
                out.append(oid)
                continue
            stack.append((oid, True))
            stack.extend((p, False) for p in repo.commit_obj(oid).parents if p not in done)
    return out


def added_by(repo, commit: str) -> dict:
    """What a commit added to the store over its parents: objects, their stored bytes and the raw
    bytes of its new chunks (stored / raw shows what compression and delta coding saved)."""
    from .store.codec import NAMES

    c = repo.commit_obj(commit)
    seen: set[str] = set()
    for p in c.parents:
        seen.update(closure(repo.odb.get, [(repo.commit_obj(p).tree, "tree")]))
    mine = closure(repo.odb.get, [(c.tree, "tree")], skip=seen.__contains__)
    out = {"objects": len(mine), "stored": 0, "raw": 0, "encodings": {}}
    sizes = {}
    for oid, kind in mine.items():
        if kind == "tensor":
            t = repo.odb.get(oid, "tensor")
            for i, ch in enumerate(t.chunks):
                sizes[ch] = min(t.chunk_size, t.nbytes - i * t.chunk_size)
    for oid, kind in mine.items():
        stored = repo.backend.get(bytes.fromhex(oid))
        if stored is None:
            continue
        out["stored"] += len(stored)
        if kind == "chunk":
            out["raw"] += sizes.get(oid, 0)
            name = NAMES.get(stored[1], "?")
            out["encodings"][name] = out["encodings"].get(name, 0) + 1
    return out
