"""`merge` as a repository operation: fast-forward, merge commits, and the conflict state.

The conflict state (kv key ``merge``) survives between commands: the work tree holds
the merged result, with ours' values in conflicting elements, until every conflict is
resolved (`checkout --ours|--theirs -- PATH:TENSOR`) and `merge --continue` commits.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from ..errors import DirtyWorkTreeError, MvcError, UsageError
from ..progress import NULL
from ..state import KV_MERGE
from ..store.objects import DTYPES, Tree

SCRATCH = os.path.join("tmp", "merge-scratch")  # under .mvc: a running merge's chunks, for its checkout

if TYPE_CHECKING:  # the engine (and numpy) load when a merge runs: `mvc status` reads only the state
    from .engine import Conflict

@dataclass
class MergeOutcome:
    kind: str  # up-to-date | fast-forward | merged | conflicts
    commit: str | None = None
    conflicts: list[Conflict] = field(default_factory=list)
    base: str | None = None


def state(repo) -> dict | None:
    raw = repo.backend.kv_get(KV_MERGE)
    return json.loads(raw) if raw else None


def _save(repo, st: dict | None) -> None:
    repo.backend.kv_put_many({KV_MERGE: json.dumps(st).encode() if st else None})


def merge(repo, rev: str, message: str | None = None, strategy: str | None = None,
          weights: tuple[float, ...] | None = None, author: str | None = None, progress=None,
          density: float = 0.2) -> MergeOutcome:
    from .engine import Merger, check_weights, merge_bases

    w = check_weights(weights)
    theirs = repo.resolve(rev)
    ours = repo.refs.head_commit()
    st = state(repo)
    if st is not None:
        if st.get("tree") and not st["conflicts"] and st.get("kind", "merge") == "merge" and st["theirs"] == theirs:
            with repo.lock():  # the same merge, killed halfway: finish it
                return _resume(repo, st, author, progress or NULL)
        raise UsageError("a merge is in progress", hint="finish it with `mvc merge --continue` or `--abort`")
    _require_clean(repo, "merge")
    if ours is None:
        raise UsageError("cannot merge into a branch with no commits")
    with repo.lock(), _scratch(repo) as scratch:
        if theirs == ours or theirs in repo.ancestors(ours):
            return MergeOutcome("up-to-date", ours)
        if ours in repo.ancestors(theirs):
            tree = repo.odb.get(repo.commit_obj(theirs).tree, "tree")
            repo.switch_tree(tree, False, progress or NULL)
            repo.refs.move_head(theirs, ours, f"merge {rev}: fast-forward")
            return MergeOutcome("fast-forward", theirs)
        bases = merge_bases(repo, ours, theirs)
        base = bases[0] if bases else None
        base_tree = repo.odb.get(repo.commit_obj(base).tree, "tree") if base else Tree(())
        res = Merger(repo, strategy, w, density, progress or NULL, scratch).merge_trees(
            base_tree, repo.head_tree(), repo.odb.get(repo.commit_obj(theirs).tree, "tree"))
        merged = Tree.build(res.entries)
        msg = message or f"Merge {rev}"
        op = {"op": "merge", "strategy": strategy or "three-way", "base": base, "theirs": theirs,
              "params": ({"weights": list(w)} if strategy in ("average", "task-arithmetic", "ties") else {})
              | ({"density": density} if strategy == "ties" else {}),
              "metrics": {"merged_tensors": res.merged_tensors, "elements_resolved": res.elements_resolved}}
        # the state first, then the work tree, then the commit: a merge killed in between is one
        # `mvc merge` (run again), `--continue` or `--abort` from done, never a tree of unknown changes
        st = {"ours": ours, "theirs": theirs, "base": base, "message": msg, "op": op,
              "conflicts": [asdict(c) for c in res.conflicts]}
        if not res.conflicts:
            st["tree"] = repo.odb.put(merged)
        _save(repo, st)
        if res.conflicts:
            repo.switch_tree(merged, False, progress or NULL, res.locations, res.prepared)
            return MergeOutcome("conflicts", None, res.conflicts, base)
        return _resume(repo, st, author, progress or NULL, res.locations, res.prepared)


@contextlib.contextmanager
def _scratch(repo):
    """The path that a running merge's scratch files start with (.mvc/tmp/merge-scratch.N: its
    computed chunks), removed when the merge is done, and before it starts (a killed merge's)."""
    _drop_scratch(repo)
    path = os.path.join(repo.root, ".mvc", SCRATCH)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        yield path
    finally:
        _drop_scratch(repo)


def _drop_scratch(repo) -> None:
    from ..worktree import drop_scratch

    drop_scratch(os.path.join(repo.root, ".mvc", SCRATCH))


def _resume(repo, st: dict, author: str | None, progress, locations: dict | None = None,
            prepared: dict | None = None) -> MergeOutcome:
    """Finish a merge with no conflicts whose state is saved: the work tree, then the commit.
    Run again after a kill, it completes what is left (a merge that had landed is just cleared).
    The caller holds the repository lock."""
    head = repo.refs.head_commit()
    kind = st.get("kind", "merge")
    parents = (st["ours"], st["theirs"]) if kind == "merge" else (st["ours"],)
    if head != st["ours"]:
        if head is not None and repo.commit_obj(head).parents == parents and repo.commit_obj(head).op == st["op"]:
            _save(repo, None)  # it landed; only the state was left
            return MergeOutcome("merged", head, [], st["base"])
        raise UsageError("a merge is in progress, but HEAD has moved since it began",
                         hint="`mvc merge --abort`, then merge again")
    merged = repo.odb.get(st["tree"], "tree")
    if locations is None:  # resumed after a kill: what a killed merge left in its scratch goes
        _drop_scratch(repo)
    repo.switch_tree(merged, False, progress, locations, prepared)
    oid = repo.record(merged, parents, st["message"], author, st["op"], None, kind)
    _save(repo, None)
    return MergeOutcome("merged", oid, [], st["base"])


def pick(repo, rev: str, kind: str, message: str | None = None, strategy: str | None = None,
         author: str | None = None, progress=None) -> MergeOutcome:
    """Revert REV (kind "revert") or apply it again (kind "cherry-pick") as a new one-parent commit."""
    from .engine import Merger

    oid = repo.resolve(rev)
    st = state(repo)
    if st is not None:
        if st.get("tree") and not st["conflicts"] and st.get("kind") == kind and st["op"].get("of") == oid:
            with repo.lock():  # the same step, killed halfway: finish it
                return _resume(repo, st, author, progress or NULL)
        raise UsageError("a merge, revert or cherry-pick is in progress",
                         hint="finish it with `--continue` or `--abort`")
    c = repo.commit_obj(oid)
    if len(c.parents) > 1:
        raise UsageError(f"{rev} is a merge commit; reverting or picking one is not supported yet")
    ours = repo.refs.head_commit()
    if ours is None:
        raise UsageError(f"cannot {kind} onto a branch with no commits")
    _require_clean(repo, kind)
    parent_tree = repo.odb.get(repo.commit_obj(c.parents[0]).tree, "tree") if c.parents else Tree(())
    own_tree = repo.odb.get(c.tree, "tree")
    base, theirs = (own_tree, parent_tree) if kind == "revert" else (parent_tree, own_tree)
    first = c.message.strip().splitlines()[0] if c.message.strip() else ""
    msg = message or (f'Revert "{first}"\n\nThis reverts commit {oid}.' if kind == "revert"
                      else f"{first}\n\n(cherry picked from commit {oid})")
    op = {"op": kind, "of": oid, "strategy": strategy or "three-way"}
    with repo.lock():
        res = Merger(repo, strategy, progress=progress or NULL).merge_trees(base, repo.head_tree(), theirs)
        merged = Tree.build(res.entries)
        if not res.conflicts and merged.as_dict() == repo.head_tree().as_dict():
            return MergeOutcome("up-to-date", ours)
        parent = c.parents[0] if c.parents else None
        st = {"kind": kind, "ours": ours, "message": msg, "op": op,
              "base": oid if kind == "revert" else parent, "theirs": parent if kind == "revert" else oid,
              "conflicts": [asdict(x) for x in res.conflicts]}
        if not res.conflicts:
            st["tree"] = repo.odb.put(merged)
        _save(repo, st)  # first, as for a merge: a step killed halfway is finished by running it again
        if res.conflicts:
            repo.switch_tree(merged, False, progress or NULL)
            return MergeOutcome("conflicts", None, res.conflicts)
        return _resume(repo, st, author, progress or NULL)


def _require_clean(repo, what: str) -> None:
    """Tracked files must be unmodified; untracked files stay (as in Git: the result is built
    from trees, and a checkout never overwrites an untracked file)."""
    st = repo.status()
    if st.modified or st.deleted:
        raise DirtyWorkTreeError(f"cannot {what} with uncommitted changes")


def abort(repo) -> None:
    st = state(repo)
    if st is None:
        raise UsageError("no merge in progress")
    with repo.lock():
        _drop_scratch(repo)
        repo.switch_tree(_tree(repo, st["ours"]), True, NULL)
    _save(repo, None)


def resolve(repo, spec: str, side: str) -> None:
    """Settle one conflict (PATH or PATH:TENSOR) with ours' or theirs' values."""
    st = state(repo)
    if st is None:
        raise UsageError("no merge in progress")
    path, _, tensor = spec.partition(":")
    path = repo.worktree.rel_from_cwd(path, repo.cwd)
    left = [c for c in st["conflicts"] if c["path"] == path and (c["tensor"] or "") == tensor]
    if not left:
        raise UsageError(f"{spec}: not a conflict of this merge (see `mvc status`)")
    c = left[0]
    with repo.lock():
        rev = st["ours"] if side == "ours" else st["theirs"]
        if c["tensor"] is None or c["elements"] == 0:
            if side == "theirs" or c["tensor"] is None:
                _restore_whole(repo, rev, path, c["tensor"])
        elif side == "theirs":
            _write_tensor_elements(repo, st, path, c["tensor"])
    st["conflicts"] = [x for x in st["conflicts"] if x is not c]
    _save(repo, st)


def _tree(repo, rev: str | None) -> Tree:
    return repo.odb.get(repo.commit_obj(rev).tree, "tree") if rev else Tree(())


def _restore_whole(repo, rev: str | None, path: str, tensor: str | None) -> None:
    if tensor is None:
        entry = _tree(repo, rev).as_dict().get(path)
        if entry is None:
            repo.worktree.remove(path)
        else:
            repo.write_entries([entry], NULL)
        return
    raise UsageError(f"{path}:{tensor}: pick a whole-tensor conflict with `--ours` or edit the file",
                     hint="whole-tensor conflicts (a shape change or deletion) are resolved by committing a choice")


def _write_tensor_elements(repo, st: dict, path: str, name: str) -> None:
    """Overwrite the conflicting elements of one tensor in the work-tree file with theirs' values."""
    import numpy as np

    from ..formats import safetensors as stf
    from ..pipeline import Materializer
    from .engine import _UINT

    ids = {}
    for key in ("base", "ours", "theirs"):
        f = repo.odb.get(_tree(repo, st[key]).as_dict()[path].oid, "file")
        ids[key] = repo.odb.get(dict(f.tensors)[name], "tensor")
    full = repo.worktree.abspath(path)
    with open(full, "r+b") as fh:
        _raw, header = stf.read_header(fh, os.fstat(fh.fileno()).st_size, path)
        entry = next((e for e in header.entries if e.name == name), None)
        if entry is None or (entry.dtype, entry.shape) != (ids["ours"].dtype, ids["ours"].shape):
            raise MvcError(f"{path}:{name} no longer matches the merge; check it out again or abort")
        view = _UINT[DTYPES[entry.dtype][0]]
        with Materializer(repo.odb, workers=repo.workers) as mat:
            streams = [mat.chunks(ids[k].chunks) for k in ("base", "ours", "theirs")]
            pos = header.header_size + entry.begin
            for cb, co, ct in zip(*streams, strict=True):
                fh.seek(pos)
                cur = np.frombuffer(fh.read(len(co)), dtype=view).copy()
                vb, vo, vt = (np.frombuffer(v, dtype=view) for v in (cb, co, ct))
                clash = (vo != vb) & (vt != vb) & (vo != vt)
                cur[clash] = vt[clash]
                fh.seek(pos)
                fh.write(cur.tobytes())
                pos += len(co)


def continue_(repo, author: str | None = None) -> str:
    st = state(repo)
    if st is None:
        raise UsageError("no merge in progress")
    if st["conflicts"]:
        names = ", ".join(f"{c['path']}:{c['tensor']}" if c["tensor"] else c["path"] for c in st["conflicts"][:5])
        raise MvcError(f"{len(st['conflicts'])} conflict(s) left: {names}",
                       hint="resolve each with `mvc checkout --ours|--theirs -- PATH:TENSOR`")
    if st.get("tree"):
        with repo.lock():
            return _resume(repo, st, author, NULL).commit
    extra = (st["theirs"],) if st.get("kind", "merge") == "merge" else ()
    oid = repo.commit(st["message"], author=author, allow_empty=True, op=st["op"], parents_extra=extra)
    _save(repo, None)
    return oid

