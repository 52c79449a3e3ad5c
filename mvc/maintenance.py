"""fsck (verify every object and every reference), gc (drop what no ref reaches) and repack
(choose delta bases anew; the branch heads whole)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import MvcError, UnsafePathError
from .graph import reachable, with_delta_bases
from .store.objects import parse_object


@dataclass
class FsckReport:
    objects: int = 0
    corrupt: dict[str, str] = field(default_factory=dict)  # oid -> what is wrong
    missing: dict[str, str] = field(default_factory=dict)  # oid -> who names it
    bad_refs: dict[str, str] = field(default_factory=dict)
    not_fetched: int = 0  # chunks a lazy clone has not downloaded yet

    @property
    def ok(self) -> bool:
        return not (self.corrupt or self.missing or self.bad_refs)


def fsck(repo, progress=None) -> FsckReport:
    rep = FsckReport()
    store = _Paged(repo.backend)
    for oid in repo.backend.iter_oids():
        rep.objects += 1
        try:
            stored = store.get(oid)  # a packed value whose pack is truncated or gone fails here
            if stored is None:
                continue
            kind, content = repo.odb.decode(oid, stored)
            if kind != "chunk":
                parse_object(kind, bytes(content), oid.hex())
        except (MvcError, UnsafePathError) as e:
            rep.corrupt[oid.hex()] = str(e)
            continue
        if progress is not None:
            progress.advance(nbytes=len(stored))
    for name, value in repo.backend.list_refs("").items():
        if value.startswith("ref: "):
            continue
        if not repo.odb.has(value):
            rep.bad_refs[name] = f"points to missing commit {value}"
    reachable(repo, rep)
    return rep


@dataclass
class GcReport:
    kept: int
    removed: int
    freed_bytes: int  # stored bytes of the removed objects
    packs_rewritten: int = 0  # pack files whose live values were moved (compact_packs)
    disk_freed: int = 0  # bytes of pack files given back to the file system


#: gc rewrites a pack once a fifth of it is garbage; repack, a full rewrite that leaves the old
#: encodings behind as garbage, rewrites every pack that holds any
GC_MIN_LIVE, REPACK_MIN_LIVE = 0.8, 1.0


def compact_packs(repo, min_live: float):
    """The backend's pack compaction (LMDB with packs), or None for a backend without packs."""
    compact = getattr(repo.backend, "compact", None)
    return compact(min_live) if compact is not None else None


def gc(repo, dry_run: bool = False) -> GcReport:
    with repo.lock(), repo.store_lock(exclusive=True):
        rep = _gc(repo, dry_run)
        if not dry_run:
            packs = compact_packs(repo, GC_MIN_LIVE)
            if packs is not None:
                rep.packs_rewritten, rep.disk_freed = packs.rewritten, packs.freed_bytes
    return rep


def _gc(repo, dry_run: bool) -> GcReport:
    """Delete what no ref, HEAD or reflog reaches (the caller holds gc's locks)."""
    keep = reachable(repo)
    pending = _unfinished_merge_tree(repo)
    if pending:  # a merge killed between saving its state and committing: `mvc merge` finishes it
        keep |= reachable(repo, None, roots={pending: "an unfinished merge"}, root_kind="tree")
    keep_bytes = with_delta_bases(repo.backend, {bytes.fromhex(o) for o in keep})
    drop = [o for o in repo.backend.iter_oids() if o not in keep_bytes]
    freed = 0
    if not dry_run:
        for i in range(0, len(drop), 1024):
            freed += repo.backend.delete_many(drop[i:i + 1024])
    else:
        freed = sum(len(repo.backend.get(o) or b"") for o in drop)
    return GcReport(repo.backend.stats()["objects"] - (len(drop) if dry_run else 0), len(drop), freed)


def _unfinished_merge_tree(repo) -> str | None:
    import json

    from .state import KV_MERGE
    from .store.ids import is_hex_oid

    raw = repo.backend.kv_get(KV_MERGE)
    try:
        tree = json.loads(raw).get("tree") if raw else None
    except (ValueError, AttributeError):
        return None
    return tree if is_hex_oid(tree) else None


class _Paged:
    """A backend whose mapped pages are handed back every 64 MiB read or written: a pass over the
    whole store (fsck, repack) touches all of the map, which would otherwise stay in its RSS."""

    def __init__(self, backend):
        self.backend = backend
        self._since = 0

    def get(self, oid):
        v = self.backend.get(oid)
        self._count(len(v) if v is not None else 0)
        return v

    def replace_many(self, items) -> int:
        items = list(items)
        change = self.backend.replace_many(items)
        self._count(sum(len(v) for _, v in items))
        return change

    def _count(self, n: int) -> None:
        self._since += n
        if self._since >= 64 << 20:
            self._since = 0
            self.backend.release_pages()


