"""Which mvc objects a Git repository needs: every pointer reachable from its refs and index (pygit2)."""

from __future__ import annotations

import contextlib
import os

from ...graph import StoreView, reachable
from ...locking import file_lock
from ...maintenance import FsckReport
from .pointer import MAX_SIZE, parse


class _Pointers:
    """Pointers in Git trees (each tree read once), as file object id -> where Git names it."""

    def __init__(self, repo):
        self.repo = repo
        self.out: dict[str, str] = {}
        self.seen_trees: set = set()

    def blob(self, oid, where: str) -> None:
        obj = self.repo[oid]
        if obj.size <= MAX_SIZE:
            p = parse(obj.data)
            if p is not None:
                self.out.setdefault(p.oid, where)

    def tree(self, tree, prefix: str, label: str) -> None:
        stack = [(tree, prefix)]
        while stack:
            t, pre = stack.pop()
            if t.id in self.seen_trees:
                continue
            self.seen_trees.add(t.id)
            for entry in t:
                if entry.type_str == "tree":
                    stack.append((self.repo[entry.id], pre + entry.name + "/"))
                elif entry.type_str == "blob":
                    self.blob(entry.id, f"{label}:{pre}{entry.name}")

    def commits(self, tips, hide=()) -> None:
        """Every commit reachable from *tips* and not from *hide* (ids of commits, or of tags,
        which are peeled; anything else is passed over)."""
        import pygit2

        def peeled(ids):
            for oid in ids:
                with contextlib.suppress(pygit2.GitError, KeyError, ValueError, TypeError):
                    yield self.repo[oid].peel(pygit2.Commit).id

        tips = list(peeled(tips))
        if not tips:
            return
        walker = self.repo.walk(tips[0], pygit2.enums.SortMode.NONE)
        for t in tips[1:]:
            walker.push(t)
        for h in peeled(hide):
            walker.hide(h)
        for c in walker:
            self.tree(c.tree, "", str(c.id)[:12])


def _repository(gitdir: str):
    import pygit2

    return pygit2.Repository(gitdir)


def reachable_pointers(gitdir: str) -> dict[str, str]:
    """file object id -> where Git names it ("<commit>:<path>" or "index:<path>"), for every
    commit reachable from a ref or HEAD, and the index."""
    import pygit2

    repo = _repository(gitdir)
    walk = _Pointers(repo)
    tips = set()
    for name in repo.references:
        with contextlib.suppress(pygit2.GitError, KeyError, ValueError):
            tips.add(repo.references[name].peel(pygit2.Commit).id)
    with contextlib.suppress(pygit2.GitError):
        tips.add(repo.head.peel(pygit2.Commit).id)
    walk.commits(sorted(tips, key=str))
    for entry in repo.index:
        walk.blob(entry.id, f"index:{entry.path}")
    return walk.out


def pointers_at(gitdir: str, revs: list[str]) -> dict[str, str]:
    """The pointers in the trees of *revs* (revisions Git understands) only, not their history."""
    import pygit2

    from ...errors import UnknownRevisionError

    repo = _repository(gitdir)
    walk = _Pointers(repo)
    for rev in revs:
        try:
            commit = repo.revparse_single(rev).peel(pygit2.Commit)
        except (KeyError, ValueError, pygit2.GitError) as e:
            raise UnknownRevisionError(f"unknown Git revision {rev!r}") from e
        walk.tree(commit.tree, "", rev)
    return walk.out


def pointers_to_push(gitdir: str, git_remote: str, updates: list[tuple[str, str]]) -> dict[str, str]:
    """The pointers in the commits a push sends: reachable from each update's local commit and
    not from its remote commit or any refs/remotes/<git_remote>/* (what the remote has already)."""
    import pygit2

    repo = _repository(gitdir)
    walk = _Pointers(repo)
    hide = [pygit2.Oid(hex=r) for _, r in updates if r.strip("0")]
    prefix = f"refs/remotes/{git_remote}/"
    for name in repo.references:
        if name.startswith(prefix):
            with contextlib.suppress(pygit2.GitError, KeyError, ValueError):
                hide.append(repo.references[name].peel(pygit2.Commit).id)
    tips = [pygit2.Oid(hex=local) for local, _ in updates if local.strip("0")]
    walk.commits(tips, hide)
    return walk.out


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
