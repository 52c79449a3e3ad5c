"""A repository: a work tree, an object database and refs, composed from parts passed in.

Plumbing only: methods return data and raise MvcError subclasses; nothing prints.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from . import revparse
from .errors import (
    DirtyWorkTreeError,
    FormatVersionError,
    MvcError,
    NotARepositoryError,
    NothingToCommitError,
    UnknownRevisionError,
    UsageError,
)
from .locking import file_lock
from .progress import NULL, Progress
from .refs import Refs, check_ref_name
from .state import (
    CFG_CALIB,
    CFG_DELTA,
    CFG_EVAL,
    CFG_FORMAT,
    CFG_LAZY,
    CFG_REMOTES,
    CONFIG_FILE,
    HEADS,
    LOCK_FILE,
    REPO_DIR,
    STORE_DIR,
    STORE_LOCK_FILE,
    TAGS,
    TMP_DIR,
)
from .store.backend import Backend
from .store.lmdb_backend import LmdbBackend

if TYPE_CHECKING:  # imported where used: `mvc status` on a clean tree needs neither
    from .delta import DeltaBases
    from .diff.trees import FileChange
    from .pipeline import Ingestor
from .store.objects import Commit, Tree, TreeEntry
from .store.odb import ObjectDB
from .worktree import FileStat, WorkTree

#: 1: full encodings only; 2: chunks may be delta-coded (docs/format.md §5.1); 3: large values
#: may live in pack files (§2.1); 4: planes of delta values may be NIBBLES-coded (§5.1). A
#: repository is raised before the first value that needs the new version is written, so an
#: older mvc refuses it instead of misreading it.
FORMAT_VERSION = 4
PACKS_FORMAT = 3
DELTA_FORMAT = 4  # what a delta written now may need
DEFAULT_AUTHOR = "mvc user <mvc@localhost>"


@dataclass
class Status:
    branch: str | None
    head: str | None
    modified: list[str] = field(default_factory=list)
    added: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    oids: dict[str, tuple[int, str]] = field(default_factory=dict)  # work tree path -> (mode, file id)

    @property
    def clean(self) -> bool:
        return not (self.modified or self.added or self.deleted)


@dataclass
class LogEntry:
    oid: str
    commit: Commit


def find_root(start: str) -> str:
    """The nearest directory at or above *start* that holds a .mvc directory."""
    path = os.path.realpath(start)
    while True:
        if os.path.isdir(os.path.join(path, REPO_DIR)):
            return path
        parent = os.path.dirname(path)
        if parent == path:
            raise NotARepositoryError(f"not an mvc repository (or any parent): {os.path.realpath(start)}")
        path = parent


def read_config(root: str) -> dict:
    path = os.path.join(root, REPO_DIR, CONFIG_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except FileNotFoundError as e:
        raise NotARepositoryError(f"{root}: {REPO_DIR}/{CONFIG_FILE} is missing",
                                  hint="the repository is damaged; run `mvc doctor`") from e
    except ValueError as e:
        raise MvcError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(cfg, dict):
        raise MvcError(f"{path}: not a JSON object", hint="the repository is damaged; run `mvc doctor`")
    fmt = cfg.get(CFG_FORMAT)
    if type(fmt) is not int:
        raise MvcError(f"{path}: no format version (format must be a number, not {str(fmt)[:40]!r})")
    _check_config(cfg, path)
    if fmt > FORMAT_VERSION:
        raise FormatVersionError(
            f"repository format {fmt} is newer than this mvc understands (up to {FORMAT_VERSION})")
    return cfg


def _check_config(cfg: dict, path: str) -> None:
    """The shape of each known key (a hand edit or a damaged file is one line, not a traceback)."""
    def bad(key: str, want: str):
        raise MvcError(f"{path}: {key} is damaged ({want})", hint=f"fix it by hand, or remove the {key!r} key")

    remotes = cfg.get(CFG_REMOTES, {})
    if not isinstance(remotes, dict):
        bad(CFG_REMOTES, "must map remote names to {\"url\": ...}")
    for name, entry in remotes.items():
        if not (isinstance(entry, dict) and isinstance(entry.get("url"), str)
                and isinstance(entry.get("endpoint_url", ""), str)):
            bad(CFG_REMOTES, f"remote {name!r} must be {{\"url\": \"...\"}}")
    if not isinstance(cfg.get(CFG_LAZY, ""), str):
        bad(CFG_LAZY, "must be a remote's name")
    for key in (CFG_DELTA, CFG_EVAL, CFG_CALIB):
        if not isinstance(cfg.get(key, {}), dict):
            bad(key, "must be a JSON object")


class Repo:
    """``Repo(path)`` opens the repository containing *path*; ``Repo.init(path)`` creates one."""

    #: (repo, remote name) -> a fetcher of missing chunks, for lazy clones. The remote layer provides
    #: it (mvc/__init__.py wires it in), so the core never imports mvc.remote.
    lazy_fetcher_factory: Callable[[Repo, str], Callable[[str], bytes | None]] | None = None

    def __init__(self, path: str = ".", backend: Backend | None = None, workers: int | None = None):
        self.root = find_root(path)
        self.config = read_config(self.root)
        self.backend = backend or LmdbBackend(os.path.join(self.root, REPO_DIR, STORE_DIR),
                                              packs=self.config[CFG_FORMAT] >= PACKS_FORMAT)
        self.odb = ObjectDB(self.backend)
        self.refs = Refs(self.backend)
        self.worktree = WorkTree(self.root, self.backend)
        self.workers = workers
        if self.config.get(CFG_LAZY):  # a lazy clone: missing chunks come from that remote on demand
            if self.lazy_fetcher_factory is None:
                raise MvcError(f"{self.root} is a lazy clone, and no remote layer is loaded to fetch from")
            self.odb.fetcher = self.lazy_fetcher_factory(self, self.config[CFG_LAZY])
        #: the directory user paths are relative to (the CLI's -C DIR); None means the process's cwd
        self.cwd: str | None = None

    @classmethod
    def init(cls, path: str = ".", branch: str = "main", backend: Backend | None = None) -> Repo:
        root = os.path.realpath(path)
        check_ref_name(branch)
        mvc_dir = os.path.join(root, REPO_DIR)
        if os.path.exists(os.path.join(mvc_dir, CONFIG_FILE)):
            raise MvcError(f"{root} is already an mvc repository")
        os.makedirs(mvc_dir, exist_ok=True)
        be = backend or LmdbBackend(os.path.join(mvc_dir, STORE_DIR), create=True)
        Refs(be).init(branch)
        # the config is written last: a half-made .mvc is not taken for a repository
        tmp = os.path.join(mvc_dir, CONFIG_FILE + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({CFG_FORMAT: FORMAT_VERSION}, f, indent=2)
            f.write("\n")
        os.replace(tmp, os.path.join(mvc_dir, CONFIG_FILE))
        return cls(root, backend=be)

    def update_config(self, change) -> None:
        """Apply change(config dict) and write .mvc/config.json atomically."""
        cfg = read_config(self.root)
        change(cfg)
        path = os.path.join(self.root, REPO_DIR, CONFIG_FILE)
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            json.dump(cfg, f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(path + ".tmp", path)
        self.config = cfg

    def use_packs(self) -> None:
        """Write large values to pack files from now on; a repository of an older format is raised
        to PACKS_FORMAT first (an older mvc must refuse it rather than misread a locator)."""
        if self.config.get(CFG_FORMAT, 1) < PACKS_FORMAT:
            self.update_config(lambda cfg: cfg.__setitem__(CFG_FORMAT, PACKS_FORMAT))
        if hasattr(self.backend, "pack_writes"):
            self.backend.pack_writes = True

    def close(self) -> None:
        self.backend.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def tmp_dir(self) -> str:
        """.mvc/tmp, created on first use: scratch space on the repository's file system."""
        path = os.path.join(self.root, REPO_DIR, TMP_DIR)
        os.makedirs(path, exist_ok=True)
        return path

    # -- locking ---------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self):
        """One writer at a time for commands that change the work tree or delete objects. Whoever
        takes it first removes what a killed writer left: temporary files of a checkout."""
        with file_lock(os.path.join(self.root, REPO_DIR, LOCK_FILE),
                       busy="another mvc process is working in this repository"):
            self.worktree.remove_leftovers()
            yield

    @contextlib.contextmanager
    def store_lock(self, exclusive: bool):
        """Shared by fetch, whose objects no ref names until it ends; exclusive for gc and repack,
        which must not delete or move them meanwhile (a refusal, never a wait)."""
        busy = ("a fetch is storing objects in this repository; run this again when it is done" if exclusive
                else "gc or repack is running in this repository; fetch again when it is done")
        with file_lock(os.path.join(self.root, REPO_DIR, STORE_LOCK_FILE), exclusive=exclusive, busy=busy):
            yield

    # -- revisions -------------------------------------------------------------
    def resolve(self, rev: str) -> str:
        return revparse.resolve(self.refs, self.odb, rev)

    def commit_obj(self, oid: str) -> Commit:
        return self.odb.get(oid, "commit")

    def tree_of(self, rev: str | None) -> Tree:
        if rev is None:
            return Tree(())
        return self.odb.get(self.commit_obj(self.resolve(rev)).tree, "tree")

    def head_tree(self) -> Tree:
        head = self.refs.head_commit()
        return self.odb.get(self.commit_obj(head).tree, "tree") if head else Tree(())

    # -- scanning the work tree ------------------------------------------------
    def _prefixes(self, paths: list[str] | None) -> list[str] | None:
        if not paths:
            return None
        return [self.worktree.rel_from_cwd(p, self.cwd) for p in paths]

    def _file_ids(self, files: dict[str, FileStat], ingest: Ingestor, need_stored: bool,
                  progress: Progress) -> dict[str, tuple[int, str]]:
        """path -> (mode, file id), from the stat cache where it is valid, else by reading the file."""
        out: dict[str, tuple[int, str]] = {}
        todo = []
        fresh = {}
        for rel, fs in files.items():
            oid = self.worktree.cached_oid(rel, fs)
            if oid is None and (oid := self.worktree.same_content(rel, fs)) is not None:
                fresh[rel] = (fs, oid)  # only its stat changed: the entry is renewed
            if oid is not None and (not need_stored or self.odb.has(oid)):
                out[rel] = (fs.mode, oid)
            else:
                fresh.pop(rel, None)
                todo.append(rel)
        progress.start("hashing" if not ingest.store else "storing", sum(files[r].size for r in todo))
        for rel in todo:
            oid = ingest.ingest(self.worktree.abspath(rel), rel)
            out[rel] = (files[rel].mode, oid)
            fresh[rel] = (files[rel], oid)
        ingest.flush(wait=True)
        progress.finish()
        self.worktree.remember(fresh)
        return out

    def status(self, paths: list[str] | None = None, progress: Progress = NULL) -> Status:
        prefixes = self._prefixes(paths)
        head = self.refs.head_commit()
        tree = self.head_tree().as_dict()
        files = self.worktree.scan(prefixes)
        with _ingestor(self, False, progress) as ing:
            ids = self._file_ids(files, ing, need_stored=False, progress=progress)
        st = Status(self.refs.current_branch(), head, oids=ids)
        for path in sorted(tree.keys() | ids.keys(), key=str.encode):
            if prefixes and not _under(path, prefixes):
                continue
            e, w = tree.get(path), ids.get(path)
            if e is None:
                st.added.append(path)
            elif w is None:
                st.deleted.append(path)
            elif (e.mode, e.oid) != w:
                st.modified.append(path)
        return st

    def _cached_ids(self) -> dict[str, tuple[int, str] | None]:
        """Work-tree path -> (mode, file id) where the stat cache knows it, else None; reads no file."""
        return {rel: ((fs.mode, oid) if (oid := self.worktree.cached_oid(rel, fs)) else None)
                for rel, fs in self.worktree.scan().items()}

    # -- commit ----------------------------------------------------------------
    def commit(self, message: str, paths: list[str] | None = None, author: str | None = None,
               allow_empty: bool = False, op: dict | None = None, progress: Progress = NULL,
               when: int | None = None, parents_extra: tuple[str, ...] = (), delta_base: str | None = None) -> str:
        """Snapshot the work tree (or *paths*) as a commit on HEAD. New chunks are stored as deltas
        against the same tensors in *delta_base* (a revision), the parents and recent ancestors."""
        if not message.strip():
            raise UsageError("empty commit message", hint="pass -m MESSAGE")
        with self.lock():
            head = self.refs.head_commit()
            parent_tree = self.head_tree()
            first = [self.resolve(delta_base)] if delta_base else []
            bases = self.delta_bases([*first, head, *parents_extra])
            tree = self._snapshot(parent_tree, paths, progress, bases)
            if head and not allow_empty and tree == parent_tree:  # same entries: no need to hash it twice
                raise NothingToCommitError("nothing to commit, working tree clean")
            parents = ((head,) if head else ()) + tuple(parents_extra)
            return self.record(tree, parents, message, author, op, when,
                                f"commit{' (initial)' if not head else ''}")

    def _snapshot(self, parent_tree: Tree, paths: list[str] | None, progress: Progress,
                  bases: DeltaBases | None = None) -> Tree:
        """The work tree (or *paths* of it, the rest from *parent_tree*) as a tree; its files are stored."""
        prefixes = self._prefixes(paths)
        files = self.worktree.scan(prefixes)
        entries = {e.path: (e.mode, e.oid) for e in parent_tree.entries}
        if prefixes:
            for p in prefixes:
                if not any(_under(x, [p]) for x in (*files, *entries)):
                    raise UsageError(f"pathspec {p!r} did not match any file")
            entries = {k: v for k, v in entries.items() if not _under(k, prefixes)}
        else:
            entries = {}
        with _ingestor(self, True, progress, bases) as ing:
            entries.update(self._file_ids(files, ing, need_stored=True, progress=progress))
        return Tree.build(entries)

    def delta_bases(self, commits: list[str | None]) -> DeltaBases | None:
        """Where new chunks look for delta bases: *commits* (nearest first) and the first-parent
        ancestors of the first; None when delta coding is off (config ``delta.max_depth`` 0)."""
        from .delta import DEFAULT_MAX_DEPTH, DeltaBases, with_ancestors

        depth = (self.config.get(CFG_DELTA) or {}).get("max_depth", DEFAULT_MAX_DEPTH)
        if not isinstance(depth, int) or isinstance(depth, bool) or not 0 <= depth <= 255:
            raise MvcError(f"config {CFG_DELTA}.max_depth must be an integer in [0, 255], not {depth!r}")
        if depth == 0:
            return None
        if self.config.get(CFG_FORMAT, 1) < DELTA_FORMAT:  # before the first delta: an older mvc must refuse
            self.update_config(lambda cfg: cfg.__setitem__(CFG_FORMAT, DELTA_FORMAT))  # the repository
        return DeltaBases(self.odb, with_ancestors(self.odb, [c for c in commits if c]), depth)

    def snapshot(self, message: str = "work tree", progress: Progress = NULL) -> str:
        """A commit of the work tree on top of HEAD that no ref names (as `git stash create`):
        for reading the work tree as a revision (evaluation). Nothing moves; gc may drop it."""
        with self.lock():
            head = self.refs.head_commit()
            tree = self._snapshot(self.head_tree(), None, progress, self.delta_bases([head]))
            if head and tree == self.head_tree():
                return head
            return self.write_commit(tree, (head,) if head else (), message)

    def write_commit(self, tree: Tree, parents: tuple[str, ...], message: str, author: str | None = None,
                     op: dict | None = None, when: int | None = None) -> str:
        """Store *tree* and a commit of it (one transaction); no ref moves."""
        tree_oid, tree_stored = self.odb.encode_meta(tree)
        now = int(time.time()) if when is None else when
        c = Commit(tree_oid.hex(), parents, author or DEFAULT_AUTHOR, now, _tz_minutes(now),
                   message if message.endswith("\n") else message + "\n", op)
        c_oid, c_stored = self.odb.encode_meta(c)
        self.backend.put_many([(tree_oid, tree_stored), (c_oid, c_stored)])
        return c_oid.hex()

    def record(self, tree: Tree, parents: tuple[str, ...], message: str, author: str | None,
                op: dict | None, when: int | None, what: str) -> str:
        """Write tree and commit, then move HEAD's branch by CAS from parents[0]."""
        oid = self.write_commit(tree, parents, message, author, op, when)
        first = message.strip().splitlines()[0]
        self.refs.move_head(oid, parents[0] if parents else None, f"{what}: {first}")
        return oid

    def land(self, commit: str, expected: str, msg: str, progress: Progress = NULL) -> None:
        """Make the work tree match *commit*, then move HEAD's branch to it by CAS from *expected*.
        The caller holds the lock and has checked that the work tree is clean."""
        self.switch_tree(self.odb.get(self.commit_obj(commit).tree, "tree"), False, progress)
        self.refs.move_head(commit, expected, msg)

    # -- history ---------------------------------------------------------------
    def log(self, rev: str = "HEAD", n: int | None = None) -> list[LogEntry]:
        """Commits reachable from *rev*, newest first, children always before their parents."""
        if rev == "HEAD" and self.refs.head_commit() is None:
            return []
        start = self.resolve(rev)
        # count each commit's children within the history, so a commit is shown only after all of them
        pending_children: dict[str, int] = {start: 0}
        stack = [start]
        while stack:
            for p in self.commit_obj(stack.pop()).parents:
                if p not in pending_children:
                    pending_children[p] = 0
                    stack.append(p)
                pending_children[p] += 1
        out: list[LogEntry] = []
        ready = [(self.commit_obj(start), start)]
        while ready and (n is None or len(out) < n):
            ready.sort(key=lambda x: (x[0].time, x[1]))
            c, oid = ready.pop()
            out.append(LogEntry(oid, c))
            for p in c.parents:
                pending_children[p] -= 1
                if pending_children[p] == 0:
                    ready.append((self.commit_obj(p), p))
        return out

    def lookup(self, scratch: dict | None = None):
        def get(oid, kind):
            if scratch and oid in scratch:
                return scratch[oid]
            return self.odb.get(oid, kind)
        return get

    def diff(self, a: str | None, b: str | None, paths: list[str] | None = None, stats: bool = False,
             progress: Progress = NULL) -> list[FileChange]:
        """Changes from revision *a* (default HEAD) to revision *b*; b None means the work tree.

        With *stats*, every changed tensor gets its statistics (tensordiff.tensor_stats); only
        tensors whose ids differ are read.
        """
        from .diff.trees import diff_trees

        prefixes = self._prefixes(paths)
        old = self.tree_of(a) if a is not None else self.head_tree()
        scratch: dict = {}
        locations: dict = {}
        if b is not None:
            new = self.tree_of(b)
        else:
            files = self.worktree.scan(prefixes)
            with _ingestor(self, False, progress) as ing:
                ids = {}
                for rel, fs in files.items():
                    oid = self.worktree.cached_oid(rel, fs)
                    if oid is None or not self.odb.has(oid):
                        oid = ing.ingest(self.worktree.abspath(rel), rel)
                    ids[rel] = (fs.mode, oid)
                scratch, locations = ing.scratch, ing.locations
            if prefixes:
                keep = {e.path: (e.mode, e.oid) for e in old.entries if not _under(e.path, prefixes)}
                ids = {**keep, **ids}
            new = Tree.build(ids)
        changes = diff_trees(self.lookup(scratch), old, new, prefixes)
        if stats:
            from .diff.stats import fill_stats

            fill_stats(self.odb, changes, locations, self.workers)
        return changes

    def report(self, rev_range: str | None = None, path: str = "report.html", scores: str | None = None,
               progress: Progress = NULL, read_tensors: bool = True):
        """Write `mvc report`'s HTML file of *rev_range* (REV or A..B; default HEAD's history) to
        *path*; returns the report's data (mvc.report.data.Report). Needs the ``report`` extra."""
        from .report import write

        return write(self, path, rev_range, scores, progress, read_tensors)

    def diff_root(self, rev: str) -> list[FileChange]:
        """Everything a root commit added."""
        from .diff.trees import diff_trees

        return diff_trees(self.lookup(), Tree(()), self.tree_of(rev))

    # -- checkout --------------------------------------------------------------
    def write_entries(self, entries: list[TreeEntry], progress: Progress, locations: dict | None = None,
                      prepared: dict | None = None) -> None:
        """Write *entries* into the work tree. *locations*: chunk id -> (path, offset, length) of
        chunks to read from a file (a merge's scratch file) rather than decode from the store;
        they are verified against their ids all the same. *prepared*: path -> a scratch file laid
        out as that path's file, holding some of its located chunks at their places: the rest is
        written into it, its own chunks are read and verified there, and it is moved into place."""
        total = 0
        files = {}
        for e in entries:
            files[e.path] = self.odb.get(e.oid, "file")
            total += files[e.path].size
        progress.start("checkout", total)
        written = {}
        from .pipeline import Materializer

        with Materializer(self.odb, workers=self.workers, progress=progress) as mat:
            if locations:
                mat.locations = locations
            for e in entries:
                src = (prepared or {}).get(e.path)
                if src is None or not self._finish_prepared(mat, e, src):
                    with self.worktree.open_for_write(e.path, e.mode) as f:
                        mat.write_file(e.oid, f)
                fs = self.worktree.stat(e.path)
                if fs is not None:
                    written[e.path] = (fs, e.oid)
        self.backend.release_pages()
        progress.finish()
        self.worktree.remember(written)

    def _finish_prepared(self, mat, e: TreeEntry, src: str) -> bool:
        """Write the rest of *e*'s file into its prepared scratch *src* and move it into place;
        False (*src* given up: its located chunks are then read, not trusted in place) when it
        cannot be: not on this file system, gone, or laid out otherwise."""
        from .pipeline import _Misfit

        try:
            with open(os.open(src, os.O_RDWR | os.O_NOFOLLOW), "r+b", buffering=0) as f:
                mat.in_place = src
                try:
                    mat.write_file(e.oid, f)
                finally:
                    mat.in_place = None
            self.worktree.adopt(e.path, e.mode, src)
            return True
        except (_Misfit, OSError):
            mat.locations = {c: loc for c, loc in mat.locations.items() if loc[0] != src}
            with contextlib.suppress(OSError):
                os.remove(src)
            return False

    def checkout(self, rev: str, paths: list[str] | None = None, force: bool = False,
                 progress: Progress = NULL, locations: dict | None = None, prepared: dict | None = None) -> str:
        """Check out *rev*: the whole tree (moving HEAD), or only *paths* (HEAD stays).
        *locations*, *prepared*: as for write_entries (a clone's work tree written while fetching)."""
        with self.lock():
            target = self.resolve(rev)
            tree = self.odb.get(self.commit_obj(target).tree, "tree")
            if paths is not None:
                prefixes = self._prefixes(paths) or [""]
                for p in prefixes:
                    if not any(_under(e.path, [p]) for e in tree.entries):
                        raise UsageError(f"pathspec {p!r} did not match any file in {rev}")
                entries = [e for e in tree.entries if _under(e.path, prefixes)]
                for e in entries:
                    self.worktree.check_writable(e.path)
                self.write_entries(entries, progress)
                return target
            self.switch_tree(tree, force, progress, locations, prepared)
            old = self.refs.head_commit()
            if rev in ("HEAD", "@"):  # stays as it is: attached or detached
                return target
            branch = rev if self.refs.get(HEADS + rev) == target else None
            if branch:
                self.refs.attach_head(branch, f"checkout: moving to {rev}", old, target)
            else:
                self.refs.detach_head(target, f"checkout: moving to {rev}", old)
            return target

    def switch_tree(self, tree: Tree, force: bool, progress: Progress, locations: dict | None = None,
                    prepared: dict | None = None) -> None:
        """Make the work tree match *tree*, refusing to lose uncommitted work unless forced.
        Forced, nothing is read that is about to be overwritten (a damaged file must not stop
        its own repair): a file the stat cache does not vouch for is simply written again.
        *locations*, *prepared*: as for write_entries."""
        head = self.head_tree().as_dict()
        target = tree.as_dict()
        if force:
            current = self._cached_ids()
        else:
            st = self.status()
            dirty = set(st.modified) | set(st.deleted)
            current = st.oids
        if not force:
            blocked = []
            for path in sorted(head.keys() | target.keys()):
                if head.get(path) != target.get(path) and path in dirty:
                    t = target.get(path)
                    if (t is None and path not in current) or (t is not None and current.get(path) == (t.mode, t.oid)):
                        continue  # already as the target has it (a checkout killed halfway, run again): nothing lost
                    blocked.append(path)
            for path in st.added:
                if path in target and (target[path].mode, target[path].oid) != current[path]:
                    blocked.append(path)
            if blocked:
                raise DirtyWorkTreeError(
                    f"checkout would overwrite uncommitted changes in {len(blocked)} file(s): "
                    + ", ".join(blocked[:5]) + (" ..." if len(blocked) > 5 else ""))
        to_write = [e for p, e in target.items() if current.get(p) != (e.mode, e.oid)]
        to_remove = [p for p in head if p not in target and p in current]
        for e in to_write:  # refuse before anything is written
            self.worktree.check_writable(e.path)
        for p in to_remove:  # first, so that a file can become a directory
            self.worktree.remove(p)
        self.worktree.remember({}, forget=to_remove)
        self.write_entries(to_write, progress, locations, prepared)

    def switch(self, branch: str, create: bool = False, start: str | None = None,
               force: bool = False, progress: Progress = NULL) -> str | None:
        check_ref_name(branch)
        if create:
            if self.refs.get(HEADS + branch) is not None:
                raise MvcError(f"branch {branch!r} already exists")
            base = self.resolve(start) if start else self.refs.head_commit()
            if base is None:  # unborn: just point HEAD at the new name
                self.refs.attach_head(branch, f"switch: to new branch {branch}", None, None)
                return None
            self.refs.set_ref(HEADS + branch, base, None, f"branch: created from {start or 'HEAD'}")
        target = self.refs.get(HEADS + branch)
        if target is None:
            raise UnknownRevisionError(f"no branch named {branch!r}", hint="use `mvc switch -c` to create it")
        return self.checkout(branch, force=force, progress=progress)

    def reset(self, rev: str, hard: bool = False, progress: Progress = NULL) -> str:
        target = self.resolve(rev)
        with self.lock():
            if hard:
                self.switch_tree(self.odb.get(self.commit_obj(target).tree, "tree"), True, progress)
            self.refs.move_head(target, self.refs.head_commit(), f"reset: moving to {rev}")
        return target

    # -- branches and tags -----------------------------------------------------
    def create_branch(self, name: str, start: str = "HEAD") -> str:
        check_ref_name(name)
        oid = self.resolve(start)
        if self.refs.get(HEADS + name) is not None:
            raise MvcError(f"branch {name!r} already exists")
        self.refs.set_ref(HEADS + name, oid, None, f"branch: created from {start}")
        return oid

    def delete_branch(self, name: str, force: bool = False) -> str:
        oid = self.refs.get(HEADS + name)
        if oid is None:
            raise UnknownRevisionError(f"no branch named {name!r}")
        if self.refs.current_branch() == name:
            raise MvcError(f"cannot delete branch {name!r}: it is checked out")
        head = self.refs.head_commit()
        if not force and (head is None or not self.is_ancestor(oid, head)):
            raise MvcError(f"branch {name!r} is not merged into HEAD", hint="use -D to delete it anyway")
        self.refs.set_ref(HEADS + name, None, oid, "branch: deleted")
        return oid

    def create_tag(self, name: str, rev: str = "HEAD", force: bool = False) -> str:
        check_ref_name(name, "tag")
        oid = self.resolve(rev)
        old = self.refs.get(TAGS + name)
        if old is not None and not force:
            raise MvcError(f"tag {name!r} already exists", hint="use -f to move it")
        self.refs.set_ref(TAGS + name, oid, old, f"tag: {rev}")
        return oid

    def delete_tag(self, name: str) -> str:
        oid = self.refs.get(TAGS + name)
        if oid is None:
            raise UnknownRevisionError(f"no tag named {name!r}")
        self.refs.set_ref(TAGS + name, None, oid, "tag: deleted")
        return oid

    def ancestors(self, oid: str) -> set[str]:
        """*oid* and every commit reachable from it."""
        seen, stack = set(), [oid]
        while stack:
            c = stack.pop()
            if c not in seen:
                seen.add(c)
                stack.extend(self.commit_obj(c).parents)
        return seen

    def is_ancestor(self, a: str, b: str) -> bool:
        return a in self.ancestors(b)

    # -- tensors ---------------------------------------------------------------
    def load(self, rev: str = "HEAD", path: str | None = None, names: list[str] | None = None,
             dequantize: bool = False) -> dict:
        """The tensors of *rev* (only *names*, if given) as ``{name: torch.Tensor}``; the work tree is untouched.

        With *dequantize*, quantized weights (bitsandbytes 4-bit/8-bit, mvc's rtn) come back as
        float tensors under their plain names (docs/compression.md)."""
        from .load import load_tree

        return load_tree(self, self.tree_of(rev), path, names, dequantize)

    def save(self, state_dict: dict, path: str, message: str, metadata: dict | None = None,
             author: str | None = None) -> str:
        """Write *state_dict* to *path* (safetensors) in the work tree and commit that file."""
        from safetensors.torch import save_file

        full = os.path.join(self.root, path)
        os.makedirs(os.path.dirname(full) or ".", exist_ok=True)
        save_file({k: v.contiguous() for k, v in state_dict.items()}, full, metadata=metadata)
        return self.commit(message, paths=[full], author=author)


def _ingestor(repo: Repo, store: bool, progress: Progress, bases: DeltaBases | None = None) -> Ingestor:
    from .pipeline import Ingestor

    if store:
        repo.use_packs()

    return Ingestor(repo.odb, store=store, workers=repo.workers, progress=progress, bases=bases)


def _under(path: str, prefixes: list[str]) -> bool:
    return any(not p or path == p or path.startswith(p.rstrip("/") + "/") for p in prefixes)


def _tz_minutes(t: int) -> int:
    lt = time.localtime(t)
    return (lt.tm_gmtoff or 0) // 60
