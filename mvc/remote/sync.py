"""push, fetch and clone over a RemoteBackend (layout: docs/remote-format.md).

Remote layout, format 2:

    mvc-remote.json            {"format": 2}
    packs/<id>.pack            stored values back to back (id = BLAKE3 of the pack bytes)
    packs/<id>.idx             canonical JSON {"objects": [[oid, offset, length], ...]}, written after its pack
    refs/heads/<branch>        "<commit id>\\n", moved last, by compare-and-swap

A push uploads chunk packs first (in parallel), then one pack of metadata objects,
then moves the ref; so a commit on the remote always has everything it names, an
interrupted push leaves only complete packs (or an orphan pack without an index),
and running it again sends only what is missing. Every downloaded object is
verified against its id before it is stored; nothing unverified becomes visible.
"""

from __future__ import annotations

import json
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import blake3

from ..errors import CorruptObjectError, MvcError
from ..graph import children, closure
from ..progress import NULL
from ..refs import check_ref_name
from ..state import CFG_LAZY, CFG_REMOTES, HEADS, KV_REMOTE_INDEX, REMOTES
from ..store.codec import delta_base, links
from ..store.ids import TYPE_CODE, is_hex_oid
from ..store.objects import canonical_json
from ..store.odb import decode_verified
from .backends import RemoteBackend, RemoteError

#: 1: the layout below; 2: stored values may hold NIBBLES planes (docs/format.md §5.1), so a
#: push raises a format 1 remote to 2 before it uploads anything
FORMAT = 2
PACK_TARGET = 64 << 20
_STORE_BATCH = 32 << 20  # a fetch stores this much per transaction (one more is being written)


@dataclass
class PushResult:
    branch: str
    old: str | None
    new: str
    objects: int = 0
    bytes_sent: int = 0
    up_to_date: bool = False


def check_format(remote: RemoteBackend, create: bool) -> None:
    raw = remote.get("mvc-remote.json")
    if raw is None:
        if not create:
            raise RemoteError("not an mvc remote (no mvc-remote.json)", hint="push to it first")
        remote.put("mvc-remote.json", canonical_json({"format": FORMAT}))
        return
    try:
        fmt = json.loads(raw)["format"]
    except (ValueError, KeyError, TypeError, RecursionError) as e:
        raise RemoteError(f"remote's mvc-remote.json is damaged ({e})") from e
    if type(fmt) is not int:
        raise RemoteError(f"remote's mvc-remote.json is damaged (format {str(fmt)[:40]!r} is not a number)")
    if fmt > FORMAT:
        raise RemoteError(f"remote format {fmt} is newer than this mvc understands ({FORMAT})",
                          hint="upgrade mvc")
    if create and fmt < FORMAT:  # before the first pack that may need it: an older mvc must refuse
        remote.put("mvc-remote.json", canonical_json({"format": FORMAT}))


def remote_index(local, remote: RemoteBackend, name: str) -> dict[str, tuple[str, int, int]]:
    """oid -> (pack key, offset, length) for every object the remote holds. Its idx files are cached
    in *local*'s key-value space (a repository or a store backend): a pack's name is the hash of its
    bytes, so a cached index is never stale."""
    kv = getattr(local, "backend", local)
    out: dict[str, tuple[str, int, int]] = {}
    for key in remote.list("packs/"):
        if not key.endswith(".idx"):
            continue
        cache_key = KV_REMOTE_INDEX + name.encode() + b":" + key.encode()
        raw = kv.kv_get(cache_key)
        if raw is None:
            raw = remote.get(key)
            if raw is None:
                continue
            kv.kv_put_many({cache_key: raw})
        pack = key[: -len(".idx")] + ".pack"
        for oid, off, length in parse_index(raw, key):
            out[oid] = (pack, off, length)
    return out


MAX_VALUE = 1 << 30  # no stored value is larger (a chunk is at most 4 MiB; metadata far smaller)