@dataclass
class RepackReport:
    chunks: int = 0  # chunks of tensors examined
    rewritten: int = 0  # stored with a new encoding
    tips_whole: int = 0  # chunks of branch heads made whole by turning their delta chain around
    before: int = 0  # stored bytes of the examined chunks, before and after
    after: int = 0
    packs_rewritten: int = 0  # pack files whose live values were moved (compact_packs)
    disk_freed: int = 0  # bytes of pack files given back to the file system


def repack(repo, max_depth: int | None = None, progress=None) -> RepackReport:
    """Choose bases and encodings anew for every chunk of every tensor reachable from the refs.

    Commits are visited oldest first, and a chunk may only be stored against a chunk visited before
    it, so no chain ever loops and every transaction leaves a store in which each value decodes:
    a repack killed at any moment loses nothing. Chains stay within *max_depth* (default: the
    repository's delta.max_depth). Then the chains under the branch heads are turned around so
    that the heads are stored whole (_tips_whole), and every delta's depth is made true again."""
    from .delta import DeltaBases, with_ancestors
    from .graph import commits_oldest_first, ref_roots
    from .pipeline import CHUNK_SIZE, encode_with_bases
    from .store.objects import DTYPES

    rep = RepackReport()
    repo.odb.keep_links = True  # the candidate bases of a chunk often share one chain
    store = _Paged(repo.backend)
    with repo.lock(), repo.store_lock(exclusive=True):
        cfg = repo.delta_bases([])
        depth = max_depth if max_depth is not None else (cfg.max_depth if cfg is not None else 0)
        visited: set[str] = set()
        batch, size = [], 0
        for commit in commits_oldest_first(repo, list(ref_roots(repo))):
            c = repo.commit_obj(commit)
            bases = DeltaBases(repo.odb, with_ancestors(repo.odb, list(c.parents)), depth)
            for entry in repo.odb.get(c.tree, "tree").entries:
                f = repo.odb.get(entry.oid, "file")
                for name, tid in f.tensors:
                    t = repo.odb.get(tid, "tensor")
                    fsize, is_float = DTYPES[t.dtype]
                    fs = fsize if is_float and fsize > 1 else 0
                    cands = bases.chunks_for(entry.path, name, t.dtype, t.shape, CHUNK_SIZE) if depth else []
                    predict = _prediction(repo, bases, entry.path, f, name, t) if depth else None
                    for i, ch in enumerate(t.chunks):
                        if ch in visited:
                            continue
                        visited.add(ch)
                        mine = [cc[i] for _, cc in cands if i < len(cc) and cc[i] in visited and cc[i] != ch]
                        old = store.get(bytes.fromhex(ch))
                        if old is None:
                            continue  # a lazy clone's unfetched chunk
                        old = bytes(old)
                        _, data = repo.odb.decode(bytes.fromhex(ch), old, "chunk")
                        pred = predict(i, len(data)) if predict is not None else None
                        if pred is not None and not all(b in visited for b in pred.bases):
                            pred = None  # only against what is re-encoded already: no chain can loop
                        new = encode_with_bases(repo.odb, data, fs, list(dict.fromkeys(mine)), depth, pred)
                        rep.chunks += 1
                        rep.before += len(old)
                        rep.after += len(new)
                        if new != old:  # also when the old value's base comes later: it must not stay
                            batch.append((bytes.fromhex(ch), new))
                            size += len(new)
                            rep.rewritten += 1
                        if progress is not None:
                            progress.advance(nbytes=len(data))
                        if size >= 64 << 20:
                            store.replace_many(batch)
                            batch, size = [], 0
        store.replace_many(batch)
        if depth:
            rep.tips_whole, change = _tips_whole(repo, store, _tip_chunks(repo))
            rep.after += change + _fix_depths(repo, store, visited, depth)
        packs = compact_packs(repo, REPACK_MIN_LIVE)  # the values replaced above are garbage in their packs
        if packs is not None:
            rep.packs_rewritten, rep.disk_freed = packs.rewritten, packs.freed_bytes
    repo.backend.release_pages()
    return rep


def _tip_chunks(repo) -> list[str]:
    """The tensor chunks of HEAD's commit, then of every branch head: what checkouts read most."""
    from .state import HEADS

    tips = [repo.refs.head_commit(), *repo.backend.list_refs(HEADS).values()]
    out: dict[str, None] = {}
    for commit in dict.fromkeys(t for t in tips if t):
        for entry in repo.odb.get(repo.commit_obj(commit).tree, "tree").entries:
            for _name, tid in repo.odb.get(entry.oid, "file").tensors:
                out.update(dict.fromkeys(repo.odb.get(tid, "tensor").chunks))
    return list(out)


