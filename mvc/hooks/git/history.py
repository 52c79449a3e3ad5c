"""Which mvc objects a Git repository needs: every pointer reachable from its refs and index (pygit2)."""

from __future__ import annotations

import contextlib
import os

from ...graph import StoreView, reachable
from ...locking import file_lock
from ...maintenance import FsckReport
from .pointer import MAX_SIZE, parse


def reachable_pointers(gitdir: str) -> dict[str, str]:
    """file object id -> where Git names it ("<commit>:<path>" or "index:<path>")."""
    import pygit2

    repo = pygit2.Repository(gitdir)
    out: dict[str, str] = {}
    seen_trees: set = set()

    def blob_pointer(oid, where):
        obj = repo[oid]
        if obj.size <= MAX_SIZE:
            p = parse(obj.data)
            if p is not None:
                out.setdefault(p.oid, where)

    def walk_tree(tree, prefix, commit):
        if tree.id in seen_trees:
            return
        seen_trees.add(tree.id)
        for entry in tree:
            if entry.type_str == "tree":
                walk_tree(repo[entry.id], prefix + entry.name + "/", commit)
            elif entry.type_str == "blob":
                blob_pointer(entry.id, f"{commit}:{prefix}{entry.name}")

    tips = set()
    for name in repo.references:
        with contextlib.suppress(pygit2.GitError, KeyError, ValueError):
            tips.add(repo.references[name].peel(pygit2.Commit).id)
    with contextlib.suppress(pygit2.GitError):
        tips.add(repo.head.peel(pygit2.Commit).id)
    seen_commits: set = set()
    stack = list(tips)
    while stack:
        cid = stack.pop()
        if cid in seen_commits:
            continue
        seen_commits.add(cid)
        c = repo[cid]
        walk_tree(c.tree, "", str(cid)[:12])
        stack.extend(c.parent_ids)
    for entry in repo.index:
        blob_pointer(entry.id, f"index:{entry.path}")
    return out


def store_lock(gitdir: str, exclusive: bool):
    """Filters share the store; gc excludes them (so it never deletes what a clean just wrote)."""
    os.makedirs(os.path.join(gitdir, "mvc"), exist_ok=True)
    return file_lock(os.path.join(gitdir, "mvc", "lock"), exclusive,
                     busy="a git command is using the mvc store right now")


def git_fsck(odb, gitdir: str) -> FsckReport:
    rep = FsckReport()
    pointers = reachable_pointers(gitdir)
    rep.objects = len(pointers)
    reachable(StoreView(odb), rep, roots=pointers, root_kind="file")
    return rep


def git_gc(odb, gitdir: str, dry_run: bool = False) -> tuple[int, int, int]:
    """(objects kept, objects removed, stored bytes freed)."""
    with store_lock(gitdir, exclusive=True):
        keep = {bytes.fromhex(o) for o in reachable(StoreView(odb), None, roots=reachable_pointers(gitdir),
                                                     root_kind="file")}
        drop = [o for o in odb.backend.iter_oids() if o not in keep]
        if dry_run:
            freed = sum(len(odb.backend.get(o) or b"") for o in drop)
        else:
            freed = sum(odb.backend.delete_many(drop[i:i + 1024]) for i in range(0, len(drop), 1024))
        return len(keep), len(drop), freed