def parse_index(raw: bytes, key: str) -> list[tuple[str, int, int]]:
    """The entries of a remote pack index, checked: [[64 lowercase hex, offset >= 0, 0 <= length
    <= MAX_VALUE], ...]; anything else is a one-line RemoteError naming the index."""
    try:
        entries = json.loads(raw)["objects"]
        if not isinstance(entries, list):
            raise TypeError("objects is not a list")
        out = []
        for e in entries:
            if not (isinstance(e, list) and len(e) == 3):
                raise TypeError(f"entry {str(e)[:80]} is not [id, offset, length]")
            oid, off, length = e
            if not is_hex_oid(oid):
                raise TypeError(f"entry id {str(oid)[:80]!r} is not 64 hex digits")
            if not (type(off) is int and type(length) is int and 0 <= off < 1 << 48 and 0 <= length <= MAX_VALUE):
                raise TypeError(f"entry {oid[:12]} has offset {off!r}, length {length!r}")
            out.append((oid, off, length))
        return out
    except (ValueError, KeyError, TypeError, RecursionError) as e:
        raise RemoteError(f"remote index {key} is damaged ({e})") from e


def _read_ref(remote: RemoteBackend, branch: str) -> tuple[bytes | None, str | None]:
    raw = remote.get(f"refs/heads/{branch}")
    return raw, (_remote_tip(raw, f"refs/heads/{branch}") if raw is not None else None)


def _missing(repo, tip: str, have) -> dict[str, str]:
    """Objects reachable from *tip* that the remote lacks (stopping at commits it has)."""
    return closure(repo.odb.get, [(tip, "commit")], have.__contains__)


def _verified(odb, items: list[tuple[str, bytes]], kinds) -> list[tuple[str, bytes]]:
    """*items* once every stored value decoded to its id: a damaged local object is never sent
    (a remote would keep it: a later push skips ids the remote lists)."""
    for oid, stored in items:
        kind = kinds(oid)
        try:
            odb.decode(bytes.fromhex(oid), stored, kind)
        except MvcError as e:
            raise RemoteError(f"push stopped before sending a damaged {kind}: {e}",
                              hint="run `mvc fsck`; fetch the object from a healthy remote, then push again") from e
    return items


def _upload_pack(remote: RemoteBackend, items: list[tuple[str, bytes]]) -> int:
    offsets, pos = [], 0
    for oid, stored in items:
        offsets.append([oid, pos, len(stored)])
        pos += len(stored)
    parts = [s for _, s in items]
    items.clear()
    h = blake3.blake3()
    for part in parts:
        h.update(part)
    key = "packs/" + h.hexdigest()
    remote.put_parts(key + ".pack", parts)  # a file:// remote writes the parts as they are
    remote.put(key + ".idx", canonical_json({"objects": offsets}))
    return pos


def push(repo, remote: RemoteBackend, name: str, branch: str, force: bool = False, progress=None) -> PushResult:
    local = repo.refs.get(HEADS + branch)
    if local is None:
        raise RemoteError(f"no local branch {branch!r} to push")
    check_format(remote, create=True)
    old_raw, old = _read_ref(remote, branch)
    res = PushResult(branch, old, local)
    if old == local:
        res.up_to_date = True
        return res
    if old and not force and not (repo.odb.has(old) and repo.is_ancestor(old, local)):
        raise RemoteError(f"push of {branch} rejected: the remote has commits you do not (non-fast-forward)",
                          hint=f"`mvc pull {name} {branch}` first, or push --force")
    have = remote_index(repo, remote, name)
    want = _missing(repo, local, have)
    upload_objects(repo.odb, remote, have, want, progress)
    if not remote.cas(f"refs/heads/{branch}", old_raw, (local + "\n").encode()):
        raise RemoteError(f"push of {branch} rejected: the remote ref moved while pushing",
                          hint=f"`mvc pull {name} {branch}` and push again")
    repo.refs.set_ref(f"{REMOTES}{name}/{branch}", local, repo.refs.get(f"{REMOTES}{name}/{branch}"),
                      f"push to {name}")
    res.objects = len(want)
    res.bytes_sent = remote.sent
    return res