def _tips_whole(repo, store: _Paged, tips: list[str]) -> tuple[int, int]:
    """Turn delta chains around so that the chunks of the branch heads are stored whole, as Git's
    repack keeps the newest version of a file whole: checking out the tip then decodes nothing
    but itself, and older versions pay the chain. A chain is turned only where that costs no
    space: every link a DIFF (a difference is as small read backwards) down to a whole chunk that
    is no tip's, which then becomes the far end. Each chain is rewritten in one transaction, the
    tip first, each link against the one before it: no state in between fails to decode.
    Returns (how many tip chunks were made whole, the change in stored bytes)."""
    from .store import codec
    from .store.odb import CHUNK

    tip_set = set(tips)
    done = change = 0
    for tip in tips:
        chain, stored = [tip], store.get(bytes.fromhex(tip))
        while stored is not None and stored[1] == codec.DIFF:
            base = codec.delta_base(stored)[0].hex()
            if base in tip_set or base in chain:
                stored = None
                break
            chain.append(base)
            stored = store.get(bytes.fromhex(base))
        if stored is None or len(chain) == 1 or codec.delta_base(stored) is not None:
            continue  # a tip stored whole already, or a chain that cannot be turned for free
        k, is_float = codec.delta_k(store.get(bytes.fromhex(tip)))
        contents = {}
        for oid in reversed(chain):  # the whole end first, then up to the tip, each verified
            contents[oid] = repo.odb.chunk_elements(bytes.fromhex(oid), k)
        values = [(bytes.fromhex(tip), codec.encode(CHUNK, contents[tip].tobytes(), k if is_float and k > 1 else 0))]
        for i in range(1, len(chain)):
            values.append((bytes.fromhex(chain[i]), codec.encode_diff(
                CHUNK, contents[chain[i]], contents[chain[i - 1]], k, is_float, bytes.fromhex(chain[i - 1]), i)))
        change += store.replace_many(values)
        done += 1
    return done, change


def _true_depth(backend, oid: bytes, memo: dict, seen: tuple = ()) -> int:
    """How many deltas lie under the stored value of *oid*, following the links themselves."""
    from .store import codec

    if oid not in memo:
        if oid in seen or len(seen) > 64:
            raise MvcError(f"the delta chain of {oid.hex()} loops; run `mvc fsck`")
        stored = backend.get(oid)
        links = codec.links(stored) if stored is not None else []
        memo[oid] = 1 + max(_true_depth(backend, b, memo, (*seen, oid)) for b in links) if links else 0
    return memo[oid]


def _fix_depths(repo, store: _Paged, chunks, max_depth: int) -> int:
    """Turning chains around moves the links under other deltas: write each delta's true depth
    into its header again, and store whole (rare) any value that now lies deeper than *max_depth*.
    Returns the change in stored bytes."""
    from .store import codec

    change = 0
    for _round in range(3):
        memo: dict[bytes, int] = {}
        patch, size, too_deep = [], 0, []
        for ch in chunks:
            oid = bytes.fromhex(ch)
            stored = store.get(oid)
            if stored is None or codec.delta_base(stored) is None:
                continue
            d = _true_depth(store, oid, memo)
            if d > max_depth:
                too_deep.append(oid)
            elif stored[34] != d:
                patch.append((oid, bytes(stored[:34]) + bytes((d,)) + bytes(stored[35:])))
                size += len(stored)
                if size >= 64 << 20:  # a depth is only a header's number: any batch is a sound state
                    store.replace_many(patch)
                    patch, size = [], 0
        store.replace_many(patch)
        if not too_deep:
            return change
        change += store.replace_many([(oid, repo.odb.standalone(oid.hex())) for oid in too_deep])
    return change


def _prediction(repo, bases, path: str, f, name: str, t):
    """Repack's view of Ingestor._prediction: int8 ``X.qweight`` beside ``X.scales`` in file *f*."""
    from .delta import scales_fit, scales_of
    from .pipeline import CHUNK_SIZE, Materializer

    sid = dict(f.tensors).get(scales_of(name, t.dtype, t.shape) or "")
    if sid is None:
        return None
    s = repo.odb.get(sid, "tensor")
    if not scales_fit(s.dtype, s.shape, t.shape):
        return None
    with Materializer(repo.odb, workers=1) as mat:
        scales = b"".join(bytes(x) for x in mat.chunks(s.chunks))
    return bases.rtn_prediction(path, name, t.shape, scales, CHUNK_SIZE)