def upload_objects(odb, remote: RemoteBackend, have, want: dict[str, str], progress=None) -> None:
    """Upload *want* (id -> kind; none of them in *have*, what the remote lists) as packs: the chunks
    first, two packs at a time, then the metadata, children before parents (tensors, files, trees,
    commits), so whatever the remote lists has everything it names. Every value is verified
    against its id before it leaves; a delta whose base the remote will not have goes in full."""
    chunks = [o for o, k in want.items() if k == "chunk"]
    meta = sorted((o for o, k in want.items() if k != "chunk"), key=lambda o: (TYPE_CODE[want[o]], o))
    if progress is not None:
        progress.start("pushing", sum(len(odb.stored(o)) for o in chunks))

    wanted = set(chunks)

    def packs(ids):
        batch, size = [], 0
        for oid in ids:
            stored = bytes(odb.stored(oid))
            if any(b.hex() not in wanted and b.hex() not in have for b in links(stored)):
                stored = odb.standalone(oid)  # its base is neither on the remote nor in this upload
            batch.append((oid, stored))
            size += len(stored)
            if size >= PACK_TARGET:
                yield batch
                batch, size = [], 0
        if batch:
            yield batch

    with ThreadPoolExecutor(2, thread_name_prefix="mvc-push") as pool:
        pending = []
        for batch in packs(chunks):
            # verified by the uploading thread (decoding releases the GIL): two at once
            pending.append(pool.submit(lambda b: _upload_pack(remote, _verified(odb, b, want.get)), batch))
            odb.backend.release_pages()
            while len(pending) >= 2:  # two packs uploading (each multipart, 4 parts at once)
                n = pending.pop(0).result()
                if progress is not None:
                    progress.advance(nbytes=n)
        for f in pending:
            n = f.result()
            if progress is not None:
                progress.advance(nbytes=n)
    for batch in packs(meta):  # after every chunk pack: a commit on the remote is always complete
        _upload_pack(remote, _verified(odb, batch, want.get))
    if progress is not None:
        progress.finish()


def _remote_tip(raw: bytes, key: str) -> str:
    """A remote ref's commit id: 64 lowercase hex digits and a newline, nothing else."""
    tip = raw.decode("ascii", "replace").strip()
    if not is_hex_oid(tip):
        raise RemoteError(f"remote ref {key} is damaged (not a commit id: {tip[:80]!r})")
    return tip


def fetch(repo, remote: RemoteBackend, name: str, progress=None, lazy: bool = False, prefill=None) -> dict[str, str]:
    """Download every branch's missing objects (verified) and set refs/remotes/NAME/*.

    Holds the store lock shared: gc and repack (exclusive) cannot delete what it stored before
    a ref names it. Walks the whole closure of the remote's branches, objects it already has
    included, so a repository that lost objects gets them back.

    *lazy*: metadata only (commits, trees, files, tensors); chunks come on demand (lazy_fetcher).
    *prefill*: a clone's Prefill (mvc/remote/prefill.py), which keeps the verified chunks of the
    branch it will check out.
    """
    with repo.store_lock(exclusive=False):
        return _fetch(repo, remote, name, progress, lazy, prefill)


def _fetch(repo, remote: RemoteBackend, name: str, progress, lazy: bool, prefill=None) -> dict[str, str]:
    check_format(remote, create=False)
    repo.use_packs()
    tips = {}
    for key in remote.list("refs/heads/"):
        raw = remote.get(key)
        if raw is None:  # deleted since the listing
            continue
        branch = key[len("refs/heads/"):]
        try:
            check_ref_name(branch)
        except MvcError as e:
            raise RemoteError(f"remote ref {key} is damaged (not a valid branch name)") from e
        tips[branch] = _remote_tip(raw, key)
    index = remote_index(repo, remote, name)
    if prefill is not None:
        prefill.choose(tips)
    download_objects(repo.odb, remote, index, [(t, "commit") for t in tips.values()], name, progress, lazy,
                     prefill)
    for branch, tip in tips.items():
        ref = f"{REMOTES}{name}/{branch}"
        repo.refs.set_ref(ref, tip, repo.refs.get(ref), f"fetch from {name}")
    return tips


def download_objects(odb, remote: RemoteBackend, index: dict, roots, name: str, progress=None,
                     lazy: bool = False, prefill=None) -> int:
    """Store everything reachable from *roots* [(id, kind)] that *odb* lacks, downloaded through
    *index* (remote_index) and verified against its id before it is stored: chunks first (several
    requests in flight, a delta only once its base is stored), then metadata, children before
    parents, so the store never names what it lacks. Objects already here are walked through, so a
    store that lost some gets them back. *name* labels errors and progress.

    *lazy*: metadata only; chunks come on demand (lazy_fetcher). *prefill*: see fetch. Returns how
    many objects it stored."""
    stored = 0

    def download(oid: str, kind: str) -> bytes:
        where = index.get(oid)
        if where is None:
            raise RemoteError(f"the remote {name} lacks {kind} {oid[:12]}",
                              hint="it was never uploaded there, or the remote is damaged (`mvc remote fsck`)")
        data = remote.get_range(*where)
        if kind == "chunk" and delta_base(data) is not None:
            return data  # verified once its base is at hand (store_chunk)
        try:
            _, content = decode_verified(bytes.fromhex(oid), data, kind)
        except MvcError as e:
            raise CorruptObjectError(oid, f"downloaded from {name} and refused: {e}") from e
        if kind == "chunk" and prefill is not None:
            prefill.put(oid, content)  # decoded: the clone's work tree takes it
        return data

    # 1. metadata (small): walk down from the tips, keeping what is new in memory
    metas: dict[str, tuple[str, bytes]] = {}
    parsed: dict[str, object] = {}
    chunks: list[str] = []
    stack = list(roots)
    seen: set[str] = set()
    while stack:
        oid, kind = stack.pop()
        if oid in seen:
            continue
        seen.add(oid)
        have = odb.backend.has(bytes.fromhex(oid))
        if kind == "chunk":
            if not lazy and not have:
                chunks.append(oid)
            continue
        if have:  # walk on below it: what it names may be missing (an older gc raced a fetch)
            stack.extend(children(kind, odb.get(oid, kind)))
            continue
        data = download(oid, kind)
        metas[oid] = (kind, data)
        _, content = decode_verified(bytes.fromhex(oid), data, kind)
        parsed[oid] = odb.get_parsed_from(kind, content, oid)
        stack.extend(children(kind, parsed[oid]))
    if prefill is not None and not lazy:
        prefill.plan(lambda oid, kind: parsed[oid] if oid in parsed else odb.get(oid, kind))
    # 2. chunks, several requests in flight, each verified before it is stored
    if progress is not None and chunks:
        progress.start(f"fetching from {name}", sum(index[c][2] for c in chunks if c in index))
    batch: list[tuple[bytes, bytes]] = []
    in_batch: set[bytes] = set()
    size = 0
    # one batch at a time is written on its own thread: the pack's fdatasync overlaps the next
    # downloads and decodes (the store shows a batch only once its transaction commits)
    writer = ThreadPoolExecutor(1, thread_name_prefix="mvc-fetch-store")
    writing: list = [None, set()]  # the batch being written: its future, its ids

    def settle():
        if writing[0] is not None:
            fut, writing[0], writing[1] = writing[0], None, set()
            fut.result()
            odb.backend.release_pages()

    def flush(wait: bool = False):
        nonlocal batch, size, in_batch
        if batch:
            settle()
            writing[0], writing[1] = writer.submit(odb.backend.put_many, batch), in_batch
            batch, size, in_batch = [], 0, set()
        if wait:
            settle()

    def store_chunk(oid: str, data: bytes) -> None:
        """Add a verified chunk to the batch; a delta only once its base is stored (fetched first if
        need be), so the store never holds a delta without its base."""
        nonlocal size, stored
        key = bytes.fromhex(oid)
        if key in in_batch or key in writing[1] or odb.backend.has(key):
            return
        bases = links(data)
        for base in bases:
            if base in in_batch or base in writing[1]:
                flush(wait=True)
            elif not odb.backend.has(base):
                store_chunk(base.hex(), download(base.hex(), "chunk"))
                flush(wait=True)
        if bases:
            try:
                content = odb.decode(key, data, "chunk")[1]
            except MvcError as e:
                raise CorruptObjectError(oid, f"downloaded from {name} and refused: {e}") from e
            if prefill is not None:
                prefill.put(oid, content)
        batch.append((key, data))
        in_batch.add(key)
        size += len(data)
        stored += 1

    try:
        with ThreadPoolExecutor(8, thread_name_prefix="mvc-fetch") as pool:
            def downloaded():  # in order, at most 16 requests (and their data) in flight
                pending: deque = deque()
                for c in chunks:
                    pending.append((c, pool.submit(download, c, "chunk")))
                    if len(pending) >= 16:
                        oid, fut = pending.popleft()
                        yield oid, fut.result()
                while pending:
                    oid, fut = pending.popleft()
                    yield oid, fut.result()

            for oid, data in downloaded():
                store_chunk(oid, data)
                if progress is not None:
                    progress.advance(nbytes=len(data))
                if size >= _STORE_BATCH:
                    flush()
        flush(wait=True)
    finally:
        writer.shutdown(wait=True)  # nothing writes to the store after this returns or raises
    if progress is not None:
        progress.finish()
    # 3. metadata last, children before parents: tensors, files, trees, commits
    for kind in ("tensor", "file", "tree", "commit"):
        odb.backend.put_many([(bytes.fromhex(o), d) for o, (k, d) in metas.items() if k == kind])
    return stored + len(metas)


@dataclass
class RemoteFsckReport:
    packs: int = 0
    objects: int = 0
    bad: dict[str, str] = field(default_factory=dict)  # object id -> what is wrong (and where)
    repaired: list[str] = field(default_factory=list)  # packs rewritten with good copies
    unrepaired: dict[str, str] = field(default_factory=dict)  # pack -> why it could not be

    @property
    def ok(self) -> bool:
        return not self.bad or (not self.unrepaired and len(self.repaired) > 0)


def remote_fsck(repo, remote: RemoteBackend, name: str, repair: bool = False, progress=None) -> RemoteFsckReport:
    """Download every pack of the remote and verify each object its index lists against its id
    (a delta through its base, from the local store or else from the remote).

    *repair*: a pack holding a damaged or missing object is rewritten as a new pack — the good
    objects as they were, each damaged one from the local store (verified, stored in full) — and
    the old index, then the old pack, are deleted. A pack whose damaged objects this repository
    does not have is left as it is and reported."""
    from ..store.odb import ObjectDB

    check_format(remote, create=False)
    rep = RemoteFsckReport()
    packs = {}
    for key in remote.list("packs/"):
        if key.endswith(".idx"):
            raw = remote.get(key)
            if raw is not None:
                packs[key[: -len(".idx")]] = parse_index(raw, key)
    index = {oid: (p + ".pack", off, n) for p, entries in packs.items() for oid, off, n in entries}
    check = ObjectDB(repo.backend)  # reads bases locally, else from the remote (never stores them)
    check.fetcher = lambda hex_id: remote.get_range(*index[hex_id]) if hex_id in index else None
    if progress is not None:
        progress.start(f"checking {name}", sum(n for entries in packs.values() for _, _, n in entries))
    for prefix, entries in sorted(packs.items()):
        rep.packs += 1
        good: list[tuple[str, bytes]] = []
        damaged: list[str] = []
        for oid, off, length in entries:  # one range at a time: memory bounded by one value
            rep.objects += 1
            try:
                value = remote.get_range(prefix + ".pack", off, length)
                check.decode(bytes.fromhex(oid), value)
                why = None
            except MvcError as e:
                why = str(e)
            if why is None:
                if repair:  # kept for rewriting the pack, should it hold a damaged object
                    good.append((oid, value))
            else:
                rep.bad[oid] = f"{why} ({prefix}.pack)"
                damaged.append(oid)
            if progress is not None:
                progress.advance(nbytes=length)
        if damaged and repair:
            _repair_pack(repo, remote, name, prefix, good, damaged, rep)
    if progress is not None:
        progress.finish()
    return rep


def _repair_pack(repo, remote, name, prefix, good, damaged, rep) -> None:
    fixed = []
    for oid in damaged:
        try:
            repo.odb.read(oid)  # verified here
            fixed.append((oid, repo.odb.standalone(oid)))
        except MvcError as e:
            rep.unrepaired[prefix + ".pack"] = f"object {oid[:12]} is damaged there and not usable here ({e})"
            return
    _upload_pack(remote, good + fixed)  # the new pack and its index first: nothing is ever unlisted
    remote.delete(prefix + ".idx")
    remote.delete(prefix + ".pack")
    repo.backend.kv_put_many({KV_REMOTE_INDEX + name.encode() + b":" + (prefix + ".idx").encode(): None})
    rep.repaired.append(prefix + ".pack")


# -- remote configuration (in .mvc/config.json; never any secret) ----------------------------
def remotes(repo) -> dict[str, dict]:
    return dict(repo.config.get(CFG_REMOTES, {}))


def add_remote(repo, name: str, url: str, endpoint_url: str | None = None) -> None:
    from ..refs import check_ref_name
    from .backends import check_url

    check_ref_name(name, "remote")
    check_url(url)
    if name in remotes(repo):
        raise RemoteError(f"remote {name!r} already exists")
    entry = {"url": url} | ({"endpoint_url": check_url(endpoint_url)} if endpoint_url else {})
    repo.update_config(lambda cfg: cfg.setdefault(CFG_REMOTES, {}).__setitem__(name, entry))


def remove_remote(repo, name: str) -> None:
    if name not in remotes(repo):
        raise RemoteError(f"no remote named {name!r}", hint="`mvc remote list` shows them")
    def drop(cfg):
        cfg[CFG_REMOTES].pop(name)
        if not cfg[CFG_REMOTES]:
            del cfg[CFG_REMOTES]

    repo.update_config(drop)
    for ref, oid in repo.backend.list_refs(f"{REMOTES}{name}/").items():
        repo.refs.set_ref(ref, None, oid, "remote removed")


def open_named(repo, name: str) -> RemoteBackend:
    from .backends import open_remote

    entry = remotes(repo).get(name)
    if entry is None:
        raise RemoteError(f"no remote named {name!r}", hint="add one with `mvc remote add NAME URL`")
    return open_remote(entry["url"], create=True, endpoint_url=entry.get("endpoint_url"))


def lazy_fetcher(repo, name: str, remote: RemoteBackend | None = None):
    """For ObjectDB.fetcher: download one object from remote *name* on first use, verify, store it."""
    import threading

    state: dict = {} if remote is None else {"remote": remote, "index": None}
    lock = threading.Lock()  # checkout's workers fetch in parallel; the remote is opened once

    def fetch_one(hex_id: str):
        with lock:
            if "remote" not in state:
                state["remote"] = open_named(repo, name)
            if state.get("index") is None:
                state["index"] = remote_index(repo, state["remote"], name)
        where = state["index"].get(hex_id)
        if where is None:
            return None
        data = state["remote"].get_range(*where)
        try:
            repo.odb.decode(bytes.fromhex(hex_id), data)  # a delta's base is fetched the same way
        except MvcError as e:
            raise CorruptObjectError(hex_id, f"downloaded from {name} and refused: {e}") from e
        repo.backend.put_many([(bytes.fromhex(hex_id), data)])
        return data

    return fetch_one


CLONING = "cloning"  # .mvc/cloning: a clone in progress (its URL); removed when the clone is done


def clone(url: str, dest: str, progress=None, endpoint_url: str | None = None, lazy: bool = False):
    """A new repository in *dest* with remote "origin", its default branch checked out.

    A clone that fails cleans up after itself; one that was killed leaves .mvc/cloning, and
    running the same clone again resumes it (what it had stored is kept, verified as before)."""
    import os
    import shutil

    from ..repo import Repo
    from .backends import open_remote
    from .prefill import Prefill, default_branch

    marker = os.path.join(dest, ".mvc", CLONING)
    if os.path.isdir(dest) and os.listdir(dest) == [".mvc"] and \
            set(os.listdir(os.path.join(dest, ".mvc"))) <= {CLONING + ".tmp"}:
        shutil.rmtree(os.path.join(dest, ".mvc"))  # killed before it wrote its marker: nothing to resume
    resuming = os.path.isfile(marker)
    if resuming:
        with open(marker, encoding="utf-8", errors="replace") as f:
            was = f.read().strip()
        if was != url:
            raise RemoteError(f"{dest} holds an interrupted clone of {was[:200]}, not of {url}",
                              hint=f"clone {was[:200]} again to resume it, or remove {dest}")
    elif os.path.exists(dest) and os.listdir(dest):
        raise RemoteError(f"destination {dest} exists and is not empty")
    remote = open_remote(url, endpoint_url=endpoint_url)
    check_format(remote, create=False)
    existed = os.path.exists(dest)
    try:
        if not resuming:
            os.makedirs(os.path.join(dest, ".mvc"), exist_ok=True)
            with open(marker + ".tmp", "w", encoding="utf-8") as f:  # first: a kill from here on can be resumed
                f.write(url + "\n")
            os.replace(marker + ".tmp", marker)
        repo = Repo(dest) if os.path.exists(os.path.join(dest, ".mvc", "config.json")) else Repo.init(dest)
        if "origin" not in remotes(repo):
            add_remote(repo, "origin", url, endpoint_url)
        if lazy:
            repo.update_config(lambda cfg: cfg.__setitem__(CFG_LAZY, "origin"))
            repo.odb.fetcher = lazy_fetcher(repo, "origin")
        prefill = None if lazy else Prefill(dest)  # the work tree written while fetching
        try:
            tips = fetch(repo, remote, "origin", progress, lazy=lazy, prefill=prefill)
            if tips:
                branch = default_branch(tips)
                old = repo.refs.get(HEADS + branch)
                repo.refs.set_ref(HEADS + branch, tips[branch], old, f"clone: from {url}")
                repo.refs.attach_head(branch, "clone", None, tips[branch])
                if not lazy:  # a lazy clone checks nothing out: tensors arrive when something reads them
                    prefill.close()
                    repo.checkout(branch, force=True, progress=progress or NULL, locations=prefill.locations,
                                  prepared=prefill.prepared)
        finally:
            if prefill is not None:
                prefill.drop()
        os.remove(marker)
    except BaseException as e:
        if resuming or isinstance(e, KeyboardInterrupt):
            raise  # keep what is there: the next run resumes
        # a failed clone leaves nothing behind (an existing empty directory stays, empty)
        if existed:
            for name in os.listdir(dest):
                shutil.rmtree(os.path.join(dest, name), ignore_errors=True)
        else:
            shutil.rmtree(dest, ignore_errors=True)
        raise
    return repo
